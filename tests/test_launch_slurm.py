"""launch/slurm_submit.py builds the exact sbatch command; launch/slurm_gpu.sbatch runs under bash
with a fake srun / scontrol first on PATH: what it executes, and how SIGUSR1 (time limit near)
checkpoints, requeues and resumes while SIGTERM does not requeue."""
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SUBMIT = os.path.join(ROOT, "launch", "slurm_submit.py")
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _submit(*args):
    return subprocess.run([sys.executable, SUBMIT, *args], capture_output=True, text=True, timeout=60)


def test_sbatch_command_for_two_nodes():
    done = _submit("--nodes", "2", "--partition", "gpu", "--account", "proj", "--time", "24:00:00",
                   "--workdir", "/shared/runs/s1", "--dry-run", "--", "--config", "configs/llmcxr_stage1.py:3b",
                   "--config.data.root=/shared/mimic")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "sbatch --parsable --job-name=llmcxr --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu "
        f"--account=proj --time=24:00:00 --signal=B:USR1@120 --export=ALL,WORKDIR=/shared/runs/s1 {SBATCH} "
        "--config configs/llmcxr_stage1.py:3b --config.data.root=/shared/mimic\n")
    # one process per node, 4 GPUs each; a whole `llmcxr train-vqgan ... --workdir W` command (launch/sweep.py)
    done = _submit("--nodes", "2", "--gpus-per-node", "4", "--per", "node", "--job-name", "vq", "--signal-lead", "300",
                   "--dependency", "afterok:41:42", "--dry-run", "--", "llmcxr", "train-vqgan",
                   "--config", "configs/vqgan_f16_1024.py:tiny",
                   "--workdir", "/shared/runs/vq")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "sbatch --parsable --job-name=vq --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --dependency=afterok:41:42 "
        "--signal=B:USR1@300 "
        f"--export=ALL,WORKDIR=/shared/runs/vq,LLMCXR_COMMAND=train-vqgan {SBATCH} "
        "--config configs/vqgan_f16_1024.py:tiny\n")


def test_submit_errors_are_one_line():
    done = _submit("--nodes", "2", "--dry-run", "--", "--config", "c.py")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("slurm_submit.py: error: give --workdir")
    done = _submit("--nodes", "2", "--workdir", "/a,b", "--dry-run", "--", "--config", "c.py")
    assert done.returncode == 2 and "without commas" in done.stderr and done.stderr.count("\n") == 1
    done = _submit("--nodes", "1", "--workdir", "/w", "--dependency", "after ok", "--dry-run", "--", "--config", "c.py")
    assert done.returncode == 2 and "such as afterok:123:456" in done.stderr and done.stderr.count("\n") == 1


def test_sbatch_directives():
    with open(SBATCH) as f:
        lines = f.read().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    # SLURM stops reading #SBATCH lines at the first command
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert directives == ["--job-name=llmcxr", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue",
                          "--signal=B:USR1@120", "--open-mode=append", "--output=%x-%j.out"]
    body = "\n".join(lines[first_command:])
    assert re.search(r"^trap .*requeue=1.* USR1$", body, re.M)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body
    assert 'srun --kill-on-bad-exit=1 llmcxr "$COMMAND" "$@" --workdir "$WORKDIR" &' in body
    assert "jax.distributed.initialize" not in body and "--coordinator" not in body  # distributed.py does that


FAKE_SRUN = """#!/usr/bin/env bash
{ echo "$*"; echo "XLA_FLAGS=$XLA_FLAGS"; echo "COORDINATOR=${LLMCXR_COORDINATOR:-}"; } > "$FAKE_DIR/srun"
case "$FAKE_SRUN" in
  ok) exit 0 ;;
  fail) exit 3 ;;
  wait) trap 'echo TERM >> "$FAKE_DIR/srun"; exit 0' TERM
        touch "$FAKE_DIR/started"
        while :; do sleep 0.05; done ;;
esac
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol"
"""


def _env(tmp_path, mode, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_SRUN=mode,
                      WORKDIR="/shared/runs/s1", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
                      SLURM_RESTART_COUNT="0", LLMCXR_COORDINATOR="stale:1") | extra


def _batch(tmp_path, mode, **extra):
    return subprocess.run(["bash", SBATCH, "--config", "c.py:3b", "--config.train.steps=10"], capture_output=True,
                          text=True, timeout=60, env=_env(tmp_path, mode, **extra))


def test_batch_body_runs_srun(tmp_path):
    done = _batch(tmp_path, "ok")
    assert done.returncode == 0, done.stderr
    args, xla, coordinator = (tmp_path / "srun").read_text().splitlines()
    assert args == ("--kill-on-bad-exit=1 llmcxr train --config c.py:3b --config.train.steps=10 "
                    "--workdir /shared/runs/s1")
    assert xla.startswith("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined")
    assert coordinator == "COORDINATOR="  # left to SLURM detection
    assert not (tmp_path / "scontrol").exists()
    done = _batch(tmp_path, "ok", XLA_FLAGS="", LLMCXR_COMMAND="train-vqgan")
    assert (tmp_path / "srun").read_text().splitlines()[:2] == [
        "--kill-on-bad-exit=1 llmcxr train-vqgan --config c.py:3b --config.train.steps=10 --workdir /shared/runs/s1",
        "XLA_FLAGS="]


def test_batch_failure_and_missing_workdir(tmp_path):
    done = _batch(tmp_path, "fail")
    assert done.returncode == 3 and not (tmp_path / "scontrol").exists()
    env = _env(tmp_path, "ok")
    del env["WORKDIR"]
    done = subprocess.run(["bash", SBATCH, "--config", "c.py"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "set WORKDIR" in done.stderr


def _signalled(tmp_path, sig, **extra):
    proc = subprocess.Popen(["bash", SBATCH, "--config", "c.py:3b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(tmp_path, "wait", **extra))
    for _ in range(400):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("fake srun never started")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_usr1_checkpoints_then_requeues(tmp_path):
    rc, out, err = _signalled(tmp_path, signal.SIGUSR1)
    assert rc == 0, err
    assert (tmp_path / "srun").read_text().splitlines()[-1] == "TERM"  # the trainers were asked to checkpoint
    assert (tmp_path / "scontrol").read_text() == "requeue 77\n"
    assert "requeueing 77; it resumes from /shared/runs/s1" in out


def test_term_does_not_requeue_and_requeues_are_capped(tmp_path):
    rc, _, err = _signalled(tmp_path, signal.SIGTERM)
    assert rc == 0, err
    assert (tmp_path / "srun").read_text().splitlines()[-1] == "TERM"
    assert not (tmp_path / "scontrol").exists()
    (tmp_path / "started").unlink()
    rc, _, err = _signalled(tmp_path, signal.SIGUSR1, SLURM_RESTART_COUNT="20")
    assert rc == 1 and "not requeueing" in err and not (tmp_path / "scontrol").exists()


def test_xla_gpu_flags_exist_in_the_installed_jaxlib():
    """XLA aborts on an unknown flag in XLA_FLAGS, whatever the backend, so CPU start-up checks the names."""
    with open(SBATCH) as f:
        text = f.read()
    block = text[text.index("XLA_GPU_FLAGS=("):text.index("\n)", text.index("XLA_GPU_FLAGS=("))]
    flags = re.findall(r"^\s+(--xla_\S+)", block, re.M)
    assert len(flags) == 6
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float((jnp.ones(2) * 2).sum()))"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "4.0", done.stderr[-500:]
