"""The production dtype: the tiny LM trained in bfloat16 compute with float32 parameters keeps a
finite, falling loss, keeps its parameters float32, and starts where the float32 run starts."""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from lm_run_helpers import make_setup, tiny_config

from llmcxr_jax import checkpoint
from llmcxr_jax.train import lm
from llmcxr_jax.train.metrics import read_metrics

STEPS = 8
# bf16 keeps 8 significant bits (unit roundoff 2^-9, one ulp 2^-8 of the value). Here bf16 touches
# only the activations; the logits come out float32 (preferred_element_type) and the loss is float32.
# At initialisation the logits are << 1 (initializer_range), so their bf16 errors, a few 2^-8 of a
# small number, move a loss of ~log(vocab) = 6.4 by far less than one bf16 ulp of it: rtol 2^-8.
# Measured: 5e-7. This tells bf16 activations from float32 (asserted unequal below) but is too loose to
# see a softmax on bf16 logits (each token's loss rounded, a uniform 1e-3 shift at init).
BF16_RTOL = 2.0 ** -8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("bf16setup")))


def _run(setup, workdir, dtype):
    cfg = tiny_config(setup, f"--config.model.dtype={dtype}", "--config.model.param_dtype=float32",
                      f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0")
    lm.train(cfg, workdir, echo=False)
    return [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_a_bfloat16_step_trains_float32_parameters(setup, tmp_path):
    f32 = _run(setup, str(tmp_path / "f32"), "float32")
    bf16 = _run(setup, str(tmp_path / "bf16"), "bfloat16")
    assert len(bf16) == STEPS and np.all(np.isfinite(bf16)), bf16
    assert np.mean(bf16[-2:]) < 0.9 * bf16[0], bf16
    np.testing.assert_allclose(bf16[0], f32[0], rtol=BF16_RTOL)
    assert bf16[0] != f32[0]  # the bf16 compute path really ran
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    loaded = checkpoint.load_lm(os.path.join(tmp_path / "bf16", "checkpoints"), mesh)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(loaded.model, nnx.Param).to_pure_dict())}
    assert dtypes == {np.dtype("float32")}, dtypes
