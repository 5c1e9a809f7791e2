"""`llmcxr train` in a subprocess: SIGTERM (TPU preemption) saves a checkpoint and exits 0;
SIGKILL at an arbitrary step, then resume, equals an uninterrupted run bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from lm_run_helpers import STAGE1, make_setup, tiny_config

from llmcxr_jax import checkpoint
from llmcxr_jax.train import lm
from llmcxr_jax.train.metrics import read_metrics

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("sigsetup")))


def _spawn(setup, workdir, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    args = [sys.executable, "-m", "llmcxr_jax.cli", "train", "--config", f"{STAGE1}:tiny", "--workdir", str(workdir),
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


def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    common = ["--config.train.steps=9", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
              "--config.train.eval_every=0"]
    lm.train(tiny_config(setup, *common), str(tmp_path / "straight"), echo=False)
    proc = _spawn(setup, tmp_path / "killed", "--config.train.steps=9", "--config.train.checkpoint_every=2")
    _wait_for_step(proc, str(tmp_path / "killed"), 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    lm.train(tiny_config(setup, *common), str(tmp_path / "killed"), echo=False)
    a, b = _params(str(tmp_path / "straight" / "checkpoints")), _params(str(tmp_path / "killed" / "checkpoints"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    last = {}
    for r in read_metrics(str(tmp_path / "killed" / "metrics.jsonl")):
        if "loss" in r:
            last[r["step"]] = r["loss"]  # re-run steps after the restored checkpoint overwrite
    straight = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "loss" in r}
    assert last == straight
