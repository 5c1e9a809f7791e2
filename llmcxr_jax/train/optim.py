"""The LM optimizer: AdamW with warmup then constant / cosine / linear decay, global-norm clipping,
and freeze masks (parameters by path regex, or every row but the image-token rows).
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llmcxr_jax.errors import UsageError

SCHEDULES = ("constant", "cosine", "linear")
EMBEDDING_PATHS = ("embed_in/embedding", "embed_out/kernel")  # tables that carry image-token rows
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "final_layer_norm")  # models/gpt_neox.py


def learning_rate(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps (LLM-CXR: 50, DeepSpeed WarmupLR), then constant, or
    cosine / linear decay to learning_rate * final_lr_ratio at `steps`."""
    if t.schedule not in SCHEDULES:
        raise UsageError(f"train.schedule {t.schedule!r} is not one of {SCHEDULES}")
    peak, warm = float(t.learning_rate), int(t.warmup_steps)
    decay_steps = max(int(t.steps) - warm, 1)
    end = peak * float(t.final_lr_ratio)
    if t.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif t.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(t.final_lr_ratio))
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def path_name(path) -> str:
    """A pytree path as "layers/0/attention/query_key_value/kernel"."""
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def update_mask(params: Any, freeze: str = "", image_rows_only: bool = False, layout=None) -> Any:
    """Per-parameter multiplier for the updates: 1 (trained), 0 (frozen) or, for the embedding
    tables when image_rows_only, a row mask that trains only the image-token rows. None = all
    trained. `freeze` is a regex searched in each parameter's path."""
    if not freeze and not image_rows_only:
        return None
    pattern = re.compile(freeze) if freeze else None
    if image_rows_only and layout is None:
        raise UsageError("train.image_rows_only needs the vocabulary layout")

    def mask(path, leaf):
        name = path_name(path)
        if image_rows_only:
            if name not in EMBEDDING_PATHS:
                return jnp.zeros((), jnp.float32)
            first, last = layout.image_token_range
            rows = jnp.arange(leaf.shape[0 if name.startswith("embed_in") else 1])
            keep = ((rows >= first) & (rows < last)).astype(jnp.float32)
            return keep[:, None] if name.startswith("embed_in") else keep[None, :]
        return jnp.zeros((), jnp.float32) if pattern.search(name) else jnp.ones((), jnp.float32)

    out = jax.tree_util.tree_map_with_path(mask, params)
    if pattern is not None and all(float(jnp.max(m)) == 1.0 for m in jax.tree.leaves(out)):
        raise UsageError(f"train.freeze {freeze!r} matches no parameter path (e.g. {_first_path(params)})")
    return out


def _first_path(params) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return path_name(leaves[0][0]) if leaves else "<empty>"


class MaskState(NamedTuple):
    pass


def scale_by_mask(mask: Any) -> optax.GradientTransformation:
    """Multiply updates by a fixed mask pytree (frozen entries never move, weight decay included)."""

    def init(params):
        del params
        return MaskState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: (u * m.astype(u.dtype)), updates, mask), state

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
    """Weight decay where HF Trainer puts it: every parameter but biases and LayerNorm scales / biases
    (embeddings decay). By name, not ndim: a stacked (scan) bias is [layers, d], a qkv bias 3-d."""
    def decays(path, leaf):
        parts = path_name(path).split("/")
        return parts[-1] != "bias" and not any(p in LAYER_NORMS for p in parts)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: ml_collections.ConfigDict, params: Any, layout=None) -> optax.GradientTransformation:
    """AdamW (HF Trainer defaults LLM-CXR ran with: betas 0.9/0.999, eps 1e-8, decay 0, clip 1.0)."""
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
    parts.append(optax.adamw(learning_rate(t), b1=float(t.adam_b1), b2=float(t.adam_b2), eps=float(t.adam_eps),
                             weight_decay=float(t.weight_decay), mask=decay_mask))
    mask = update_mask(params, t.freeze, t.image_rows_only, layout)
    if mask is not None:
        parts.append(scale_by_mask(mask))
    return optax.chain(*parts)
