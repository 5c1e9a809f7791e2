"""launch/local_multiprocess.sh: a bad config key fails fast (two real CPU processes training the tiny
config through it: tests/test_lm_multiprocess.py); with a stand-in trainer: one failing process
stops (then kills) the rest, SIGINT is forwarded as SIGTERM, and each process gets its own id, the
coordinator and D devices."""
import os
import re
import signal
import subprocess
import sys
import time

from lm_run_helpers import STAGE1

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def _env(**extra):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # the venv's `llmcxr`
    # the compilation cache conftest.py gives in-process tests, for the trainer processes too
    return dict(os.environ, PATH=path, JAX_DEFAULT_MATMUL_PRECISION="highest",
                JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **extra)


def _train_args(setup, workdir, *more):
    return ["--config", f"{STAGE1}:tiny", "--workdir", workdir, f"--config.data.root={setup['root']}",
            f"--config.data.codes={setup['codes']}", f"--config.data.tokenizer={setup['tokenizer']}",
            "--config.model.image_codes=64", "--config.data.dolly_eval_rows=20", "--config.data.num_shards=2",
            "--config.train.mesh=-1,1,1", "--config.train.steps=3", "--config.train.eval_every=0", *more]


def test_a_bad_config_key_fails_fast(tmp_path):
    """(Real two-process training through this script: tests/test_lm_multiprocess.py.)"""
    setup = {"root": str(tmp_path / "corpus"), "codes": str(tmp_path / "codes"), "tokenizer": str(tmp_path / "tok")}
    start = time.time()
    bad = subprocess.run(["bash", SCRIPT, "2", *_train_args(setup, str(tmp_path / "bad"),
                                                            "--config.train.no_such_key=1")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2 and re.search(r"process [01] exited 2", bad.stderr) and "no_such_key" in bad.stderr
    assert time.time() - start < 120


FAKE = """#!/usr/bin/env bash
echo "id=$LLMCXR_PROCESS_ID n=$LLMCXR_NUM_PROCESSES coord=$LLMCXR_COORDINATOR jax=$JAX_PLATFORMS xla=$XLA_FLAGS args=$*"
trap 'echo got TERM; [ "$FAKE_MODE" = ignore_term ] || exit 0' TERM
touch "$FAKE_DIR/started_$LLMCXR_PROCESS_ID"
if [ "$FAKE_MODE" = one_fails ] || [ "$FAKE_MODE" = ignore_term ]; then
    [ "$LLMCXR_PROCESS_ID" = 1 ] && { sleep 0.3; echo "boom" >&2; exit 7; }
fi
while :; do sleep 0.05; done
"""


def _fake(tmp_path, mode, **extra):
    fake = tmp_path / "fake_llmcxr"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    return _env(LLMCXR_BIN=str(fake), FAKE_DIR=str(tmp_path), FAKE_MODE=mode, LLMCXR_LOG_DIR=str(tmp_path / "logs"),
                **extra)


def _log(tmp_path, i):
    return (tmp_path / "logs" / f"process_{i}.log").read_text()


def test_environment_of_each_process_and_one_failure(tmp_path):
    env = _fake(tmp_path, "one_fails", LLMCXR_DEVICES_PER_PROCESS="3", LLMCXR_COORDINATOR_PORT="23456",
                XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    done = subprocess.run(["bash", SCRIPT, "3", "--config", "c.py:tiny"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 7 and "process 1 exited 7" in done.stderr and "boom" in done.stderr
    for i in (0, 2):
        first, last = _log(tmp_path, i).splitlines()[0], _log(tmp_path, i).splitlines()[-1]
        assert first == (f"id={i} n=3 coord=localhost:23456 jax=cpu "
                         "xla=--xla_cpu_foo=1 --xla_force_host_platform_device_count=3 args=train --config c.py:tiny")
        assert last == "got TERM"  # the survivors were asked to checkpoint and stop


def test_failure_kills_processes_that_ignore_sigterm(tmp_path):
    start = time.time()
    done = subprocess.run(["bash", SCRIPT, "2", "--config", "c.py"], capture_output=True, text=True, timeout=60,
                          env=_fake(tmp_path, "ignore_term", LLMCXR_KILL_GRACE="1"))
    assert done.returncode == 7 and time.time() - start < 20
    assert _log(tmp_path, 0).splitlines()[-1] == "got TERM"


def test_sigint_is_forwarded_as_sigterm(tmp_path):
    # a shell cannot trap a signal ignored when it starts, and a run started in the background (CI
    # under nohup ... &) inherits SIGINT ignored: give the launcher a terminal's default, as Ctrl-C finds it
    proc = subprocess.Popen(["bash", SCRIPT, "2", "--config", "c.py"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_fake(tmp_path, "run"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120  # generous: CI runs this beside compile-heavy tests on 2 cores
    while not all((tmp_path / f"started_{i}").exists() for i in range(2)):
        assert time.time() < deadline and proc.poll() is None, "the stand-in trainers never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # both trainers stopped cleanly (they would have saved a checkpoint)
    assert [_log(tmp_path, i).splitlines()[-1] for i in range(2)] == ["got TERM", "got TERM"]


def test_usage_errors():
    for args in ([], ["0"], ["two"]):
        done = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and done.stderr.startswith("usage: local_multiprocess.sh N")
