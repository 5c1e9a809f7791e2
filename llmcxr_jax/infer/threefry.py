"""Gumbel noise for the sampler, bit for bit jax.random.gumbel's, computed where XLA:CPU runs it fast.

jax lowers its threefry2x32 hash on CPU as a rolled five-iteration loop (to keep compiles small): every
iteration is a separate pass over the whole [batch, vocabulary] array, about 3 ms of a batch-8 sampling
step. The hash here is the same function (Salmon et al.'s Threefry-2x32, 20 rounds, as jax keys it),
written out unrolled so XLA fuses it into one elementwise loop; the bits, the uniforms and the noise are
those of jax.random.gumbel for the same key. Keys of another PRNG implementation, or jax configured for
non-partitionable bits or high-dynamic-range Gumbel noise, fall back to jax.random.gumbel itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant


def _rotl(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds) of the counter pairs (x1, x2) under the key (k1, k2); all
    uint32, broadcast together. Five groups of four rounds, a key injection after each."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    a, b = x1 + ks[0], x2 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            a = a + b
            b = _rotl(b, r) ^ a
        a = a + ks[(group + 1) % 3]
        b = b + ks[(group + 2) % 3] + np.uint32(group + 1)
    return a, b


def _fast_path(keys: jax.Array, dtype) -> bool:
    return (jax.random.key_impl(keys) == "threefry2x32" and jax.config.jax_threefry_partitionable
            and not jax.config.jax_high_dynamic_range_gumbel and jnp.dtype(dtype) == jnp.float32)


def gumbel_rows(keys: jax.Array, size: int, start: int, stop: int, dtype=jnp.float32) -> jax.Array:
    """keys [batch] (typed PRNG keys) -> [batch, stop - start]: entries [start, stop) of
    jax.random.gumbel(keys[r], (size,), dtype) for each row r, without drawing the entries before start:
    partitionable threefry bits depend only on the entry's index. stop may pass size (to pad a row to a
    length XLA vectorises); the entries from size on are noise the caller masks (further draws of the
    stream, or zeros where jax.random.gumbel itself is called)."""
    if not 0 <= start <= stop or start > size:
        raise ValueError(f"entries [{start}, {stop}) do not start inside a row of {size}")
    if not _fast_path(keys, dtype):
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (size,), dtype))(keys)[:, start:stop]
        return jnp.pad(noise, ((0, 0), (0, stop - start - noise.shape[1])))
    if stop >= 2 ** 32:
        raise ValueError(f"rows of {stop} entries need 64-bit counters")
    data = jax.random.key_data(keys)  # [batch, 2] uint32
    counters = jnp.arange(start, stop, dtype=jnp.uint32)[None, :]
    b1, b2 = threefry2x32(data[:, :1], data[:, 1:], jnp.zeros_like(counters), counters)
    bits = b1 ^ b2
    # jax.random.uniform(minval=tiny, maxval=1): 23 random mantissa bits under exponent 0, minus one, scaled
    floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    uniform = jnp.maximum(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))
