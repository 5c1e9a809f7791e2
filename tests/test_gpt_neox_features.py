"""KV cache, scan/remat, packing, bf16 and greedy decoding of the Flax GPT-NeoX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax.infer.generate import greedy_generate
from llmcxr_jax.models import gpt_neox
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, KVCache

VOCAB, PADDED = 201, 256


def tiny(**kw) -> GPTNeoXConfig:
    base = dict(vocab_size=VOCAB, padded_vocab_size=PADDED, hidden_size=48, num_layers=3, num_heads=4,
                intermediate_size=96, rotary_pct=0.25, rotary_base=10000.0, max_position_embeddings=128,
                layer_norm_eps=1e-5, use_parallel_residual=True, attention_bias=True, hidden_act="gelu",
                initializer_range=0.2, dtype="float32", param_dtype="float32", scan_layers=False,
                remat_policy="none")
    base.update(kw)
    return GPTNeoXConfig(**base)


def _copy_params(src: nnx.Module, dst: nnx.Module, stack: bool) -> nnx.Module:
    """Same weights in a looped or scanned model."""
    pure = nnx.state(src, nnx.Param).to_pure_dict()
    if stack:
        layers = pure["layers"]
        pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    state = nnx.state(dst, nnx.Param)
    state.replace_by_pure_dict(pure)
    nnx.update(dst, state)
    return dst


@nnx.jit
def forward(m, ids, attention_mask=None, segment_ids=None):
    return m(ids, attention_mask=attention_mask, segment_ids=segment_ids)


@pytest.fixture(scope="module")
def model():
    return gpt_neox.init_model(tiny(), seed=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(model, scan_layers):
    if scan_layers:
        model = _copy_params(model, gpt_neox.init_model(tiny(scan_layers=True), seed=2), stack=True)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 14)))
    mask = jnp.asarray(np.array([[1] * 14, [0] * 5 + [1] * 9]))
    full = forward(model, ids, attention_mask=mask)
    cache = KVCache.create(model.cfg, 2, 20)
    logits, cache = model.decode(ids[:, :8], cache, mask[:, :8])  # prefill 8
    steps = [logits]
    for t in range(8, 14):  # then one token at a time
        logits, cache = model.decode(ids[:, t:t + 1], cache, mask[:, t:t + 1])
        steps.append(logits)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(got[real][:, :VOCAB], np.asarray(full)[real][:, :VOCAB], atol=1e-5, rtol=0)
    assert int(cache.index) == 14


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat_policy="full"),
                                     dict(remat_policy="dots"), dict(scan_layers=True, remat_policy="dots_no_batch")])
def test_scan_and_remat_equal_the_plain_model(model, variant):
    other = _copy_params(model, gpt_neox.init_model(tiny(**variant), seed=1), stack=variant.get("scan_layers", False))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 10)))
    np.testing.assert_allclose(np.asarray(forward(other, ids)), np.asarray(forward(model, ids)), atol=1e-5, rtol=0)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids)[..., :VOCAB], -1))

    grad = nnx.jit(nnx.grad(loss))
    g_plain = nnx.state(grad(model), nnx.Param).to_pure_dict()
    g_other = nnx.state(grad(other), nnx.Param).to_pure_dict()
    np.testing.assert_allclose(np.asarray(g_other["embed_out"]["kernel"]), np.asarray(g_plain["embed_out"]["kernel"]),
                               atol=1e-5, rtol=0)
    q_plain = g_plain["layers"][1]["attention"]["query_key_value"]["kernel"]
    q_other = g_other["layers"]["attention"]["query_key_value"]["kernel"][1] if variant.get("scan_layers") else \
        g_other["layers"][1]["attention"]["query_key_value"]["kernel"]
    np.testing.assert_allclose(np.asarray(q_other), np.asarray(q_plain), atol=1e-5, rtol=0)


def test_scanned_kv_cache_matches_looped(model):
    scanned = _copy_params(model, gpt_neox.init_model(tiny(scan_layers=True), seed=2), stack=True)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, 6)))
    a, _ = model.decode(ids, KVCache.create(model.cfg, 1, 8))
    b, _ = scanned.decode(ids, KVCache.create(scanned.cfg, 1, 8))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_packed_sequences_equal_each_sequence_alone(model):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, VOCAB, n) for n in (5, 7, 3)]
    packed = np.concatenate(seqs + [np.zeros(1, np.int64)])[None]  # one pad at the end
    segments = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)] + [np.zeros(1)])[None]
    got = np.asarray(forward(model, jnp.asarray(packed), segment_ids=jnp.asarray(segments, jnp.int32)))[0]
    start = 0
    for s in seqs:
        alone = np.asarray(forward(model, jnp.asarray(s[None])))[0]
        np.testing.assert_allclose(got[start:start + len(s), :VOCAB], alone[:, :VOCAB], atol=1e-5, rtol=0)
        start += len(s)


def test_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert gpt_neox.positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = jnp.asarray([[0, 0, 1, 1, 1]])
    assert gpt_neox.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2]]


def test_padded_rows_never_win_even_with_huge_weights(model):
    state = nnx.state(model, nnx.Param)
    pure = state.to_pure_dict()
    pure["embed_out"]["kernel"] = pure["embed_out"]["kernel"].at[:, VOCAB:].set(1e4)
    m = gpt_neox.init_model(tiny(), seed=0)
    s = nnx.state(m, nnx.Param)
    s.replace_by_pure_dict(pure)
    nnx.update(m, s)
    logits = m(jnp.asarray([[1, 2, 3]]))
    assert int(jnp.argmax(logits, -1).max()) < VOCAB
    probs = jax.nn.softmax(logits, -1)
    assert float(probs[..., VOCAB:].max()) == 0.0 and np.isfinite(np.asarray(probs)).all()


def test_bf16_compute_with_fp32_params_runs_close(model):
    bf = _copy_params(model, gpt_neox.init_model(tiny(dtype="bfloat16"), seed=3), stack=False)
    assert bf.embed_in["embedding"].get_value().dtype == jnp.float32
    ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 9)))
    a, b = np.asarray(forward(bf, ids))[..., :VOCAB], np.asarray(forward(model, ids))[..., :VOCAB]
    assert a.dtype == np.float32  # logits come out in float32
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_greedy_generate_is_argmax_of_recomputation(model):
    prompt = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = np.asarray(greedy_generate(model, prompt, mask, 6))
    for row in range(2):
        seq = list(prompt[row][mask[row] == 1])
        for t in range(6):
            # right padding to one fixed length: causal attention keeps earlier positions exact
            padded = jnp.asarray([seq + [0] * (11 - len(seq))])
            nxt = int(np.argmax(np.asarray(forward(model, padded))[0, len(seq) - 1]))
            assert nxt == out[row, t]
            seq.append(nxt)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="not divisible"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="remat_policy"):
        tiny(remat_policy="sometimes")
    with pytest.raises(ValueError, match="hidden_act"):
        tiny(hidden_act="relu")


def test_blocked_causal_attention_equals_one_block(model, monkeypatch):
    """Long sequences attend in query blocks that skip the all-masked keys: same logits and
    gradients as the whole score matrix, on packed rows with a padded tail."""
    assert [gpt_neox.causal_blocks(n) for n in (128, 200, 256, 384, 512, 2048)] == [1, 1, 2, 3, 4, 16]
    rng = np.random.default_rng(7)
    seg = np.sort(rng.integers(1, 5, (2, 384)), axis=1)
    seg[1, -40:] = 0
    ids, seg = jnp.asarray(rng.integers(0, VOCAB, seg.shape)), jnp.asarray(seg)
    real = np.asarray(seg) > 0
    graphdef, params = nnx.split(model)

    def run(p):
        logits = nnx.merge(graphdef, p)(ids, segment_ids=seg)
        return jnp.sum(jnp.where(real[..., None], logits[..., :VOCAB], 0.0) ** 2) * 1e-3, logits

    (_, blocked), g_blocked = jax.value_and_grad(run, has_aux=True)(params)
    monkeypatch.setattr(gpt_neox, "causal_blocks", lambda n: 1)
    (_, whole), g_whole = jax.value_and_grad(run, has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(blocked)[real][:, :VOCAB], np.asarray(whole)[real][:, :VOCAB],
                               atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    x = jnp.zeros((1, 8, model.cfg.hidden_size))
    cos, sin = gpt_neox.rotary_tables(jnp.arange(8)[None], model.cfg.rotary_ndims, model.cfg.rotary_base)
    with pytest.raises(ValueError, match="blocks=3"):
        model.layers[0].attention(x, cos, sin, jnp.ones((1, 8, 8), bool), blocks=3)
