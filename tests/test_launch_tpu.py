"""launch/tpu_pod.py: slice sizes, the exact gcloud commands of --dry-run (one slice, and a 2-slice
queued resource), the worker-side scripts run for real under bash (detached launch, state file,
SIGTERM stop), and `supervise` against a fake gcloud first on PATH that preempts the slice (or one
of two slices) once."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.py")
_spec = importlib.util.spec_from_file_location("tpu_pod", SCRIPT)
tpu_pod = sys.modules["tpu_pod"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu_pod)
scripts = sys.modules["tpu_worker_scripts"]  # loaded by tpu_pod from launch/: the shell run on each worker

POD = ["--name", "llmcxr-v4", "--zone", "us-central2-b"]
SOURCE = ["--repo", "https://github.com/example/llmcxr-jax.git", "--commit", "0123abc"]
TRAIN = ["--", "--config", "configs/llmcxr_stage1.py:3b", "--config.data.root=/data/mimic"]
WORKDIR = "gs://bucket/runs/stage1"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("name,gcloud_name,chips,hosts,version", [
    ("v2-8", "v2-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v3-32", "v3-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-16", "v4-16", 8, 2, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-1536", "v4-1536", 768, 192, "tpu-ubuntu2204-base"),
    ("v5p-128", "v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5litepod-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5e-64", "v5litepod-64", 64, 16, "v2-alpha-tpuv5-lite"),
    ("v6e-4", "v6e-4", 4, 1, "v2-alpha-tpuv6e"),
    ("v6e-64", "v6e-64", 64, 16, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_slice_hosts(name, gcloud_name, chips, hosts, version):
    s = tpu_pod.parse_accelerator(name)
    assert (s.accelerator_type, s.chips, s.hosts, s.runtime_version) == (gcloud_name, chips, hosts, version)


@pytest.mark.parametrize("name", ["x", "v7-8", "v4", "v4-31", "v4-96", "v5p-4", "v6e-2", "v5e-512", "v2-64"])
def test_bad_accelerator_types(name):
    with pytest.raises(tpu_pod.LaunchError, match=f"^unknown accelerator type '{name}'"):
        tpu_pod.parse_accelerator(name)


def test_unknown_accelerator_is_one_line_before_any_command(tmp_path):
    fake = _fake_gcloud(tmp_path, states=["READY"], workers=["DONE"], hosts=4)
    done = _cli("supervise", *POD, "--accelerator-type", "x", *SOURCE, "--workdir", WORKDIR, "--poll", "0", *TRAIN,
                env=fake)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("tpu_pod.py: error: unknown accelerator type 'x'; use GENERATION-SIZE")
    assert not os.path.exists(tmp_path / "calls.jsonl")  # gcloud never ran
    done = _cli("create", *POD, "--accelerator-type", "v4-33", "--dry-run")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1


def test_dry_run_create_and_delete():
    def out(*args):
        done = _cli(*args, "--dry-run")
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert out("create", *POD, "--accelerator-type", "v4-32") == (
        "gcloud compute tpus tpu-vm create llmcxr-v4 --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base\n")
    assert out("create", *POD, "--accelerator-type", "v4-32", "--provisioning", "spot") == (
        "gcloud compute tpus tpu-vm create llmcxr-v4 --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot\n")
    assert out("create", *POD, "--accelerator-type", "v4-32", "--provisioning", "queued") == (
        "gcloud compute tpus queued-resources create llmcxr-v4 --node-id=llmcxr-v4 --zone=us-central2-b "
        "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base\n")
    assert out("create", "--name", "llmcxr-v5p", "--zone", "us-east5-a", "--project", "my-proj",
               "--accelerator-type", "v5p-128", "--provisioning", "queued-spot") == (
        "gcloud compute tpus queued-resources create llmcxr-v5p --node-id=llmcxr-v5p --zone=us-east5-a "
        "--project=my-proj --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot\n")
    assert out("create", *POD, "--accelerator-type", "v5e-64", "--version", "v2-alpha-tpuv5-lite") == (
        "gcloud compute tpus tpu-vm create llmcxr-v4 --zone=us-central2-b --accelerator-type=v5litepod-64 "
        "--version=v2-alpha-tpuv5-lite\n")
    assert out("delete", *POD) == "gcloud compute tpus tpu-vm delete llmcxr-v4 --zone=us-central2-b --quiet\n"
    assert out("delete", *POD, "--provisioning", "queued") == (
        "gcloud compute tpus queued-resources delete llmcxr-v4 --zone=us-central2-b --force --quiet\n")
    assert out("status", *POD) == (
        "gcloud compute tpus tpu-vm describe llmcxr-v4 --zone=us-central2-b '--format=value(state)'\n")
    assert out("logs", *POD, "--worker", "3") == (
        "gcloud compute tpus tpu-vm ssh llmcxr-v4 --zone=us-central2-b --worker=3 "
        "'--command=tail -n 100 $HOME/llmcxr_logs/train_worker3.log'\n")


WID = ('wid=${LLMCXR_WORKER_ID:-$(curl -sf --max-time 10 -H Metadata-Flavor:Google '
       'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}; '
       '[ -n "$wid" ] || wid=$(hostname | sed -n "s/.*-w-\\([0-9][0-9]*\\)\\$/\\1/p"); '
       '[ -n "$wid" ] || { echo "cannot tell this TPU worker index" >&2; exit 3; }; ')
SETUP = (
    'set -e; ' + WID +
    'if [ -d "$HOME/llmcxr-jax/.git" ]; then git -C "$HOME/llmcxr-jax" fetch --quiet origin; '
    'else git clone --quiet https://github.com/example/llmcxr-jax.git "$HOME/llmcxr-jax"; fi; '
    'git -C "$HOME/llmcxr-jax" cat-file -e 0123abc^{commit} 2>/dev/null || '
    'git -C "$HOME/llmcxr-jax" fetch --quiet origin 0123abc; '
    'git -C "$HOME/llmcxr-jax" checkout --quiet --detach 0123abc; '
    'if [ ! -x "$HOME/llmcxr-venv/bin/python" ]; then (python3 -m pip install --quiet --user uv || '
    'python3 -m pip install --quiet --user --break-system-packages uv) && "$HOME/.local/bin/uv" venv --seed '
    '--python 3.11 "$HOME/llmcxr-venv"; fi; '
    '"$HOME/llmcxr-venv/bin/python" -m pip install --quiet -c "$HOME/llmcxr-jax/requirements-lock.txt" '
    '-e "$HOME/llmcxr-jax[gcs]" "jax[tpu]"; '
    'echo "llmcxr setup worker=$wid commit=$(git -C "$HOME/llmcxr-jax" rev-parse HEAD)"')
INNER = (
    'exec >>"$HOME/llmcxr_logs/train_worker$WID.log" 2>&1 </dev/null; '
    'echo "=== llmcxr launch $(date -u +%FT%TZ) worker $WID commit $(git -C "$HOME/llmcxr-jax" rev-parse HEAD)"; '
    'cd "$HOME/llmcxr-jax"; export LLMCXR_DISTRIBUTED=tpu; '
    '"$HOME/llmcxr-venv/bin/llmcxr" train --config configs/llmcxr_stage1.py:3b --config.data.root=/data/mimic '
    '--workdir gs://bucket/runs/stage1 & pid=$!; '
    'echo "RUNNING $pid $$" >"$HOME/llmcxr_logs/state_worker$WID.$$" && '
    'mv -f "$HOME/llmcxr_logs/state_worker$WID.$$" "$HOME/llmcxr_logs/state_worker$WID"; wait $pid; rc=$?; '
    'if [ $rc -ne 0 ]; then s=FAILED; elif grep "^{\\"workdir\\"" "$HOME/llmcxr_logs/train_worker$WID.log" | '
    'tail -n 1 | grep -q "\\"preempted\\": true"; then s=STOPPED; else s=DONE; fi; '
    'echo "$s $pid $rc" >"$HOME/llmcxr_logs/state_worker$WID.$$" && '
    'mv -f "$HOME/llmcxr_logs/state_worker$WID.$$" "$HOME/llmcxr_logs/state_worker$WID"; '
    'echo "=== llmcxr exit $rc ($s)"')
RUN = (
    WID +
    '[ "$(git -C "$HOME/llmcxr-jax" rev-parse HEAD)" = "$(git -C "$HOME/llmcxr-jax" rev-parse --verify -q '
    '0123abc^{commit})" ] || { echo "worker $wid: $HOME/llmcxr-jax is not at 0123abc; run setup" >&2; exit 3; }; '
    'mkdir -p "$HOME/llmcxr_logs"; '
    'if [ -f "$HOME/llmcxr_logs/state_worker$wid" ] && read s pid rc <"$HOME/llmcxr_logs/state_worker$wid" && '
    '[ "$s" = RUNNING ] && kill -0 "$pid" 2>/dev/null && grep -qa llmcxr "/proc/$pid/cmdline" 2>/dev/null; then '
    'echo "worker $wid: training already runs (pid $pid); stop it first" >&2; exit 3; fi; '
    'echo "STARTING" >"$HOME/llmcxr_logs/state_worker$wid.$$" && '
    'mv -f "$HOME/llmcxr_logs/state_worker$wid.$$" "$HOME/llmcxr_logs/state_worker$wid"; '
    f"WID=$wid setsid nohup bash -c '{INNER}' >/dev/null 2>&1 </dev/null & "
    'echo "llmcxr run worker=$wid log=$HOME/llmcxr_logs/train_worker$wid.log"')


def _ssh_line(name, zone, script):
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", "--worker=all",
                       f"--command={script}"]) + "\n"


def test_dry_run_setup_and_run_v4_32():
    done = _cli("setup", *POD, *SOURCE, "--dry-run")
    assert done.returncode == 0 and done.stdout == _ssh_line("llmcxr-v4", "us-central2-b", SETUP)
    done = _cli("run", *POD, "--commit", "0123abc", "--workdir", WORKDIR, "--dry-run", *TRAIN)
    assert done.returncode == 0 and done.stdout == _ssh_line("llmcxr-v4", "us-central2-b", RUN)
    # a whole `llmcxr train ... --workdir W` command after `--` (what launch/sweep.py passes) is the same run
    done = _cli("run", *POD, "--commit", "0123abc", "--dry-run", "--", "llmcxr", "train", "--config",
                "configs/llmcxr_stage1.py:3b", "--workdir", WORKDIR, "--config.data.root=/data/mimic")
    assert done.returncode == 0 and done.stdout == _ssh_line("llmcxr-v4", "us-central2-b", RUN)


def test_dry_run_supervise_v5p_128():
    done = _cli("supervise", "--name", "llmcxr-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-128",
                "--provisioning", "spot", *SOURCE, "--workdir", WORKDIR, "--poll", "30", "--dry-run", *TRAIN)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm create llmcxr-v5p --zone=us-east5-a --accelerator-type=v5p-128 "
                        "--version=v2-alpha-tpuv5 --spot")
    assert lines[1] + "\n" == _ssh_line("llmcxr-v5p", "us-east5-a", SETUP)
    assert lines[2] + "\n" == _ssh_line("llmcxr-v5p", "us-east5-a", RUN)
    assert lines[3] == "# then every 30 s until all 16 workers are DONE:"
    assert lines[4] == "gcloud compute tpus tpu-vm describe llmcxr-v5p --zone=us-east5-a '--format=value(state)'"
    assert lines[5].startswith("gcloud compute tpus tpu-vm ssh llmcxr-v5p --zone=us-east5-a --worker=all '--command=")
    assert lines[7] == "gcloud compute tpus tpu-vm delete llmcxr-v5p --zone=us-east5-a --quiet"
    assert len(lines) == 8


def test_missing_options_are_one_line():
    done = _cli("run", *POD, "--dry-run", *TRAIN)
    assert (done.returncode, done.stderr) == (2, "tpu_pod.py: error: run needs --workdir\n")
    done = _cli("run", *POD, "--workdir", WORKDIR, "--dry-run")
    assert done.returncode == 2 and "training arguments after `--`" in done.stderr
    done = _cli("setup", *POD, "--repo", "r", "--commit", "main", "--dry-run")
    assert done.returncode == 2 and "must be a commit SHA" in done.stderr


MULTI = ["--name", "llmcxr-ms", "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--provisioning",
         "queued-spot", "--num-slices", "2"]


def test_dry_run_two_slices():
    """One queued resource of 2 nodes named by its prefix; every other step runs on each node in turn."""
    def out(*args):
        cut = args.index("--") if "--" in args else len(args)
        done = _cli(*args[:cut], "--dry-run", *args[cut:])
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert out("create", *MULTI) == [
        "gcloud compute tpus queued-resources create llmcxr-ms --node-count=2 --node-prefix=llmcxr-ms "
        "--zone=us-east5-a --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot"]
    assert out("delete", *MULTI) == [
        "gcloud compute tpus queued-resources delete llmcxr-ms --zone=us-east5-a --force --quiet"]
    assert out("status", *MULTI) == [
        f"gcloud compute tpus tpu-vm describe llmcxr-ms-{i} --zone=us-east5-a '--format=value(state)'" for i in (0, 1)]
    assert out("logs", *MULTI, "--slice", "1", "--worker", "3") == [
        "gcloud compute tpus tpu-vm ssh llmcxr-ms-1 --zone=us-east5-a --worker=3 "
        "'--command=tail -n 100 $HOME/llmcxr_logs/train_worker3.log'"]
    lines = out("supervise", *MULTI, *SOURCE, "--workdir", WORKDIR, *TRAIN)
    argv = [shlex.split(line) for line in lines if line.startswith("gcloud")]
    assert [(a[3], a[4]) for a in argv] == [("queued-resources", "create")] + [("tpu-vm", "ssh")] * 4 + \
        [("tpu-vm", "describe")] * 2 + [("tpu-vm", "ssh")] * 2 + [("queued-resources", "delete")]
    setup, run, poll = argv[1:3], argv[3:5], argv[7:9]
    assert [a[5] for a in setup + run + argv[5:7] + poll] == ["llmcxr-ms-0", "llmcxr-ms-1"] * 4
    assert all(a[7] == "--worker=all" for a in setup + run + poll)
    assert setup[0][6:] == setup[1][6:] and run[0][6:] == run[1][6:]  # every slice runs the same command
    train = f"--config.data.root=/data/mimic --config.train.num_slices=2 --workdir {WORKDIR} &"
    assert train in run[0][-1]  # the trainer's mesh spans both slices
    assert lines[5] == "# then every 60 s until all 32 workers of 2 slices are DONE:"
    assert lines[10].startswith("# when any node is PREEMPTED / TERMINATED or gone (at most 10 times), delete and "
                                "recreate the whole queued resource")
    # an override that already says 2 is kept as it is, not added twice
    again = out("run", *MULTI, "--workdir", WORKDIR, *TRAIN, "--config.train.num_slices=2")
    assert [line.count("--config.train.num_slices=2") for line in again] == [1, 1]
    done = _cli("logs", *MULTI, "--slice", "2", "--worker", "0", "--dry-run")
    assert (done.returncode, done.stderr) == (2, "tpu_pod.py: error: --slice 2 is not a slice of this job: give 0 "
                                                 "to 1\n")


@pytest.mark.parametrize("args, message", [
    (["--provisioning", "spot", "--num-slices", "2"], "--num-slices 2 needs --provisioning queued or queued-spot"),
    (["--provisioning", "queued", "--num-slices", "0"], "--num-slices must be at least 1, got 0"),
    (["--provisioning", "queued", "--num-slices", "2", *TRAIN, "--config.train.num_slices=4"],
     "the command's --config.train.num_slices=4 differs from --num-slices 2"),
    ([*TRAIN, "--config.train.num_slices=2"], "the command's --config.train.num_slices=2 differs from --num-slices 1"),
])
def test_bad_slice_counts_are_one_line(args, message):
    cut = args.index("--") if "--" in args else len(args)
    done = _cli("run", *POD, "--workdir", WORKDIR, *args[:cut], "--dry-run", *(args[cut:] or TRAIN))
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tpu_pod.py: error: {message}")


# ---------------------------------------------------------------- worker-side scripts under bash

FAKE_LLMCXR = """#!/usr/bin/env bash
echo "$LLMCXR_DISTRIBUTED $PWD $*" > "$HOME/argv"
case "$FAKE_MODE" in
  done) echo '{"workdir": "w", "step": 3, "preempted": false}' ;;
  fail) echo "llmcxr train: error: bad key" >&2; exit 2 ;;
  wait) trap 'echo "{\\"workdir\\": \\"w\\", \\"step\\": 1, \\"preempted\\": true}"; exit 0' TERM
        touch "$HOME/trap_set"; while :; do sleep 0.05; done ;;
  stuck) trap '' TERM
        touch "$HOME/trap_set"; while :; do sleep 0.05; done ;;
esac
"""


def _worker_home(tmp_path):
    home = tmp_path / "home"
    (home / "llmcxr-jax").mkdir(parents=True)
    (home / "llmcxr-venv" / "bin").mkdir(parents=True)
    fake = home / "llmcxr-venv" / "bin" / "llmcxr"
    fake.write_text(FAKE_LLMCXR)
    fake.chmod(0o755)
    return home


def _bash(script, home, **env):
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HOME=str(home), LLMCXR_WORKER_ID="2", **env))


def _wait_running(home):
    """Until the detached fake trainer runs and has set its SIGTERM trap (a TERM sent before the trap
    is set would kill it at once, as it would a real trainer that is still importing)."""
    for _ in range(400):
        if (home / "trap_set").exists() and \
                _bash(scripts.poll_script(), home).stdout.strip() == "llmcxr-state worker=2 RUNNING":
            return
        time.sleep(0.05)
    raise AssertionError("the detached trainer never reported RUNNING")


def _settled(home):
    for _ in range(400):
        out = _bash(scripts.poll_script(), home).stdout.strip()
        if " RUNNING" not in out and " STARTING" not in out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"worker still running: {out}")


def test_worker_run_records_done(tmp_path):
    home = _worker_home(tmp_path)
    run = scripts.run_script("train", ["--config", "c.py:tiny"], "/runs/a b")
    done = _bash(run, home, FAKE_MODE="done")
    assert done.returncode == 0 and "llmcxr run worker=2" in done.stdout, done.stderr
    assert _settled(home) == "llmcxr-state worker=2 DONE rc=0"
    assert (home / "argv").read_text() == f"tpu {home}/llmcxr-jax train --config c.py:tiny --workdir /runs/a b\n"
    log = (home / "llmcxr_logs" / "train_worker2.log").read_text()
    assert '"preempted": false' in log and "=== llmcxr exit 0 (DONE)" in log


def test_worker_stop_failure_and_lost(tmp_path):
    home = _worker_home(tmp_path)
    run = scripts.run_script("train", ["--config", "c.py:tiny"], "/runs/a")
    assert _bash(run, home, FAKE_MODE="wait").returncode == 0
    _wait_running(home)
    again = _bash(run, home, FAKE_MODE="wait")  # never two trainers on one worker
    assert again.returncode == 3 and "training already runs" in again.stderr
    stop = _bash(scripts.stop_script(20), home)
    assert stop.returncode == 0 and "llmcxr stop worker=2 pid=" in stop.stdout
    assert _settled(home) == "llmcxr-state worker=2 STOPPED rc=0"  # SIGTERM: saved early, not done
    assert _bash(run, home, FAKE_MODE="fail").returncode == 0
    assert _settled(home) == "llmcxr-state worker=2 FAILED rc=2"
    (home / "llmcxr_logs" / "state_worker2").write_text(f"RUNNING {2**22 + 12345}\n")  # the pid died with the VM
    assert _bash(scripts.poll_script(), home).stdout == "llmcxr-state worker=2 LOST\n"
    assert "nothing running" in _bash(scripts.stop_script(1), home).stdout
    (home / "llmcxr_logs" / "state_worker2").write_text(f"RUNNING {os.getpid()}\n")  # a pid, but not a trainer
    assert _bash(scripts.poll_script(), home).stdout == "llmcxr-state worker=2 LOST\n"
    assert "nothing running" in _bash(scripts.stop_script(1), home).stdout
    # the trainer has exited but its wrapper is still recording why: RUNNING for a moment more, not LOST
    wrapper = subprocess.Popen(["bash", "-c", "sleep 30; exit 0 # llmcxr wrapper"])
    try:
        (home / "llmcxr_logs" / "state_worker2").write_text(f"RUNNING {2**22 + 12345} {wrapper.pid}\n")
        assert _bash(scripts.poll_script(), home).stdout == "llmcxr-state worker=2 RUNNING\n"
    finally:
        wrapper.kill()
        wrapper.wait()
    assert _bash(scripts.poll_script(), home).stdout == "llmcxr-state worker=2 LOST\n"


def test_worker_stop_kills_a_trainer_that_ignores_sigterm(tmp_path):
    home = _worker_home(tmp_path)
    assert _bash(scripts.run_script("train", ["--config", "c.py"], "/runs/a"), home, FAKE_MODE="stuck").returncode == 0
    _wait_running(home)
    stop = _bash(scripts.stop_script(1), home)
    assert stop.returncode == 0 and "killed after 1 s" in stop.stdout
    assert _settled(home) == "llmcxr-state worker=2 FAILED rc=137"


def test_a_poll_never_reads_a_half_written_state(tmp_path):
    """Every state change renames a finished file into place. `echo ... >state` truncates first, and a
    poll in that moment printed a bare `llmcxr-state worker=2` (once in CI): 2000 writes against 2000
    reads of the poll's own `read` must give no empty state."""
    state = f"{scripts.LOG_DIR}/state_worker$wid"
    wrapper_state = state.replace("$wid", "$WID")  # the detached wrapper's name for the same file
    run = scripts.run_script("train", [], "/w")
    inner = shlex.split(run.split("bash -c ", 1)[1])[0]  # the detached wrapper's own script
    assert scripts._write_state("STARTING", state) in run and f'>"{state}"' not in run
    for text in ("RUNNING $pid $$", "$s $pid $rc"):
        assert scripts._write_state(text, wrapper_state) in inner
    assert f'>"{wrapper_state}"' not in inner
    home = _worker_home(tmp_path)
    (home / "llmcxr_logs").mkdir()
    race = scripts._script(
        "wid=2", f'echo "RUNNING 1 2" >"{state}"',
        f'( for i in $(seq 2000); do {scripts._write_state("RUNNING 1 2", state)}; done ) &',
        "empty=0", f'for i in $(seq 2000); do s=; read s pid rc <"{state}"; [ -n "$s" ] || empty=$((empty+1)); done',
        "wait", 'echo "empty=$empty"')
    assert _bash(race, home).stdout == "empty=0\n"


def test_a_poll_between_the_wrappers_last_write_and_its_exit_is_not_lost(tmp_path):
    """The poll reads RUNNING; before it checks the pids, the wrapper records FAILED and exits. A `kill`
    that does exactly that at the first liveness check makes the moment certain: the poll must report the
    recorded exit, not LOST (this happened in the SIGKILL test once the state write became a rename)."""
    home = _worker_home(tmp_path)
    state = home / "llmcxr_logs" / "state_worker2"
    state.parent.mkdir()
    state.write_text("RUNNING 4194305 4194306\n")  # neither pid exists
    wrapper_exits = (f'kill() {{ [ -e "{state}.done" ] || '
                     f'{{ echo "FAILED 4194305 137" >"{state}"; : >"{state}.done"; }}; return 1; }}; ')
    assert _bash(wrapper_exits + scripts.poll_script(), home).stdout == "llmcxr-state worker=2 FAILED rc=137\n"
    state.write_text("RUNNING 4194305 4194306\n")  # nobody changes it: LOST
    assert _bash(scripts.poll_script(), home).stdout == "llmcxr-state worker=2 LOST\n"


# ---------------------------------------------------------------- supervise against a fake gcloud

FAKE_GCLOUD = """#!{python}
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")

def pop(name, node):  # the next answer (the node's own list when it has one); the last one repeats
    path = os.path.join(d, f"{{name}}.{{node}}")
    if not os.path.exists(path):
        path = os.path.join(d, name)
    lines = open(path).read().splitlines()
    if len(lines) > 1:
        open(path, "w").write("\\n".join(lines[1:]) + "\\n")
    return lines[0]

if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    state = pop("states", args[4])
    if state == "NOT_FOUND":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found", file=sys.stderr)
        sys.exit(1)
    print(state)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    state = pop("qr_states", args[4])
    if state == "NOT_FOUND":
        print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    print(state)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "llmcxr-state" in args[-1]:
    state = pop("workers", args[4])
    for w in range(int(os.environ["FAKE_HOSTS"])):
        rc = {{"DONE": " rc=0", "FAILED": " rc=1"}}.get(state, "")
        print(f"llmcxr-state worker={{w}} {{state}}{{rc}}")
"""


def _fake_gcloud(tmp_path, states, workers, hosts, qr_states=("NOT_FOUND",), nodes=None):
    """A gcloud first on PATH answering describe / queued-resources describe / poll from these lists in
    turn (per node: `nodes` maps a node name to its own (states, workers)); `hosts` workers per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "workers").write_text("\n".join(workers) + "\n")
    (tmp_path / "qr_states").write_text("\n".join(qr_states) + "\n")
    for node, (node_states, node_workers) in (nodes or {}).items():
        (tmp_path / f"states.{node}").write_text("\n".join(node_states) + "\n")
        (tmp_path / f"workers.{node}").write_text("\n".join(node_workers) + "\n")
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(tmp_path),
                FAKE_HOSTS=str(hosts))


def _calls(tmp_path):
    def label(argv):
        if argv[3] == "ssh":
            script = argv[-1]
            return ("setup" if "pip install" in script else "run" if "setsid nohup" in script
                    else "poll" if "llmcxr-state" in script else "stop" if "kill -TERM" in script else "ssh?")
        return ("qr-" if argv[2] == "queued-resources" else "") + argv[3]

    with open(tmp_path / "calls.jsonl") as f:
        calls = [json.loads(line) for line in f]
    return [label(c) for c in calls], calls


def test_supervise_recreates_after_preemption(tmp_path):
    env = _fake_gcloud(tmp_path, ["NOT_FOUND", "READY", "READY", "PREEMPTED", "READY", "READY"],
                       ["RUNNING", "DONE"], hosts=4)
    done = _cli("supervise", *POD, "--accelerator-type", "v4-32", "--provisioning", "spot", *SOURCE,
                "--workdir", WORKDIR, "--poll", "0", "--max-restarts", "2", *TRAIN, env=env)
    assert done.returncode == 0, done.stderr
    labels, calls = _calls(tmp_path)
    assert labels == ["describe", "create", "describe", "setup", "run",  # bring-up
                      "describe", "poll",  # running
                      "describe", "delete", "create", "describe", "setup", "run",  # preempted: recreate, relaunch
                      "describe", "poll"]  # all DONE
    creates = [c for c, lab in zip(calls, labels) if lab == "create"]
    runs = [c for c, lab in zip(calls, labels) if lab == "run"]
    assert creates[0] == creates[1] and "--spot" in creates[0]
    assert runs[0] == runs[1]  # the same command, so the relaunch resumes from the same workdir
    assert f"--workdir {WORKDIR}" in runs[0][-1] and "LLMCXR_DISTRIBUTED=tpu" in runs[0][-1]
    assert [c for c, lab in zip(calls, labels) if lab == "delete"] == [
        ["compute", "tpus", "tpu-vm", "delete", "llmcxr-v4", "--zone=us-central2-b", "--quiet"]]
    assert "node PREEMPTED; restart 1/2" in done.stdout and "finished: all 4 workers DONE" in done.stdout


def test_supervise_relaunches_a_failed_worker_then_gives_up(tmp_path):
    env = _fake_gcloud(tmp_path, ["READY"], ["NONE", "FAILED"], hosts=4)
    done = _cli("supervise", *POD, "--accelerator-type", "v4-32", *SOURCE, "--workdir", WORKDIR, "--poll", "0",
                "--max-restarts", "1", *TRAIN, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("giving up after 1 restarts (--max-restarts)")
    labels, _ = _calls(tmp_path)
    assert labels == ["describe", "poll", "setup", "run",  # the node exists, nothing runs: set up and start
                      "describe", "poll", "stop", "run",  # worker 0 FAILED: stop the rest, relaunch
                      "describe", "poll"]  # FAILED again: out of restarts


def test_supervise_attaches_to_a_running_job(tmp_path):
    env = _fake_gcloud(tmp_path, ["READY"], ["RUNNING", "RUNNING", "DONE"], hosts=16)
    done = _cli("supervise", "--name", "p", "--zone", "z", "--accelerator-type", "v5p-128", *SOURCE,
                "--workdir", WORKDIR, "--poll", "0", *TRAIN, env=env)
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path)[0] == ["describe", "poll", "describe", "poll", "describe", "poll"]
    assert "finished: all 16 workers DONE" in done.stdout


def test_supervise_waits_for_a_queued_resource(tmp_path):
    env = _fake_gcloud(tmp_path, ["NOT_FOUND", "NOT_FOUND", "READY", "READY"], ["DONE"], hosts=4,
                       qr_states=["NOT_FOUND", "WAITING_FOR_RESOURCES"])
    done = _cli("supervise", *POD, "--accelerator-type", "v4-32", "--provisioning", "queued-spot", *SOURCE,
                "--workdir", WORKDIR, "--poll", "0", *TRAIN, env=env)
    assert done.returncode == 0, done.stderr
    labels, calls = _calls(tmp_path)
    assert labels == ["describe", "qr-describe", "qr-create",  # no node, no request: queue one
                      "describe", "qr-describe",  # WAITING_FOR_RESOURCES
                      "describe", "setup", "run", "describe", "poll"]
    assert calls[2] == ["compute", "tpus", "queued-resources", "create", "llmcxr-v4", "--node-id=llmcxr-v4",
                        "--zone=us-central2-b", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                        "--spot"]
    assert "queued resource WAITING_FOR_RESOURCES; waiting" in done.stdout


def test_supervise_two_slices_recreates_the_queued_resource_when_one_is_preempted(tmp_path):
    ms = ["llmcxr-ms-0", "llmcxr-ms-1"]
    env = _fake_gcloud(tmp_path, [], [], hosts=2, nodes={
        ms[0]: (["NOT_FOUND", "READY"], ["RUNNING", "DONE"]),
        ms[1]: (["NOT_FOUND", "READY", "READY", "PREEMPTED", "READY"], ["RUNNING", "DONE"])})
    done = _cli("supervise", "--name", "llmcxr-ms", "--zone", "us-east5-a", "--accelerator-type", "v4-16",
                "--provisioning", "queued-spot", "--num-slices", "2", *SOURCE, "--workdir", WORKDIR, "--poll", "0",
                *TRAIN, env=env)
    assert done.returncode == 0, done.stderr
    labels, calls = _calls(tmp_path)
    each = lambda step: [step, step]  # noqa: E731 (one call per node)
    assert labels == [*each("describe"), "qr-describe", "qr-create",  # no nodes, no request: queue one
                      *each("describe"), *each("setup"), *each("run"),  # both READY: set up, start
                      *each("describe"), *each("poll"),  # running
                      *each("describe"), "qr-delete", "qr-create",  # slice 1 PREEMPTED: recreate all of it
                      *each("describe"), *each("setup"), *each("run"),
                      *each("describe"), *each("poll")]  # all DONE
    nodes = [c[4] for c, lab in zip(calls, labels) if lab in ("describe", "setup", "run", "poll")]
    assert nodes == ms * (len(nodes) // 2)
    creates = [c for c, lab in zip(calls, labels) if lab == "qr-create"]
    assert creates[0] == creates[1] == [
        "compute", "tpus", "queued-resources", "create", "llmcxr-ms", "--node-count=2", "--node-prefix=llmcxr-ms",
        "--zone=us-east5-a", "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    runs = [c for c, lab in zip(calls, labels) if lab == "run"]
    assert all(r[-1] == runs[0][-1] and "--config.train.num_slices=2" in r[-1] for r in runs)
    assert "node PREEMPTED; restart 1/10" in done.stdout
    assert "finished: all 4 workers of 2 slices DONE" in done.stdout


def test_supervise_restarts_every_slice_when_one_worker_fails(tmp_path):
    env = _fake_gcloud(tmp_path, ["READY"], ["RUNNING"], hosts=2,
                       nodes={"p-1": (["READY"], ["RUNNING", "FAILED", "RUNNING", "DONE"]), "p-0": (["READY"],
                              ["RUNNING", "RUNNING", "RUNNING", "DONE"])})
    done = _cli("supervise", "--name", "p", "--zone", "z", "--accelerator-type", "v4-16", "--provisioning", "queued",
                "--num-slices", "2", *SOURCE, "--workdir", WORKDIR, "--poll", "0", *TRAIN, env=env)
    assert done.returncode == 0, done.stderr
    labels, _ = _calls(tmp_path)
    assert labels == ["describe", "describe", "poll", "poll",  # attached to a running job
                      "describe", "describe", "poll", "poll", "stop", "stop", "run", "run",  # slice 1 failed
                      "describe", "describe", "poll", "poll", "describe", "describe", "poll", "poll"]
    assert "slice 1 worker 0 FAILED (exit 1); see `tpu_pod.py logs --slice 1 --worker 0`; restart 1/10" in done.stdout


def test_status_of_two_slices_names_each_node_and_worker(tmp_path):
    env = _fake_gcloud(tmp_path, [], [], hosts=2, nodes={"p-0": (["READY"], ["RUNNING"]), "p-1": (["READY"], ["DONE"])})
    done = _cli("status", "--name", "p", "--zone", "z", "--provisioning", "queued", "--num-slices", "2", "--workers",
                env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["p-0: READY", "p-1: READY", "slice 0 worker 0: RUNNING",
                                        "slice 0 worker 1: RUNNING", "slice 1 worker 0: DONE (exit 0)",
                                        "slice 1 worker 1: DONE (exit 0)"]


def test_docs_show_the_dry_run_the_script_prints():
    """docs/training.md's `supervise --dry-run` block is this script's output for the command shown above it."""
    readme = open(os.path.join(ROOT, "docs", "training.md")).read()
    head, tail = readme.split("Here is the output of the same `supervise` command with `--dry-run` added:", 1)
    command = head[head.rindex("python launch/tpu_pod.py supervise"):].split("\n")
    lines = []
    for line in command:
        lines.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    args = shlex.split(" ".join(lines))[2:]
    cut = args.index("--")
    shown = tail.split("```\n", 2)[1]
    done = _cli(*args[:cut], "--dry-run", *args[cut:])
    assert done.returncode == 0, done.stderr
    assert shown == done.stdout
