"""Next-token cross entropy over the LM head a slice of the sequence at a time (train.logits_chunk), so
the float32 logits [rows, length, padded_vocab] of a 51k-row vocabulary never exist at once."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llmcxr_jax.errors import UsageError
from llmcxr_jax.sharding import constrain


def check_chunk(length: int, chunk: int) -> None:
    """train.logits_chunk must be 0 (whole rows) or a positive divisor of the sequence length."""
    if chunk < 0 or (chunk and length % chunk):
        raise UsageError(f"data.seq_len {length} is not divisible by train.logits_chunk {chunk}; set "
                         "train.logits_chunk to a divisor of it (e.g. 512 for 2048) or 0 for whole-row logits")


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., vocab] float32, targets [...] int -> logsumexp - target logit [...]."""
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _cross_entropy_and_argmax(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _cross_entropy(logits, targets), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_cross_entropy(head: Callable[[jax.Array], jax.Array], x: jax.Array, targets: jax.Array,
                        chunk: int, with_argmax: bool = False):
    """Per-token cross entropy [rows, length] of head(x) (float32 logits [..., vocab], padded rows -inf)
    against targets [rows, length], from x [rows, length, embed]. with_argmax: (cross entropy, argmax token
    [rows, length] int32 of the same logits), for the held-out evaluation (not differentiable).

    chunk 0: head over the whole rows at once (the logits [rows, length, vocab] in memory). chunk N:
    a lax.scan over length / N slices of N positions of every row (rows stay the leading, data-sharded
    axis), each computing its logits, logsumexp and target logit.

    Why jax.checkpoint on the scan body rather than a custom_vjp: the backward pass then keeps only the
    body's inputs (an x slice) and recomputes one slice's logits at a time, which is all a custom_vjp
    would do, and autodiff writes the gradient: the same values as chunk 0, -inf rows included (their
    softmax weight is exp(-inf) = 0). The head's parameters are loop-invariant inputs of the scan, so
    their gradient is summed over slices in the parameter dtype (float32) even under bfloat16 compute.
    Costs: one more head matmul per slice (the recomputed logits); on an fsdp mesh the compiler gathers
    the head kernel and reduces its gradient once per slice of the backward, so fewer, larger slices
    communicate less.
    """
    rows, length, embed = x.shape
    check_chunk(length, chunk)
    per_token = _cross_entropy_and_argmax if with_argmax else _cross_entropy
    if chunk == 0:
        return per_token(head(x), targets)
    n = length // chunk
    # [n, rows, chunk, ...]: the scan walks the leading axis; each slice keeps every row
    xs = constrain(x.reshape(rows, n, chunk, embed).swapaxes(0, 1),
                   (None, "activation_batch", "activation_length", "activation_embed"))
    ts = constrain(targets.reshape(rows, n, chunk).swapaxes(0, 1), (None, "activation_batch", "activation_length"))

    @jax.checkpoint  # backward recomputes this slice's logits instead of keeping every slice's
    def body(x_slice, t_slice):  # [rows, chunk, embed], [rows, chunk]
        return per_token(head(x_slice), t_slice)

    _, out = jax.lax.scan(lambda carry, xt: (carry, body(*xt)), None, (xs, ts))  # each [n, rows, chunk]
    return jax.tree.map(lambda a: constrain(a.swapaxes(0, 1).reshape(rows, length),
                                            ("activation_batch", "activation_length")), out)
