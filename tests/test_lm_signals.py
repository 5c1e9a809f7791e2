"""`llmcxr train` in a subprocess: SIGTERM (TPU preemption) saves a checkpoint and exits 0;
SIGKILL past a checkpoint, or while an asynchronous save is in flight, then resume, replays the lost
steps and equals an uninterrupted run bit for bit (tests/kill_worker.py freezes the child where the
kill must land). So does a resume past newest checkpoints a bad copy damaged (a flipped byte, a cut file)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from integrity_helpers import cut, flip_silently
from kill_worker import kill_when_frozen
from lm_run_helpers import STAGE1, make_setup, tiny_config

from llmcxr_jax import checkpoint
from llmcxr_jax.train import lm
from llmcxr_jax.train.metrics import read_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("sigsetup")))


def _spawn(setup, workdir, *overrides, freeze=None):
    """freeze: tests/kill_worker.py's environment (KILL_PAUSE_AT_LOG / KILL_HANG_COMMIT, KILL_MARKER)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
               **(freeze or {}))
    entry = [os.path.join(os.path.dirname(__file__), "kill_worker.py")] if freeze else ["-m", "llmcxr_jax.cli"]
    args = [sys.executable, *entry, "train", "--config", f"{STAGE1}:tiny", "--workdir", str(workdir),
            f"--config.data.root={setup['root']}", f"--config.data.codes={setup['codes']}",
            f"--config.data.tokenizer={setup['tokenizer']}", "--config.model.image_codes=64",
            "--config.data.dolly_eval_rows=20", "--config.train.eval_every=0", "--config.train.log_every=1",
            *overrides]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"train exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if os.path.isfile(path) and any(r["step"] >= step for r in read_metrics(path) if "loss" in r):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"train did not reach step {step} in time")


def _params(ckpt_dir):
    loaded = checkpoint.load_lm(ckpt_dir, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                                            ("data", "fsdp", "tensor")))
    return jax.tree.map(np.asarray, nnx.state(loaded.model, nnx.Param).to_pure_dict())


def test_sigterm_saves_and_exits_zero(setup, tmp_path):
    proc = _spawn(setup, tmp_path, "--config.train.steps=500", "--config.train.checkpoint_every=1000")
    _wait_for_step(proc, str(tmp_path), 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] and 2 <= summary["step"] < 500
    saved = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"), keep=5)
    try:
        assert saved.latest_step() == summary["step"]
    finally:
        saved.close()


COMMON = ["--config.train.steps=9", "--config.train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted 9-step run keeping its checkpoints 6, 8 and 9: (final parameters, {step: loss}, workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    lm.train(tiny_config(setup, *COMMON, "--config.train.log_every=1", "--config.train.eval_every=0",
                         "--config.train.keep_checkpoints=3"), str(workdir), echo=False)
    return _params(str(workdir / "checkpoints")), _losses(read_metrics(str(workdir / "metrics.jsonl"))), workdir


def _losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _latest_complete(ckpt_dir):
    saved = checkpoint.TrainCheckpointer(ckpt_dir, keep=5)
    try:
        return saved.latest_step()
    finally:
        saved.close()


def _kill_frozen(setup, workdir, freeze, ready, timeout=300):
    """Run the child until kill_worker.py has frozen it (its marker exists) and ready() holds, then SIGKILL it."""
    marker = os.path.join(workdir, "frozen")
    proc = _spawn(setup, workdir, *COMMON, freeze={**freeze, "KILL_MARKER": marker})
    kill_when_frozen(proc, marker, ready, "train", timeout)


def _resume_replays_and_matches(setup, straight, workdir):
    """Before the resume the newest complete checkpoint is older than the step the child had logged;
    the resume restores it and replays every later step with the uninterrupted run's losses and ends
    with its parameters, bit for bit. Returns (checkpoint restored, step the child had reached)."""
    ckpt_dir, path = str(workdir / "checkpoints"), str(workdir / "metrics.jsonl")
    before = read_metrics(path)
    reached = max(_losses(before))
    saved = _latest_complete(ckpt_dir)
    assert saved is not None and saved < reached, (saved, reached)
    assert _losses(before) == {s: straight[1][s] for s in _losses(before)}
    lm.train(tiny_config(setup, *COMMON, "--config.train.log_every=1", "--config.train.eval_every=0"), str(workdir),
             echo=False)
    resumed = _losses(read_metrics(path)[len(before):])
    assert sorted(resumed) == list(range(saved + 1, 10)) and min(resumed) <= reached  # the lost steps re-ran
    assert resumed == {s: straight[1][s] for s in resumed}
    a, b = straight[0], _params(ckpt_dir)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    return saved, reached


def test_sigkill_past_a_checkpoint_then_resume_equals_an_uninterrupted_run(setup, straight, tmp_path):
    """Killed at step 5 (after step 4's save committed): the resume restores 4 and replays 5..9."""
    ckpt_4 = tmp_path / "checkpoints" / "4"
    _kill_frozen(setup, str(tmp_path), {"KILL_PAUSE_AT_LOG": "5"}, ready=ckpt_4.is_dir)
    assert _resume_replays_and_matches(setup, straight, tmp_path) == (4, 5)


def test_sigkill_during_an_async_save_resumes_from_the_previous_one(setup, straight, tmp_path):
    """Killed while step 4's asynchronous save has written its files but not committed them: orbax's
    temporary directory is ignored, the resume restores step 2 and replays 3..9."""
    ckpt_dir = tmp_path / "checkpoints"

    def step_5_logged():
        path = tmp_path / "metrics.jsonl"
        return path.is_file() and max(_losses(read_metrics(str(path))), default=0) >= 5

    _kill_frozen(setup, str(tmp_path), {"KILL_HANG_COMMIT": "4"}, ready=step_5_logged)
    partial = [p for p in os.listdir(ckpt_dir) if p.startswith("4.") and "tmp" in p]
    assert partial and not (ckpt_dir / "4").exists(), os.listdir(ckpt_dir)
    assert os.listdir(ckpt_dir / partial[0])  # the step's files were written, only the commit was missing
    saved, reached = _resume_replays_and_matches(setup, straight, tmp_path)
    assert saved == 2 and reached >= 5


def test_resume_moves_damaged_newest_steps_aside_and_equals_an_uninterrupted_run(setup, straight, tmp_path, capsys):
    """A copy of the uninterrupted run whose step 9 has a silently flipped byte and step 8 a cut array file:
    the resume names each once, moves them to 9.damaged / 8.damaged (kept, not deleted), restores step 6 and
    replays 7..9 with the uninterrupted run's losses and ends with its parameters, bit for bit."""
    workdir = shutil.copytree(straight[2], tmp_path / "run")
    ckpt_dir = workdir / "checkpoints"
    flip_silently(str(ckpt_dir / "9"))
    cut(str(ckpt_dir / "8"))
    before = read_metrics(str(workdir / "metrics.jsonl"))
    capsys.readouterr()
    lm.train(tiny_config(setup, *COMMON, "--config.train.log_every=1", "--config.train.eval_every=0"), str(workdir),
             echo=False)
    warned = [line for line in capsys.readouterr().err.splitlines() if " is damaged: " in line]
    for step, why in ((9, r"fails its checksum"), (8, r"cannot be read \(file cut short\?\)")):
        pattern = (rf"checkpoint step {step} in {re.escape(str(ckpt_dir))} is damaged: [\w.]+ {why}; moved to "
                   rf"{re.escape(str(ckpt_dir / f'{step}.damaged'))}; resuming from step 6")
        assert sum(bool(re.fullmatch(pattern, line)) for line in warned) == 1, warned
        assert (ckpt_dir / f"{step}.damaged" / "state").is_dir()
    resumed = _losses(read_metrics(str(workdir / "metrics.jsonl"))[len(before):])
    assert resumed == {s: straight[1][s] for s in (7, 8, 9)}
    a, b = straight[0], _params(str(ckpt_dir))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
