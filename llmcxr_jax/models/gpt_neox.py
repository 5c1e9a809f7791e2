"""GPT-NeoX causal LM in Flax NNX, computing exactly what HF GPTNeoXForCausalLM computes; `decode`
carries a KVCache through the layers, each layer reading and writing its own LayerKV. Self-attention
runs on the kernel model.attention picks (models/attention.py); a cache step always in XLA.

Module attribute names follow HF (embed_in, layers, attention.query_key_value, mlp.dense_h_to_4h,
final_layer_norm, embed_out) so convert/hf_gpt_neox.py is one declarative table. Every Param
carries `logical_axes`; sharding.py maps them to the mesh. Norms, softmax and logits run in
float32 whatever the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmcxr_jax.errors import UsageError
from llmcxr_jax.models import attention as attn
from llmcxr_jax.models.attention import SelfAttentionMask, causal_blocks
from llmcxr_jax.models.gpt_neox_config import ACTIVATIONS as ACTIVATIONS
from llmcxr_jax.models.gpt_neox_config import ATTENTION_KEYS as ATTENTION_KEYS
from llmcxr_jax.models.gpt_neox_config import REMAT_POLICIES as REMAT_POLICIES
from llmcxr_jax.models.gpt_neox_config import GPTNeoXConfig as GPTNeoXConfig
from llmcxr_jax.sharding import constrain


@struct.dataclass
class LayerKV:
    """One layer's cached keys and values, each [batch, heads, max_len, head_dim] (heads before positions:
    a decode step's score and value matmuls read the cache as it lies, with no transposed copy); KVCache.layers
    gives a scanned model's as one LayerKV with a leading [layers] axis, which lax.scan slices per layer."""

    key: jax.Array
    value: jax.Array


@struct.dataclass
class KVCache:
    """Decoding cache for all layers. key/value: one [batch, heads, max_len, head_dim] array per layer (a tuple),
    each updated in place by the decode loop; for a scanned model (cfg.scan_layers) one array stacked on a
    leading [layers] axis, which lax.scan slices and restacks."""

    key: jax.Array | tuple[jax.Array, ...]
    value: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array  # [batch, max_len] bool: positions holding a real (non-pad) token
    index: jax.Array  # int32 scalar: next write position

    @classmethod
    def create(cls, config: GPTNeoXConfig, batch: int, max_len: int) -> KVCache:
        shape = (batch, config.num_heads, max_len, config.head_dim)
        if config.scan_layers:
            key = value = jnp.zeros((config.num_layers, *shape), config.compute_dtype)
        else:
            key = value = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
        return cls(key=key, value=value, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def layers(self) -> LayerKV:
        """A scanned model's keys and values, stacked: [layers, batch, heads, max_len, head_dim] each."""
        return LayerKV(key=self.key, value=self.value)

    def layer(self, i: int) -> LayerKV:
        """Layer i's keys and values: [batch, heads, max_len, head_dim] each."""
        return LayerKV(key=self.key[i], value=self.value[i])

    def with_layers(self, kv: LayerKV) -> KVCache:
        """This cache holding kv (stacked on [layers], or one tuple entry per layer) as its keys and values."""
        return self.replace(key=kv.key, value=kv.value)


def _dense(x: jax.Array, kernel: jax.Array, **kw) -> jax.Array:
    """x [..., k] times kernel [k, ...] as one flat 2-d matmul: XLA:CPU runs the kernel gradient
    of a matmul with several leading activation dims (several contracting dims) at half speed."""
    lead, k = x.shape[:-1], x.shape[-1]
    out = jnp.dot(x.reshape(-1, k), kernel.reshape(k, -1), **kw)
    return out.reshape(*lead, *kernel.shape[1:])


def _param(rngs: nnx.Rngs, init, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def _normal(std):
    return jax.nn.initializers.normal(stddev=std)


_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


class LayerNorm(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs):
        self.eps = cfg.layer_norm_eps
        self.scale = _param(rngs, _ones, (cfg.hidden_size,), cfg.weight_dtype, ("norm",))
        self.bias = _param(rngs, _zeros, (cfg.hidden_size,), cfg.weight_dtype, ("norm",))

    def __call__(self, x, out_dtype):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(out_dtype)


def rotary_tables(positions: jax.Array, rotary_ndims: int, base: float):
    """positions [batch, length] -> cos, sin [batch, length, rotary_ndims] (float32)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_ndims, 2, dtype=jnp.float32) / rotary_ndims))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, length, heads, head_dim]; rotates the first cos.shape[-1] dims, GPT-NeoX style."""
    nd = cos.shape[-1]
    if nd == 0:
        return x
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rot, rest = x[..., :nd], x[..., nd:]
    half = nd // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d, e, w = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.weight_dtype
        std = cfg.initializer_range
        # HF fuses q, k, v per head: output feature (head, part, dim) with part in (q, k, v).
        self.query_key_value = nnx.Dict(
            kernel=_param(rngs, _normal(std), (e, h, 3, d), w, ("embed", "heads", "qkv", "head_dim")))
        self.dense = nnx.Dict(kernel=_param(rngs, _normal(std), (h, d, e), w, ("heads", "head_dim", "embed")))
        if cfg.attention_bias:
            self.query_key_value["bias"] = _param(rngs, _zeros, (h, 3, d), w, ("heads", "qkv", "head_dim"))
            self.dense["bias"] = _param(rngs, _zeros, (e,), w, ("norm",))

    def __call__(self, x, cos, sin, mask, cache: LayerKV | None = None, cache_index=None, blocks=1):
        """x [batch, q_len, embed]; mask: a SelfAttentionMask (self-attention over x, on the kernel
        cfg.attention picks) or a dense [batch, q_len, kv_len] bool (computed in XLA).

        Without a cache, keys are x's own; with this layer's LayerKV, this step's keys and values
        are written into it at cache_index (int32 scalar) and attention runs over the whole cache.
        blocks > 1 (XLA self-attention whose mask is causal): the queries in that many equal blocks,
        each against the keys up to its end, which skips the all-masked part of the score matrix
        (same result; see causal_blocks()). Returns (out, the updated LayerKV or None).
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        qkv = _dense(x, self.query_key_value["kernel"].get_value().astype(dt))  # [b, s, heads, 3, head_dim]
        if cfg.attention_bias:
            qkv = qkv + self.query_key_value["bias"].get_value().astype(dt)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [batch, length, heads, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if cache is not None:  # this step's keys and values written into the cache, attention over all of it
            if isinstance(mask, SelfAttentionMask) or blocks > 1:
                raise UsageError(f"a KV-cache step takes a dense mask and blocks=1, not blocks={blocks}")
            new_cache = LayerKV(*(jax.lax.dynamic_update_slice_in_dim(
                c, new.transpose(0, 2, 1, 3).astype(c.dtype), cache_index, axis=2)
                for c, new in ((cache.key, k), (cache.value, v))))
            out = attn.cached_attention(q, new_cache.key.astype(dt), new_cache.value.astype(dt), mask, dt)
        elif isinstance(mask, SelfAttentionMask):
            out = attn.self_attention(q, k, v, mask, cfg.attention_kernel, dt, blocks)
        else:
            out = attn.xla_attention(q, k, v, mask, dt, blocks)
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
        kernel = self.dense["kernel"].get_value().astype(dt)  # [heads, head_dim, embed]
        out = _dense(out.reshape(*out.shape[:2], -1), kernel.reshape(-1, kernel.shape[-1]))
        if cfg.attention_bias:
            out = out + self.dense["bias"].get_value().astype(dt)
        return out, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        e, m, w, std = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype, cfg.initializer_range
        self.dense_h_to_4h = nnx.Dict(kernel=_param(rngs, _normal(std), (e, m), w, ("embed", "mlp")),
                                      bias=_param(rngs, _zeros, (m,), w, ("mlp",)))
        self.dense_4h_to_h = nnx.Dict(kernel=_param(rngs, _normal(std), (m, e), w, ("mlp", "embed")),
                                      bias=_param(rngs, _zeros, (e,), w, ("norm",)))

    def __call__(self, x):
        dt = self.cfg.compute_dtype
        up, down = self.dense_h_to_4h, self.dense_4h_to_h
        h = _dense(x, up["kernel"].get_value().astype(dt)) + up["bias"].get_value().astype(dt)
        h = ACTIVATIONS[self.cfg.hidden_act](h)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return _dense(h, down["kernel"].get_value().astype(dt)) + down["bias"].get_value().astype(dt)


class Layer(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_layernorm = LayerNorm(cfg, rngs)
        self.post_attention_layernorm = LayerNorm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask, cache: LayerKV | None = None, cache_index=None, blocks=1):
        """x [batch, q_len, embed] -> (x, this layer's updated LayerKV or None); see Attention."""
        dt = self.cfg.compute_dtype
        attn, new_cache = self.attention(self.input_layernorm(x, dt), cos, sin, mask, cache, cache_index, blocks)
        if self.cfg.use_parallel_residual:
            x = x + attn + self.mlp(self.post_attention_layernorm(x, dt))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x, dt))
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_cache


def _stacked_layers(cfg: GPTNeoXConfig, rngs: nnx.Rngs) -> Layer:
    """num_layers Layers with parameters stacked on a leading 'layers' axis (for scan)."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Layer(cfg, nnx.Rngs(params=key))

    layers = make(jax.random.split(rngs.params(), cfg.num_layers))
    for _, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Param):
            var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return layers


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left-padded batch: position = number of real tokens before this one (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Packed rows: positions restart at 0 where the segment id changes."""
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
    return idx - start_idx


class GPTNeoXForCausalLM(nnx.Module):
    """GPT-NeoX LM. `__call__` for training/scoring, `decode` for KV-cache generation."""

    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        w, std, e = cfg.weight_dtype, cfg.initializer_range, cfg.hidden_size
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.embed_in = nnx.Dict(
            embedding=_param(rngs, _normal(std), (cfg.padded_vocab_size, e), w, ("vocab", "embed")))
        if cfg.scan_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_layer_norm = LayerNorm(cfg, rngs)
        self.embed_out = nnx.Dict(kernel=_param(rngs, _normal(std), (e, cfg.padded_vocab_size), w, ("embed", "vocab")))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """input_ids [batch, length] -> float32 logits [batch, length, padded_vocab].

        attention_mask [batch, length] marks real tokens (left padding); segment_ids [batch,
        length] (>0 real, 0 pad) packs several sequences per row with no attention across them.
        Positions default to restarting per segment, or counting real tokens.
        """
        return self.head_logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """What __call__ feeds the LM head: the final layer norm's output [batch, length, embed]
        in the compute dtype (a chunked loss applies head_logits a slice at a time)."""
        b, s = input_ids.shape
        layout = "packed" if segment_ids is not None else "padded" if attention_mask is not None else "causal"
        if attention_mask is None:
            attention_mask = segment_ids > 0 if segment_ids is not None else jnp.ones((b, s), bool)
        attention_mask = attention_mask.astype(bool)
        if position_ids is None:
            position_ids = (positions_from_segments(segment_ids) if segment_ids is not None
                            else positions_from_mask(attention_mask))
        mask = SelfAttentionMask.create(attention_mask, segment_ids, layout)
        x, _ = self._run_layers(input_ids, position_ids, mask, None, causal_blocks(s))
        return x

    def decode(self, input_ids, cache: KVCache, attention_mask=None, position_ids=None):
        """Run input_ids [batch, q_len] at cache.index.. over the cache -> (logits, new cache).

        Prefill is a decode of the whole (left-padded) prompt; then one token per call.
        """
        x, cache = self.decode_states(input_ids, cache, attention_mask, position_ids)
        return self.head_logits(x), cache

    def decode_states(self, input_ids, cache: KVCache, attention_mask=None, position_ids=None):
        """decode without the head -> (final hidden states [batch, q_len, embed], new cache): a sampler applies
        the head to the positions and table rows it draws from (the last position; the rows it may emit)."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        attention_mask = attention_mask.astype(bool)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.index, axis=1)
        if position_ids is None:
            # position = real tokens before this one, counting those already in the cache
            position_ids = positions_from_mask(valid)
            position_ids = jax.lax.dynamic_slice_in_dim(position_ids, cache.index, s, axis=1)
        max_len = cache.valid.shape[1]
        q_idx = cache.index + jnp.arange(s)
        causal = jnp.arange(max_len)[None, :] <= q_idx[:, None]  # [q_len, max_len]
        mask = causal[None] & valid[:, None, :]
        x, new_cache = self._run_layers(input_ids, position_ids, mask, cache)
        return x, new_cache.replace(valid=valid, index=cache.index + s)

    def _run_layers(self, input_ids, position_ids, mask, cache: KVCache | None, blocks=1):
        """Embed, every layer, final norm -> (x [batch, q_len, embed], cache or None).

        With a cache, each layer writes this step's keys and values at cache.index and attends over
        its LayerKV; the cache comes back holding them, its valid and index as they were.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = jnp.take(self.embed_in["embedding"].get_value(), input_ids, axis=0, mode="clip").astype(dt)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rotary_tables(position_ids, cfg.rotary_ndims, cfg.rotary_base)
        policy = REMAT_POLICIES[cfg.remat_policy]

        def layer_fn(layer_state, graphdef, x, kv: LayerKV | None, index):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, mask, kv, index, blocks)

        if cfg.remat_policy != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=policy, static_argnums=(1,))

        index = cache.index if cache is not None else None
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(x, xs):
                layer_state, kv = xs  # kv: this layer's LayerKV (scan slices the [layers] axis) or None
                return layer_fn(layer_state, graphdef, x, kv, index)

            # the per-layer LayerKVs come back stacked on [layers]
            x, new_kv = jax.lax.scan(body, x, (state, cache.layers if cache is not None else None))
        else:
            layer_kvs = []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                x, kv = layer_fn(state, graphdef, x, cache.layer(i) if cache is not None else None, index)
                layer_kvs.append(kv)
            new_kv = None
            if cache is not None:  # one array per layer, each written in place
                new_kv = LayerKV(key=tuple(kv.key for kv in layer_kvs), value=tuple(kv.value for kv in layer_kvs))
        x = self.final_layer_norm(x, dt)
        return x, cache.with_layers(new_kv) if cache is not None else None

    def head_logits(self, x, rows: tuple[int, int] | None = None):
        """x [..., embed] -> float32 logits [..., padded_vocab]; rows past vocab_size are -inf. rows=(start,
        stop): the logits of table rows [start, stop) alone. A few rows (under half the table: a sampler's
        image codes) are a static slice of the head's kernel; more are the whole head's logits, sliced (a
        slice of most of the kernel would be a copy of it at every call)."""
        table = self.cfg.padded_vocab_size
        start, stop = rows or (0, table)
        if not 0 <= start < stop <= table:
            raise UsageError(f"head rows [{start}, {stop}) are outside the table's {table}")
        kernel = self.embed_out["kernel"].get_value()
        narrow = 2 * (stop - start) < table
        if narrow:
            kernel = kernel[:, start:stop]
        logits = _dense(x, kernel.astype(self.cfg.compute_dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        if not narrow:
            logits = logits[..., start:stop]
        if stop > self.cfg.vocab_size:
            real = jnp.arange(start, stop) < self.cfg.vocab_size
            logits = jnp.where(real, logits, -jnp.inf)
        return logits


def init_model(cfg: GPTNeoXConfig, seed: int) -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: GPTNeoXConfig) -> GPTNeoXForCausalLM:
    """Shapes, dtypes and metadata without allocating parameters."""
    return nnx.eval_shape(lambda: GPTNeoXForCausalLM(cfg, nnx.Rngs(params=0)))


def count_params(cfg: GPTNeoXConfig) -> int:
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(state)))


def model_flops_per_token(cfg: GPTNeoXConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters (embedding lookup
    excluded, LM head included) + 12 x layers x hidden x seq_len for attention scores and values."""
    params = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    n -= cfg.padded_vocab_size * cfg.hidden_size  # embed_in is a gather
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
