"""model.attention: splash (TPU) and the GPU kernels (cuDNN / Pallas flash) compute what the XLA attention
computes, forward and backward, run in Pallas interpret mode on CPU; which kernel runs where; old model
configs load; KV-cache decoding ignores the setting. Shapes are the smallest splash takes (length 128 or
256, tiles of 128), float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_helpers import left_padded_batch, make_hf_model

from llmcxr_jax import checkpoint, sharding
from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer.generate import greedy_generate
from llmcxr_jax.models import attention as attn
from llmcxr_jax.models import gpt_neox
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig
from llmcxr_jax.vocab import VocabLayout

VOCAB = 97


def rel_err(got, ref) -> float:
    """max |got - ref| over max |ref|: float32 round-off of an O(1)-conditioned result is ~1e-7."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _batch(kind: str, batch=2, length=256, heads=2, head_dim=16):
    """q, k, v [batch, length, heads, head_dim] and the SelfAttentionMask of packed rows (several segments,
    pads at the end) or of a left-padded batch (attention_mask only)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in range(3))
    if kind == "packed":
        seg = np.zeros((batch, length), np.int32)
        seg[0, :100], seg[0, 100:180], seg[0, 180:240] = 1, 2, 3  # 16 pads at the end
        seg[1, :30], seg[1, 30:200], seg[1, 200:] = 1, 4, 5  # no pads, 3 segments crossing the 128 tiles
        seg = jnp.asarray(seg)
        return q, k, v, attn.SelfAttentionMask.create(seg > 0, seg, "packed")
    real = np.zeros((batch, length), bool)
    real[0, 70:], real[1, 101:] = True, True
    return q, k, v, attn.SelfAttentionMask.create(jnp.asarray(real), None, "padded")


@pytest.mark.parametrize(("kernel", "kind"), [("splash", "packed"), ("splash", "left_padded"), ("cudnn", "packed"),
                                              pytest.param("cudnn", "left_padded", marks=pytest.mark.slow)])
def test_fused_kernel_equals_xla_forward_and_gradients(kernel, kind):
    """Outputs at real queries, and d(loss)/d(q, k, v) for a loss of real positions only, equal the XLA
    attention's; "cudnn" here routes to the Pallas GPU flash kernel (packed and padded rows need it).
    Packed rows span two 128-token tiles each way; the left-padded batch is one tile."""
    q, k, v, mask = _batch(kind, length=256 if kind == "packed" else 128)
    real = np.asarray(mask.segment_ids) > 0
    settings = attn.KernelSettings(kernel, 128, 128, interpret=True)
    # d(sum of out * weights at real queries)/d(q, k, v) is the vjp of these weights
    weights = jnp.where(real[:, :, None, None], jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape), 0.0)

    def with_grads(fn):
        def run(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(weights)
        return run

    fused = jax.jit(with_grads(lambda q, k, v: attn.self_attention(q, k, v, mask, settings, jnp.float32)))
    fused = fused.trace(q, k, v)
    assert "pallas_call" in str(fused.jaxpr)  # the kernel itself, not a fallback
    out, grads = fused.lower().compile()(q, k, v)
    blocks = attn.causal_blocks(q.shape[1])
    want_out, want_grads = with_grads(lambda q, k, v: attn.xla_attention(q, k, v, mask.dense, jnp.float32, blocks))(
        q, k, v)
    assert rel_err(out[real], want_out[real]) < 1e-5
    for name, g, w in zip("qkv", grads, want_grads):
        assert rel_err(g, w) < 1e-5, name
    assert float(jnp.abs(grads[1]).max()) > 0  # keys get gradient: the comparison is not of zeros


def test_cudnn_route_for_whole_sequences():
    """bfloat16 rows without padding take cuDNN's call (run through XLA off a GPU): no Pallas kernel, and
    the result within bfloat16 rounding of float32 attention on the same inputs."""
    q, k, v, mask = _batch("packed", length=64)
    q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
    whole = attn.SelfAttentionMask.create(jnp.ones((2, 64), bool), None, "causal")
    settings = attn.KernelSettings("cudnn", 512, 512, interpret=True)
    got = attn.self_attention(q, k, v, whole, settings, jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q: attn.self_attention(q, k, v, whole, settings,
                                                                               jnp.bfloat16))(q))
    f32 = [t.astype(jnp.float32) for t in (q, k, v)]
    ref = attn.xla_attention(*f32, whole.dense, jnp.float32)
    assert got.dtype == jnp.bfloat16 and rel_err(got, ref) < 2 ** -7


def test_which_kernel_runs_where():
    resolve = attn.resolve_kernel
    assert [resolve("auto", p) for p in ("tpu", "gpu", "cpu", "rocm")] == ["splash", "cudnn", "xla", "xla"]
    assert [resolve("xla", p) for p in ("tpu", "gpu", "cpu")] == ["xla"] * 3
    assert (resolve("splash", "tpu"), resolve("cudnn", "gpu")) == ("splash", "cudnn")
    assert (resolve("splash", "cpu", interpret=True), resolve("cudnn", "cpu", interpret=True)) == ("splash", "cudnn")
    assert resolve("auto", "cpu", interpret=True) == "xla"
    with pytest.raises(UsageError, match=r"'splash' runs on TPUs only and this is gpu; set model.attention='cudnn'"):
        resolve("splash", "gpu")
    with pytest.raises(UsageError, match=r"'cudnn' runs on NVIDIA GPUs only and this is tpu; set model.attention="
                                         r"'splash'"):
        resolve("cudnn", "tpu")
    with pytest.raises(UsageError, match=r"'splash' runs on TPUs only and this is cpu; set model.attention='xla'"):
        resolve("splash", "cpu")
    gpu = attn.gpu_kernel_for
    assert gpu("causal", jnp.bfloat16, 128) == gpu("causal", jnp.float16, 80) == "cudnn"
    assert {gpu("padded", jnp.bfloat16, 128), gpu("packed", jnp.bfloat16, 64)} == {"pallas"}
    assert {gpu("causal", jnp.float32, 64), gpu("causal", jnp.bfloat16, 256), gpu("causal", jnp.bfloat16, 20)} == \
        {"pallas"}
    assert [attn.splash_tile(512, n) for n in (128, 384, 640, 1024, 4096)] == [128, 384, 128, 512, 512]


def _tiny(**kw) -> GPTNeoXConfig:
    base = dict(vocab_size=VOCAB, padded_vocab_size=128, hidden_size=32, num_layers=2, num_heads=2,
                intermediate_size=64, rotary_pct=0.25, rotary_base=10000.0, max_position_embeddings=64,
                layer_norm_eps=1e-5, use_parallel_residual=True, attention_bias=True, hidden_act="gelu",
                initializer_range=0.2, dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
    return GPTNeoXConfig(**{**base, **kw})


def test_bad_settings_say_what_to_set():
    with pytest.raises(UsageError, match=r"model.attention 'flash' is not one of \['auto', 'xla', 'splash', 'cudnn'\]"):
        _tiny(attention="flash")
    with pytest.raises(UsageError, match="model.splash_block_kv is 200; splash tiles must be positive multiples of"):
        _tiny(splash_block_kv=200)
    model = gpt_neox.abstract_model(_tiny(attention="splash"))
    with pytest.raises(UsageError, match="'splash' runs on TPUs only and this is cpu"):
        nnx.eval_shape(lambda m, ids: m(ids), model, jnp.zeros((1, 8), jnp.int32))


def test_model_configs_saved_before_the_setting_load(tmp_path):
    new = _tiny(attention="xla", splash_block_q=256)
    assert GPTNeoXConfig.from_dict(new.to_dict()) == new
    old = {k: v for k, v in new.to_dict().items() if k not in gpt_neox.ATTENTION_KEYS}
    assert GPTNeoXConfig.from_dict(old) == new.replace(attention="auto", splash_block_q=512)
    layout = VocabLayout.create(90, 7)
    cfg = _tiny(vocab_size=layout.size, padded_vocab_size=layout.padded_size)
    meta = checkpoint.lm_metadata(cfg, layout, None, sharding.make_mesh("1,-1,1"), None)
    meta["model_config"] = {k: v for k, v in meta["model_config"].items() if k not in gpt_neox.ATTENTION_KEYS}
    checkpoint.save_params(str(tmp_path / "old"), gpt_neox.init_model(cfg, 0), meta)
    assert checkpoint.read_lm_metadata(str(tmp_path / "old")).config == cfg


@pytest.mark.parametrize("kernel", ["splash", "cudnn"])
def test_decoding_ignores_the_kernel_setting(kernel):
    """A KV-cache step attends in XLA whatever model.attention says, so a model set up for TPU or GPU
    kernels still generates on CPU, the same tokens as the XLA model."""
    xla = gpt_neox.init_model(_tiny(attention="xla"), 0)
    fused = _with(xla, attention=kernel)
    prompt = np.array([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = np.asarray(greedy_generate(xla, prompt, mask, 5))
    np.testing.assert_array_equal(np.asarray(greedy_generate(fused, prompt, mask, 5)), want)


def _with(model, **settings):
    """The same weights (and placement) under other attention settings."""
    graphdef = nnx.graphdef(gpt_neox.abstract_model(model.cfg.replace(**settings)))
    return nnx.merge(graphdef, nnx.state(model))


def _hf_pair(tmp_path, mesh: str, devices: int):
    from llmcxr_jax.convert import hf_gpt_neox

    hf = make_hf_model(str(tmp_path / "hf"), VOCAB)
    imp = hf_gpt_neox.import_hf(str(tmp_path / "hf"), 0, mesh=sharding.make_mesh(mesh, jax.devices()[:devices]),
                                dtype="float32", param_dtype="float32", scan_layers=True)  # one kernel to compile
    return hf, _with(imp.model, attention="splash", attention_interpret=True, splash_block_q=128)


@pytest.mark.torch
def test_splash_lm_matches_transformers_with_left_padding(tmp_path):
    torch = pytest.importorskip("torch")
    hf, ours = _hf_pair(tmp_path, "1,1,1", 1)
    ids, mask, pos = left_padded_batch(np.random.default_rng(0), VOCAB, [16, 9, 3], 16)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    forward = nnx.jit(lambda m, x, am: m(x, attention_mask=am))
    got = np.asarray(forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[..., :VOCAB][real], ref[real], atol=1e-4, rtol=0)
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: ours(x, attention_mask=jnp.asarray(mask)))(ids))


@pytest.mark.torch
@pytest.mark.slow  # the same parity as above, sharded over fsdp x tensor
def test_splash_lm_on_a_sharded_mesh(tmp_path):
    """Rows over fsdp=2 and heads over tensor=2 (4 host devices): one splash kernel per device's rows and
    heads, logits as transformers computes them."""
    torch = pytest.importorskip("torch")
    hf, ours = _hf_pair(tmp_path, "1,2,2", 4)
    qkv = ours.layers.attention.query_key_value["kernel"].get_value()  # [layers, embed, heads, 3, head_dim]
    assert qkv.sharding.spec[2] == "tensor" and len({str(s.index) for s in qkv.addressable_shards}) == 4
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    with jax.set_mesh(qkv.sharding.mesh):
        got = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(ids))
        assert "shard_map" in str(jax.make_jaxpr(lambda x: ours(x))(ids))
    np.testing.assert_allclose(np.asarray(got)[..., :VOCAB], ref, atol=1e-4, rtol=0)
