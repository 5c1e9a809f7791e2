"""Weight decay reaches the parameters HF Trainer decays (LLM-CXR trained with it; the demo uses 0.1):
every parameter but biases and LayerNorm scales / biases, embeddings included, scanned or not."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_gpt_neox_features import tiny

from llmcxr_jax.models.gpt_neox import GPTNeoXForCausalLM, LayerNorm
from llmcxr_jax.train import optim

LR, WD = 0.5, 0.1


def _hf_decays(model: nnx.Module) -> set[str]:
    """The names HF Trainer.get_decay_parameter_names picks: not inside a LayerNorm module, not a bias.
    LayerNorms are found by module type here, not by the names optim.py matches."""
    norms = {"/".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, LayerNorm)}
    assert norms, "the model has LayerNorm modules"
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]:
        name = optim.path_name(path)
        if name.rsplit("/", 1)[-1] != "bias" and name.rsplit("/", 1)[0] not in norms:
            names.add(name)
    return names


@pytest.mark.parametrize("scan", [False, True])
def test_one_adamw_step_with_zero_gradients_decays_exactly_the_hf_set(scan):
    model = GPTNeoXForCausalLM(tiny(scan_layers=scan, num_layers=2), nnx.Rngs(0))
    params = jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param).to_pure_dict())  # biases start at 0
    t = ml_collections.ConfigDict(dict(learning_rate=LR, warmup_steps=0, steps=10, schedule="constant",
                                       final_lr_ratio=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                                       weight_decay=WD, grad_clip=1.0, freeze="", image_rows_only=False))
    tx = optim.make_optimizer(t, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree.map(np.asarray, jax.tree.map(jnp.add, params, updates))  # optax.apply_updates
    expected = _hf_decays(model)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    new_flat = dict((optim.path_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(new)[0])
    names = {optim.path_name(p) for p, _ in flat}
    # both kinds exist, so a mask that decays everything or nothing fails below
    assert {"embed_in/embedding", "embed_out/kernel"} <= expected and expected < names
    assert any("query_key_value/bias" in n for n in names - expected)  # 3-d: ndim alone cannot tell
    for path, leaf in flat:
        name, p = optim.path_name(path), np.asarray(leaf)
        if name in expected:  # AdamW: p - lr * (adam(0) + wd * p), and adam(0) = 0
            np.testing.assert_allclose(new_flat[name], p - LR * (WD * p), rtol=1e-6, atol=1e-7, err_msg=name)
            assert not np.array_equal(new_flat[name], p), name
        else:
            np.testing.assert_array_equal(new_flat[name], p, err_msg=name)
