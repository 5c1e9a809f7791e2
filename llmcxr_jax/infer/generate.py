"""Jitted KV-cache decoding: prefill the left-padded prompt, then one token per loop step."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llmcxr_jax.models.gpt_neox import GPTNeoXForCausalLM, KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(graphdef, state, input_ids, attention_mask, max_new_tokens: int, eos_id):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = KVCache.create(model.cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model.decode(input_ids, cache, attention_mask)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = first == eos_id

    def step(i, carry):
        out, cache, done = carry
        prev = out[:, i - 1]
        logits, cache = model.decode(prev[:, None], cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, eos_id, nxt)  # finished rows keep emitting eos, as HF pads them
        return out.at[:, i].set(nxt), cache, done | (nxt == eos_id)

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, done))
    return out


def greedy_generate(model: GPTNeoXForCausalLM, input_ids, attention_mask, max_new_tokens: int,
                    eos_id: int = -1) -> jax.Array:
    """input_ids [batch, prompt] (left padded) -> [batch, max_new_tokens] greedy continuation.

    eos_id = -1 decodes exactly max_new_tokens tokens; otherwise rows that produced eos repeat it.
    """
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, bool),
                   max_new_tokens, jnp.int32(eos_id))
