"""Our Flax GPT-NeoX computes what transformers' GPTNeoXForCausalLM computes (float32, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import left_padded_batch, make_hf_model

from llmcxr_jax import sharding
from llmcxr_jax.convert import hf_gpt_neox
from llmcxr_jax.models import gpt_neox

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
VOCAB = 97


def _pair(tmp_path, parallel, pct, mesh="1,-1,1", act="gelu"):
    d = str(tmp_path / f"hf_{parallel}_{pct}_{act}")
    hf = make_hf_model(d, VOCAB, parallel=parallel, rotary_pct=pct, hidden_act=act)
    imp = hf_gpt_neox.import_hf(d, 0, mesh=sharding.make_mesh(mesh), dtype="float32", param_dtype="float32")
    return hf, imp.model


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("pct", [0.25, 1.0])
def test_logits_match_transformers_with_left_padding(tmp_path, parallel, pct):
    hf, ours = _pair(tmp_path, parallel, pct)
    ids, mask, pos = left_padded_batch(np.random.default_rng(0), VOCAB, [16, 9, 3], 16)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[..., :VOCAB][real], ref[real], atol=1e-4, rtol=0)
    assert np.isneginf(got[..., VOCAB:]).all()  # padded table rows never win


def test_logits_match_on_a_sharded_mesh(tmp_path):
    """Same numbers with parameters split over fsdp=2, tensor=4 (8 host devices)."""
    hf, ours = _pair(tmp_path, True, 0.25, mesh="1,2,4")
    kernel = ours.layers[0].mlp.dense_h_to_4h["kernel"].get_value()
    assert len({str(s.index) for s in kernel.addressable_shards}) == 8  # embed over fsdp, mlp over tensor
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    with jax.set_mesh(kernel.sharding.mesh):
        got = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got)[..., :VOCAB], ref, atol=1e-4, rtol=0)


def _hf_rotary(hf_model, positions, x):
    cos, sin = hf_model.gpt_neox.rotary_emb(x, position_ids=positions)
    return cos, sin


@pytest.mark.parametrize("pct", [0.25, 1.0])
def test_rotary_matches(tmp_path, pct):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    hf, ours = _pair(tmp_path, True, pct)
    cfg = ours.cfg
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 4, 11, cfg.head_dim)).astype(np.float32)  # HF layout [b, heads, len, dim]
    k = rng.normal(size=q.shape).astype(np.float32)
    pos = np.stack([np.arange(11), np.arange(11) + 40])
    cos, sin = _hf_rotary(hf, torch.tensor(pos), torch.tensor(q))
    rq, rk = apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k), cos, sin)
    c, s = gpt_neox.rotary_tables(jnp.asarray(pos), cfg.rotary_ndims, cfg.rotary_base)
    ours_q = gpt_neox.apply_rotary(jnp.asarray(q.transpose(0, 2, 1, 3)), c, s)
    ours_k = gpt_neox.apply_rotary(jnp.asarray(k.transpose(0, 2, 1, 3)), c, s)
    np.testing.assert_allclose(np.asarray(ours_q), rq.numpy().transpose(0, 2, 1, 3), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ours_k), rk.numpy().transpose(0, 2, 1, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"])
def test_mlp_matches(tmp_path, act):
    hf, ours = _pair(tmp_path, True, 0.25, act=act)
    assert ours.cfg.hidden_act == act
    x = 2 * np.random.default_rng(3).normal(size=(2, 7, ours.cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf.gpt_neox.layers[1].mlp(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours.layers[1].mlp(jnp.asarray(x))), ref, atol=1e-5, rtol=0)


def test_tanh_gelu_model_matches_and_differs_from_exact(tmp_path):
    """A whole gelu_new model matches transformers; the two gelus differ by more than the tolerance."""
    hf, ours = _pair(tmp_path, True, 0.25, act="gelu_new")
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)))[..., :VOCAB], ref, atol=1e-4, rtol=0)
    h = jnp.linspace(-4, 4, 101)
    assert float(jnp.abs(gpt_neox.ACTIVATIONS["gelu"](h) - gpt_neox.ACTIVATIONS["gelu_new"](h)).max()) > 1e-4


def test_attention_matches(tmp_path):
    hf, ours = _pair(tmp_path, True, 0.25)
    cfg = ours.cfg
    length = 9
    x = np.random.default_rng(4).normal(size=(2, length, cfg.hidden_size)).astype(np.float32)
    pos = np.tile(np.arange(length), (2, 1))
    causal = np.tril(np.ones((length, length), bool))
    additive = np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
    with torch.no_grad():
        emb = _hf_rotary(hf, torch.tensor(pos), torch.tensor(x))
        ref, _ = hf.gpt_neox.layers[0].attention(torch.tensor(x), attention_mask=torch.tensor(additive),
                                                 position_embeddings=emb)
    c, s = gpt_neox.rotary_tables(jnp.asarray(pos), cfg.rotary_ndims, cfg.rotary_base)
    got, _ = ours.layers[0].attention(jnp.asarray(x), c, s, jnp.asarray(np.broadcast_to(causal, (2, length, length))))
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5, rtol=0)
