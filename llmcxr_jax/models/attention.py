"""Attention kernels of the GPT-NeoX LM and the choice among them (config key model.attention): the
blocked XLA softmax attention, TPU splash attention, and cuDNN / Pallas flash attention on NVIDIA GPUs.

Self-attention over a batch (a SelfAttentionMask) goes to the chosen kernel, each fused kernel running
once per device over its local batch rows and heads; a dense mask (a KV-cache step) always takes XLA.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from llmcxr_jax import sharding
from llmcxr_jax.errors import UsageError

KERNELS = ("auto", "xla", "splash", "cudnn")
AUTO_KERNEL = {"tpu": "splash", "gpu": "cudnn"}  # platform -> what "auto" runs there; anything else: xla
LAYOUTS = ("causal", "padded", "packed")  # every token real / left padding (attention_mask) / segment ids
LANES = 128  # splash tiles are multiples of this; Pallas kernels get lengths padded to a multiple of it
DEFAULT_SPLASH_BLOCK = 512  # splash q and kv tile; what checkpoints written before the setting existed get
XLA_BLOCK = 128  # query block of the XLA path (causal_blocks)


def check_kernel_settings(name: str, block_q: int, block_kv: int) -> None:
    """UsageError for an unknown model.attention or a splash tile that is not a positive multiple of 128."""
    if name not in KERNELS:
        raise UsageError(f"model.attention {name!r} is not one of {list(KERNELS)} ('auto': splash on TPU, "
                         "cudnn on NVIDIA GPUs, xla elsewhere)")
    for key, block in (("splash_block_q", block_q), ("splash_block_kv", block_kv)):
        if block <= 0 or block % LANES:
            raise UsageError(f"model.{key} is {block}; splash tiles must be positive multiples of {LANES} (e.g. 512)")


def current_platform() -> str:
    """The platform this trace compiles for: the active mesh's devices (compile-check sets compile-only
    TPU devices on a CPU host), else JAX's default backend. NVIDIA GPUs read as 'gpu'."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform == "cuda" else platform


def resolve_kernel(name: str, platform: str, interpret: bool = False) -> str:
    """model.attention -> the kernel that runs on `platform`: 'xla', 'splash' or 'cudnn'. A fused kernel
    named for another platform is a UsageError unless `interpret` (model.attention_interpret) asks for
    it without its hardware: Pallas kernels in interpret mode, cuDNN's call through XLA."""
    if name not in KERNELS:
        raise UsageError(f"model.attention {name!r} is not one of {list(KERNELS)}")
    if name == "auto":
        return AUTO_KERNEL.get(platform, "xla")
    if interpret or name == "xla":
        return name
    if name == "splash" and platform != "tpu":
        raise UsageError(f"model.attention='splash' runs on TPUs only and this is {platform}; set "
                         f"model.attention={AUTO_KERNEL.get(platform, 'xla')!r} (or 'auto')")
    if name == "cudnn" and platform != "gpu":
        raise UsageError(f"model.attention='cudnn' runs on NVIDIA GPUs only and this is {platform}; set "
                         f"model.attention={AUTO_KERNEL.get(platform, 'xla')!r} (or 'auto')")
    return name


@struct.dataclass
class SelfAttentionMask:
    """Causal self-attention over a batch, in the two forms the kernels take. dense [batch, length, length]
    bool: query i sees key j (the XLA path). segment_ids [batch, length] int32: 0 on pads, >= 1 on real
    tokens; a token sees earlier tokens of its own id (the fused kernels). layout (one of LAYOUTS) says
    whether rows are whole sequences, left padded or packed, which decides between cuDNN and Pallas."""

    dense: jax.Array
    segment_ids: jax.Array
    layout: str = struct.field(pytree_node=False)

    @classmethod
    def create(cls, attention_mask: jax.Array, segment_ids: jax.Array | None, layout: str) -> SelfAttentionMask:
        """attention_mask [batch, length] bool (real tokens); segment_ids as the batch gives them or None.
        Key j is visible to query i when j <= i, j is real and (with segment ids) both share a segment."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        s = attention_mask.shape[-1]
        dense = jnp.tril(jnp.ones((s, s), bool))[None] & attention_mask[:, None, :]
        ids = jnp.zeros_like(attention_mask, jnp.int32)
        if segment_ids is not None:
            dense = dense & (segment_ids[:, :, None] == segment_ids[:, None, :])
            ids = segment_ids.astype(jnp.int32)
        # + 1: a real token whose batch segment id is 0 still differs from the pads
        return cls(dense=dense, segment_ids=jnp.where(attention_mask, ids + 1, 0), layout=layout)


# ---------------------------------------------------------------- XLA


def causal_blocks(length: int) -> int:
    """Query blocks for causal self-attention over `length` tokens: blocks of XLA_BLOCK when it divides
    the length into two or more, else one. Block i computes scores against keys [0, its end) only:
    ~(n + 1) / 2n of the full score matrix, and each block's scores fit in cache (a 2-layer, 512-token
    CPU training step: 230 -> 172 ms)."""
    return length // XLA_BLOCK if length % XLA_BLOCK == 0 and length >= 2 * XLA_BLOCK else 1


def _attend(q, k, v, mask, dt, kv: str = "bkhd"):
    """Softmax attention of q [b, q, heads, d] over k, v where mask [b, q, k] -> [b, q, heads, d]. kv: the
    keys' and values' layout, [b, k, heads, d] ("bkhd") or a KV cache's [b, heads, k, d] ("bhkd"), read as
    it lies."""
    scores = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum(f"bhqk,{kv}->bqhd", probs, v)


def xla_attention(q, k, v, mask, dt, blocks: int = 1):
    """q [b, q_len, heads, d] over k, v [b, kv_len, heads, d] where mask [b, q_len, kv_len], in plain XLA.
    blocks > 1 (self-attention whose mask is causal): the queries in that many equal blocks, each
    against the keys up to its end, which skips the all-masked part of the score matrix (same result)."""
    if blocks == 1:
        return _attend(q, k, v, mask, dt)
    if q.shape[1] != k.shape[1] or q.shape[1] % blocks:
        raise UsageError(f"blocks={blocks} needs causal self-attention over a length it divides")
    size = q.shape[1] // blocks
    return jnp.concatenate([_attend(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                                    mask[:, i * size:(i + 1) * size, :(i + 1) * size], dt)
                            for i in range(blocks)], axis=1)


def cached_attention(q, k, v, mask, dt):
    """A KV-cache step: q [b, q_len, heads, d] over the cache k, v [b, heads, max_len, d] where mask
    [b, q_len, max_len] -> [b, q_len, heads, d]. The cache is read in its own layout (heads before
    positions); only the step's queries and outputs are transposed."""
    return _attend(q, k, v, mask, dt, kv="bhkd")


# ---------------------------------------------------------------- fused kernels, one per device


def _pad_length(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def splash_tile(configured: int, length: int) -> int:
    """The largest multiple of 128 up to `configured` that divides `length` (itself a multiple of 128)."""
    tile = min(configured, length)
    while length % tile:
        tile -= LANES
    return tile


def _splash_local(q, k, v, segment_ids, *, block_q: int, block_kv: int, interpret: bool):
    """Splash attention of one device's rows and heads: q, k, v [b, s, heads, d], segment_ids [b, s].
    The kernel takes unscaled logits, so q is scaled first; lengths are padded to a multiple of 128
    with pad segments (id 0), which no real token sees."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, s, h, d = q.shape
    length = -(-s // LANES) * LANES
    bq, bkv = splash_tile(block_q, length), splash_tile(block_kv, length)
    tiles = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(h)])
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=tiles, interpret=interpret)
    q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    # [b, s, heads, d] -> [b, heads, length, d], the kernel's layout per row
    q, k, v = (_pad_length(t, length).transpose(0, 2, 1, 3) for t in (q, k, v))
    ids = _pad_length(segment_ids, length)

    def rows(q, k, v, ids):
        return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(q=a[3], kv=a[3])))(q, k, v, ids)

    # Mosaic rejects a bf16 matmul at precision HIGHEST ("Bad lhs type"), which a global
    # jax_default_matmul_precision="highest" asks for; bf16 operands gain nothing from it
    precision = "highest" if q.dtype == jnp.float32 else "default"
    return _traced_at_precision(rows, precision)(q, k, v, ids).transpose(0, 2, 1, 3)[:, :s]


def _traced_at_precision(fn, precision: str):
    """fn(q, k, v, ids) whose forward and backward kernels are both traced under
    jax.default_matmul_precision(precision): a kernel's matmuls take the default precision
    when they are traced, and a backward pass is traced after the forward has returned."""

    @jax.custom_vjp
    def call(q, k, v, ids):
        with jax.default_matmul_precision(precision):
            return fn(q, k, v, ids)

    def forward(q, k, v, ids):
        with jax.default_matmul_precision(precision):
            out, backward = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
        return out, (backward, ids)

    def backward(residuals, grad):
        backward, ids = residuals
        with jax.default_matmul_precision(precision):
            return (*backward(grad), np.zeros(ids.shape, jax.dtypes.float0))

    call.defvjp(forward, backward)
    return call


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def gpu_kernel_for(layout: str, dtype, head_dim: int) -> str:
    """Which GPU kernel computes a self-attention: 'cudnn' (jax.nn.dot_product_attention, is_causal) for
    whole-sequence rows in bfloat16/float16 with a head_dim cuDNN's flash attention takes (a multiple
    of 8, at most 128); else 'pallas' (the Pallas/Triton flash kernel with segment ids). cuDNN's public
    call expresses causal masks and right padding only, not left padding or packed segments."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    cudnn_ok = layout == "causal" and jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if cudnn_ok else "pallas"


def _gpu_local(q, k, v, segment_ids, *, layout: str, interpret: bool):
    """One device's GPU attention (see gpu_kernel_for); interpret runs cuDNN's call through XLA and the
    Pallas kernel in interpret mode, so both paths run on CPU."""
    b, s, h, d = q.shape
    if gpu_kernel_for(layout, q.dtype, d) == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla" if interpret else "cudnn")
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    length = -(-s // LANES) * LANES  # the kernel's tiles (128 forward, 32 backward) divide it
    q, k, v = (_pad_length(t, length) for t in (q, k, v))
    out = pallas_gpu.mha(q, k, v, _pad_length(segment_ids, length), sm_scale=d ** -0.5, causal=True,
                         interpret=interpret)
    return out[:, :s]


def _fit(axes, size: int, mesh) -> str | tuple[str, ...] | None:
    """Mesh axes for an array dim of `size`: `axes` when their product divides it, else None (replicated)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if names and size % int(np.prod([mesh.shape[n] for n in names])) == 0 else None


def _per_device(local, q, k, v, segment_ids):
    """Run local(q, k, v, segment_ids) on each device's batch rows and heads of the active mesh (rows over
    the batch axes, heads over the tensor axis, by the sharding rules); directly when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return local(q, k, v, segment_ids)
    rules = sharding.LOGICAL_AXIS_RULES
    batch = _fit(rules["activation_batch"], q.shape[0], mesh)
    heads = _fit(rules["activation_heads"], q.shape[2], mesh)
    qkv = PartitionSpec(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """The model config's attention keys: model.attention, the splash tiles and attention_interpret."""

    name: str
    splash_block_q: int
    splash_block_kv: int
    interpret: bool


def self_attention(q, k, v, mask: SelfAttentionMask, settings: KernelSettings, dt, blocks: int = 1):
    """Causal self-attention of q, k, v [batch, length, heads, head_dim] under `mask`, computed by the
    kernel settings.name resolves to on this platform; the same numbers as xla_attention (float32
    round-off apart) at every real query. Pad queries see other pads only (XLA: nothing), so their
    outputs differ; no real position reads them."""
    kernel = resolve_kernel(settings.name, current_platform(), settings.interpret)
    if kernel == "xla":
        return xla_attention(q, k, v, mask.dense, dt, blocks)
    if kernel == "splash":
        local = partial(_splash_local, block_q=settings.splash_block_q, block_kv=settings.splash_block_kv,
                        interpret=settings.interpret)
    else:
        local = partial(_gpu_local, layout=mask.layout, interpret=settings.interpret)
    return _per_device(local, q, k, v, mask.segment_ids).astype(dt)
