"""launch/sweep.py: every ablation file resolves; bad keys and foreign workdirs stop a sweep before
anything starts; a tiny three-run sweep trains, reports (CSV, markdown, PNG) and is skipped on rerun."""
import csv
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from lm_run_helpers import make_setup
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(REPO, "launch", "sweep.py")
TINY = os.path.join(REPO, "configs", "ablations", "tiny.py")
ABLATIONS = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "*.py")))

_spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP_PY)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _data_sets(setup):
    return ["--set", f"data.root={setup['root']}", "--set", f"data.codes={setup['codes']}",
            "--set", f"data.tokenizer={setup['tokenizer']}", "--set", "model.image_codes=64",
            "--set", "data.dolly_eval_rows=20"]


@pytest.mark.parametrize("path", ABLATIONS, ids=[os.path.basename(p) for p in ABLATIONS])
def test_every_ablation_file_resolves(path, tmp_path):
    spec, runs = sweep.load_sweep(path)
    planned = sweep.plan(spec, runs, str(tmp_path), [], [])
    assert [p["name"] for p in planned] == list(runs)
    loader = importlib.util.spec_from_file_location("ablation_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    assert module.VARIANTS == tuple(runs)
    for p in planned:  # `llmcxr train --config FILE:RUN` trains the sweep's run ("{root}" aside)
        assert not os.path.exists(p["workdir"])
        alone = module.get_config(p["name"]).to_json_best_effort().replace("{root}", str(tmp_path))
        assert json.loads(alone) == json.loads(p["config"].to_json_best_effort())
    if os.path.basename(path) == "paper.py":
        by = {p["name"]: p["config"] for p in planned}
        assert dict(by["no_vqa"].data.mixture) == {"cxr_to_report": 0.375, "report_to_cxr": 0.375, "vqa": 0.0,
                                                   "text": 0.25}
        assert by["no_stage1"].data.stage == 2 and by["no_stage1"].train.init_from == ""
        assert by["baseline_stage2"].train.init_from == os.path.join(str(tmp_path), "baseline")
        assert by["no_cip"].train.cip_weight == 0 and by["vqgan"].train.cip_weight == 100
        assert by["joint_loss"].data.loss == "joint"


def test_a_command_prefix_limits_a_set_to_that_commands_runs(tmp_path, capsys):
    paper = PAPER
    spec, runs = sweep.load_sweep(paper)
    sets = ["train:train.init_from=/models/dolly", "train-vqgan:train.init_from=gs://b/imagenet.ckpt",
            "train.data=/data/mimic"]
    by = {p["name"]: p["config"] for p in sweep.plan(spec, runs, str(tmp_path), [], sets)}
    assert by["baseline"].train.init_from == by["no_stage1"].train.init_from == "/models/dolly"
    assert by["baseline_stage2"].train.init_from == os.path.join(str(tmp_path), "baseline")  # its own override wins
    assert by["vqgan"].train.init_from == by["no_cip"].train.init_from == "gs://b/imagenet.ckpt"
    assert by["vqgan"].train.data == "/data/mimic"
    # a prefixed key no run of that command has is unused; an unknown command is refused
    with pytest.raises(sweep.SweepError, match="--set train-vqgan:data.root: no selected run"):
        sweep.plan(spec, runs, str(tmp_path), [], ["train-vqgan:data.root=/x"])
    root = tmp_path / "root"
    assert sweep.main(["run", paper, "--workdir", str(root), "--set", "trian:train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'trian' is not a command" in err and not root.exists()


PAPER = os.path.join(REPO, "configs", "ablations", "paper.py")


def test_stage2_runs_wait_for_their_stage1_run(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    spec, runs = sweep.load_sweep(PAPER)
    after = {p["name"]: p["after"] for p in sweep.plan(spec, runs, str(root), [], [])}
    assert after["baseline_stage2"] == ["baseline"] and after["no_vqa_stage2"] == ["no_vqa"]
    assert after["baseline"] == after["no_stage1"] == after["no_cip"] == []
    # alone, a stage-2 run whose stage 1 has not finished is refused before anything starts
    assert sweep.main(["run", PAPER, "--workdir", str(root), "--only", "baseline_stage2"]) == 2
    err = capsys.readouterr().err
    assert "run baseline_stage2 starts from run baseline, which has not finished" in err and not root.exists()
    # SLURM: each stage-2 job depends on its stage-1 job's id (a stand-in submitter numbers the jobs)
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "slurm_submit.py").write_text(
        "import json, sys\nlog = sys.argv[0] + '.log'\nn = len(open(log).readlines()) if __import__('os').path."
        "exists(log) else 0\nopen(log, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\nprint(f'slurm job {100 + n}')\n")
    monkeypatch.setattr(sweep, "LAUNCH", str(launch))
    assert sweep.main(["run", PAPER, "--workdir", str(root), "--backend", "slurm", "--submit-arg=--nodes=2",
                       "--only", "baseline", "no_vqa", "baseline_stage2", "no_vqa_stage2"]) == 0
    calls = [json.loads(line) for line in (launch / "slurm_submit.py.log").read_text().splitlines()]
    heads = [c[:c.index("--")] for c in calls]
    assert heads == [["--nodes=2", "--job-name=llmcxr-baseline"],
                     ["--nodes=2", "--dependency=afterok:100", "--job-name=llmcxr-baseline_stage2"],
                     ["--nodes=2", "--job-name=llmcxr-no_vqa"],
                     ["--nodes=2", "--dependency=afterok:102", "--job-name=llmcxr-no_vqa_stage2"]]
    capsys.readouterr()
    assert sweep.main(["run", PAPER, "--workdir", str(tmp_path / "dry"), "--backend", "slurm", "--dry-run",
                       "--only", "joint_loss", "joint_loss_stage2"]) == 0
    assert "'--dependency=afterok:<joint_loss>'" in capsys.readouterr().out.splitlines()[1]
    # a TPU pod returns at once unless supervised: a stage-2 run submitted with its stage 1 is refused
    assert sweep.main(["run", PAPER, "--workdir", str(tmp_path / "tpu"), "--backend", "tpu", "--dry-run",
                       "--only", "joint_loss", "joint_loss_stage2"]) == 2
    assert "add --submit-arg=supervise" in capsys.readouterr().err
    assert sweep.main(["run", PAPER, "--workdir", str(tmp_path / "tpu"), "--backend", "tpu", "--dry-run",
                       "--submit-arg=supervise", "--only", "joint_loss", "joint_loss_stage2"]) == 0
    # locally, a stage-2 run whose stage 1 failed is not started
    started = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda argv: started.append(argv) or 1)
    assert sweep.main(["run", PAPER, "--workdir", str(tmp_path / "local"), "--only", "joint_loss",
                       "joint_loss_stage2"]) == 1
    assert len(started) == 1 and "joint_loss_stage2 (not started: joint_loss failed)" in capsys.readouterr().err


def test_bad_key_is_one_line_exit_2_before_any_run_dir(tmp_path):
    bad = tmp_path / "bad_sweep.py"
    bad.write_text("def get_sweep():\n    return {'base': 'configs/llmcxr_stage1.py:tiny', "
                   "'runs': {'good': [], 'typo': ['--config.data.packingg=false']}}\n")
    root = tmp_path / "root"
    out = subprocess.run([sys.executable, SWEEP_PY, "run", str(bad), "--workdir", str(root)],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "run typo" in out.stderr and "data.packingg" in out.stderr
    assert not root.exists()
    # a --set key that no run has, and an unknown --only name, fail the same way
    assert sweep.main(["run", TINY, "--workdir", str(root), "--set", "train.stepz=3"]) == 2
    assert sweep.main(["run", TINY, "--workdir", str(root), "--only", "nope"]) == 2
    assert not root.exists()


def test_workdir_of_another_config_is_refused_before_starting(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    (root / "joint_loss").mkdir(parents=True)
    (root / "joint_loss" / "config.json").write_text(json.dumps({"name": "someone_else"}))
    monkeypatch.setattr(sweep.subprocess, "call", lambda argv: pytest.fail("a run started"))
    assert sweep.main(["run", TINY, "--workdir", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run joint_loss" in err and "different config" in err
    assert sorted(os.listdir(root)) == ["joint_loss"]


def test_dry_run_and_a_stand_in_submitter(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    assert sweep.main(["run", TINY, "--workdir", str(root), "--dry-run", "--set", "train.steps=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and not root.exists()
    assert lines[1].endswith(f"-m llmcxr_jax.cli train --config {os.path.join(REPO, 'configs', 'llmcxr_stage1.py')}"
                             f":tiny --workdir {root}/joint_loss --config.train.steps=20 --config.train.log_every=1 "
                             "--config.train.eval_every=10 --config.train.checkpoint_every=10 "
                             "--config.train.steps=3 --config.data.loss=joint")
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "tpu_pod.py").write_text("import json, sys\nopen(sys.argv[0] + '.log', 'a').write("
                                       "json.dumps(sys.argv[1:]) + '\\n')\n")
    monkeypatch.setattr(sweep, "LAUNCH", str(launch))
    assert sweep.main(["run", TINY, "--workdir", str(root), "--backend", "tpu", "--submit-arg=--tpu=pod-1",
                       "--only", "baseline", "no_packing"]) == 0
    calls = [json.loads(line) for line in (launch / "tpu_pod.py.log").read_text().splitlines()]
    assert [c[:5] for c in calls] == [["--tpu=pod-1", "--", "llmcxr", "train", "--config"]] * 2
    assert calls[1][calls[1].index("--workdir") + 1] == str(root / "no_packing")
    assert calls[1][-1] == "--config.data.packing=false"
    assert calls[0][calls[0].index("--config") + 1] == "configs/llmcxr_stage1.py:tiny"  # the job's own checkout
    capsys.readouterr()
    assert sweep.main(["run", TINY, "--workdir", "gs://bucket/sweep", "--backend", "tpu", "--dry-run",
                       "--only", "joint_loss"]) == 0
    assert "-- llmcxr train --config configs/llmcxr_stage1.py:tiny --workdir gs://bucket/sweep/joint_loss " \
        in capsys.readouterr().out
    assert sweep.main(["run", TINY, "--workdir", "gs://bucket/sweep"]) == 2  # local training needs a local root


def test_report_reads_vqgan_metrics_and_refuses_an_empty_root(tmp_path, capsys):
    run = tmp_path / "root" / "no_cip"
    run.mkdir(parents=True)
    lines = [{"step": 0, "eval_l1": 0.5, "eval_psnr": 9.0}, {"step": 25, "total_loss": 1.5, "l1": 0.4},
             {"step": 50, "total_loss": 1.2, "l1": 0.3}, {"step": 50, "eval_l1": 0.3, "eval_psnr": 12.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sweep.main(["report", "--workdir", str(tmp_path / "root")]) == 0
    with open(tmp_path / "root" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert [row[k] for k in ("steps", "final_loss", "final_eval_loss", "min_eval_loss")] == ["50", "1.2", "0.3", "0.3"]
    assert row["tokens_per_s_median"] == ""
    capsys.readouterr()
    assert sweep.main(["report", "--workdir", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err


@pytest.mark.slow  # four training subprocesses; planning, validation and report are tested fast above
def test_tiny_sweep_trains_reports_and_skips_on_rerun(tmp_path, capsys, monkeypatch):
    setup = make_setup(str(tmp_path / "setup"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    root = tmp_path / "sweep"
    argv = ["run", TINY, "--workdir", str(root), *_data_sets(setup), "--set", "train.steps=3",
            "--set", "train.eval_every=3", "--set", "train.checkpoint_every=2"]
    assert sweep.main(argv) == 0
    assert sweep.main(["report", "--workdir", str(root), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["baseline", "joint_loss", "no_packing"]
    for r in rows:
        assert r["steps"] == "3" and 2.0 < float(r["final_loss"]) < 10.0 and float(r["final_eval_loss"]) > 0
        assert float(r["min_eval_loss"]) <= float(r["final_eval_loss"]) and float(r["tokens_per_s_median"]) > 0
    assert rows[1]["overrides"] == "data.loss=joint" and rows[2]["overrides"] == "data.packing=false"
    assert rows[0]["final_loss"] != rows[1]["final_loss"]  # joint loss counts prompt tokens too
    md = (tmp_path / "report" / "runs.md").read_text()
    assert md.startswith("| name | command | steps |") and md.count("\n| ") >= 4
    with Image.open(tmp_path / "report" / "loss_curves.png") as img:
        assert img.size[0] >= 1000 and img.size[1] >= 400
        assert len(img.convert("RGB").getcolors(1 << 16) or []) > 20  # lines, dots and text, not a blank page
    capsys.readouterr()
    # rerun after losing no_packing's final checkpoint: the two finished runs are skipped, the
    # third resumes from its step-2 checkpoint (the configs still match their workdirs)
    shutil.rmtree(root / "no_packing" / "checkpoints" / "3")
    started = []
    real_call = sweep.subprocess.call
    monkeypatch.setattr(sweep.subprocess, "call", lambda a: started.append(a) or real_call(a))
    assert sweep.main(argv) == 0
    assert capsys.readouterr().err.count("skipped") == 2 and len(started) == 1
    assert started[0][started[0].index("--workdir") + 1] == str(root / "no_packing")
    assert sorted(os.listdir(root / "no_packing" / "checkpoints")) == ["2", "3", "tokenizer"]
    with open(root / "no_packing" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-2:] == [3, 3] and steps.count(1) == 1  # resumed at 2, not started over
    monkeypatch.setattr(sweep.subprocess, "call", lambda a: pytest.fail("a finished run started again"))
    assert sweep.main(argv) == 0
