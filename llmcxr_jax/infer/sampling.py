"""Choosing the next token: which ids a step may emit, temperature / top-k / top-p filtering,
greedy or sampled picks, and the per-step, per-row random keys. Pure functions, jit friendly.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer.threefry import gumbel_rows

MODES = ("text", "image", "unconstrained")
# LLM-CXR's generation settings: nucleus sampling at temperature 1, top_p 0.92, top_k 0 (off)
LLMCXR_TEMPERATURE, LLMCXR_TOP_P, LLMCXR_TOP_K = 1.0, 0.92, 0
_LANES = 128  # a row length XLA:CPU vectorises: the bisection's partial sums, the noise's padded rows


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn. max_new_tokens and greedy shape the compiled decoder;
    temperature, top_k and top_p are traced, so changing them does not recompile.

    temperature scales the logits before filtering; top_k 0 means off; top_p 1.0 means off.
    greedy takes the argmax of the allowed logits and ignores the other fields.
    """

    max_new_tokens: int
    greedy: bool
    temperature: float
    top_k: int
    top_p: float

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.greedy and not self.temperature > 0.0:
            raise UsageError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy=True")

    @classmethod
    def greedy_decoding(cls, max_new_tokens: int) -> SamplingConfig:
        return cls(max_new_tokens=max_new_tokens, greedy=True, temperature=1.0, top_k=0, top_p=1.0)

    @classmethod
    def llmcxr(cls, max_new_tokens: int) -> SamplingConfig:
        """LLM-CXR's generation settings: nucleus sampling, top_p 0.92, top_k 0, temperature 1."""
        return cls(max_new_tokens=max_new_tokens, greedy=False, temperature=LLMCXR_TEMPERATURE, top_k=LLMCXR_TOP_K,
                   top_p=LLMCXR_TOP_P)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Which ids each response position may hold and which ids end a row. Static under jit.

    text: real text ids only (no image ids, no padded rows). image: position 0 is open_id,
    positions 1..image_tokens image ids [T, T+K), then close_id, then end_id.
    unconstrained: every real row (the original LLM-CXR behaviour).
    """

    mode: str
    text_size: int  # T
    image_codes: int  # K
    vocab_size: int  # real rows, T + K; ids >= vocab_size are table padding
    stop_ids: tuple[int, ...]
    pad_id: int
    image_tokens: int = 0
    open_id: int = -1
    close_id: int = -1
    end_id: int = -1

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mode == "image":
            if self.image_tokens < 1 or self.image_codes < 1:
                raise UsageError(f"image mode needs image_tokens >= 1 and a codebook, got {self.image_tokens}, "
                                 f"{self.image_codes} codes")
            for name in ("open_id", "close_id", "end_id"):
                tid = getattr(self, name)
                if not 0 <= tid < self.text_size:
                    raise UsageError(f"image mode needs {name} to be a text id in [0, {self.text_size}), got {tid}")

    @property
    def image_response_length(self) -> int:
        """"<", the codes, ">", the end key."""
        return self.image_tokens + 3


def allowed_tokens(plan: DecodePlan, step, table_rows: int) -> jax.Array:
    """[table_rows] bool: the ids response position `step` (0-based, traced ok) may emit."""
    ids = jnp.arange(table_rows)
    real = ids < plan.vocab_size
    if plan.mode == "unconstrained":
        return real
    if plan.mode == "text":
        return ids < plan.text_size
    is_image = (ids >= plan.text_size) & (ids < plan.text_size + plan.image_codes)
    n = plan.image_tokens
    return jnp.where(step == 0, ids == plan.open_id,
                     jnp.where(step <= n, is_image,
                               jnp.where(step == n + 1, ids == plan.close_id, ids == plan.end_id)))


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (radix-sort trick), so a threshold can be bisected exactly."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(masked_sum, budget, shape) -> jax.Array:
    """The smallest uint32 t with masked_sum(t) < budget (masked_sum falls as t rises), for each entry of
    shape: 32 bisection steps over the whole uint32 range."""
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        passes = masked_sum(mid) < budget
        return jnp.where(passes, lo, mid), jnp.where(passes, mid, hi)

    # lo never passes (as if below every key); hi always passes (nothing above it)
    bounds = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, step, bounds)[1]


def _smallest_passing_cpu(keys: jax.Array, weights: jax.Array, budget) -> jax.Array:
    """_smallest_passing shaped for XLA:CPU: a few rows at a time (a row's 32 passes then read it from cache;
    at batch 8 the [8, 50k] pair of arrays does not stay there), each row as [vocab / 128, 128] summed over
    its first axis (128 independent partial sums; a sum along the row is one serial chain of adds).
    Padding has key 0, which no t is below, and weight 0."""
    lead, n = keys.shape[:-1], keys.shape[-1]
    pad = -n % _LANES
    tiles = lambda x: jnp.pad(x.reshape(-1, n), ((0, 0), (0, pad))).reshape(-1, (n + pad) // _LANES, _LANES)  # noqa: E731

    def row(args):
        keys, weights = args
        return _bisect(lambda t: jnp.sum(jnp.sum(jnp.where(keys > t, weights, 0), axis=0)), budget, ())

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    at_once = max(1, min(math.prod(lead), cores))  # XLA:CPU runs one thread per core this process may use
    return jax.lax.map(row, (tiles(keys), tiles(weights)), batch_size=at_once).reshape(lead + (1,))


def _smallest_passing_all_rows(keys: jax.Array, weights: jax.Array, budget) -> jax.Array:
    """_smallest_passing over every row at once (accelerators)."""
    return _bisect(lambda t: jnp.sum(jnp.where(keys > t, weights, 0), axis=-1, keepdims=True), budget,
                   keys.shape[:-1] + (1,))


def _smallest_passing(keys: jax.Array, weights: jax.Array, budget) -> jax.Array:
    """keys [..., vocab] uint32 -> [..., 1]: the smallest t with sum(weights[keys > t]) < budget.

    Bisection over the uint32 range: exact, no sort, one masked sum per step; on a CPU row by row
    (_smallest_passing_cpu), elsewhere all rows at once.
    """
    return jax.lax.platform_dependent(keys, weights, budget, cpu=_smallest_passing_cpu,
                                      default=_smallest_passing_all_rows)


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """logits [..., vocab] (temperature already applied) -> the same with dropped ids at -inf.

    top-k (0 = off) keeps the k largest; top-p (1 = off) then keeps the smallest set of the
    largest ids whose renormalised probability reaches top_p, so always the top one. An id is
    kept when the mass (or count) strictly above it is below top_p (or k): ids tied with the
    last kept one are kept too. Thresholds are found by bisection, not by sorting the vocabulary;
    top_k and top_p may be traced, so one compiled decoder serves every setting.
    """
    keys = _ordered_bits(logits)

    def apply_top_k(x):
        t = _smallest_passing(keys, jnp.ones_like(keys, jnp.int32), top_k)
        return jnp.where(keys >= t, x, -jnp.inf)

    def apply_top_p(x):
        t = _smallest_passing(keys, jax.nn.softmax(x, axis=-1), top_p)
        return jnp.where(keys >= t, x, -jnp.inf)

    logits = jax.lax.cond(jnp.asarray(top_k) > 0, apply_top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.asarray(top_p) < 1.0, apply_top_p, lambda x: x, logits)


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """One key per row: rng given per row ([batch] keys) is used as is; one key is folded with the
    row index, so a row's stream does not depend on the batch size."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
    if rng.shape != (batch,):
        raise UsageError(f"rng must be one key or one key per row ({batch}), got key shape {rng.shape}")
    return rng


def step_keys(keys: jax.Array, step) -> jax.Array:
    """[batch] row keys -> the keys of response position `step`: fold_in(row key, step)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def first_argmax(x: jax.Array) -> jax.Array:
    """[..., n] -> int32 [...]: jnp.argmax's answer (the first maximum; the first NaN where there is one) as
    a max and a min over the row, two reductions XLA:CPU vectorises (its argmax, one reduction of value and
    index pairs, runs element by element: 1.1 ms against ~0.1 ms for 8 x 51k logits)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), ids, x.shape[-1]), axis=-1)


def categorical(keys: jax.Array, logits: jax.Array, offset: int = 0, table_rows: int | None = None) -> jax.Array:
    """One draw per row from softmax(logits) with that row's key: jax.random.categorical's draw (the argmax
    of logits plus Gumbel noise of the row's key), the same ids, through first_argmax. logits may be the
    rows [offset, offset + n) of a table_rows-wide row whose other entries are -inf: the noise is drawn for
    the whole row and sliced, so the index (within the slice) is the one categorical gives on the whole row."""
    width = logits.shape[-1]
    rows = width if table_rows is None else table_rows
    # padded with -inf to a multiple of 128 entries: XLA:CPU vectorises the noise's hash only over such a
    # row (a 50,281-entry row took 5x as long as a 50,304-entry one); a padded entry is never the first max
    padded = -(-width // _LANES) * _LANES
    logits = jnp.pad(logits, ((0, 0), (0, padded - width)), constant_values=-jnp.inf)
    return first_argmax(logits + gumbel_rows(keys, rows, offset, offset + padded, logits.dtype))


def sampled_rows(plan: DecodePlan) -> tuple[int, int]:
    """The table rows [start, stop) a sampled position may emit: text ids (text), image ids (image's code
    positions; its other positions are forced), every real row (unconstrained). The head need compute no
    others: every other row is -inf in next_tokens."""
    if plan.mode == "text":
        return 0, plan.text_size
    if plan.mode == "image":
        return plan.text_size, plan.text_size + plan.image_codes
    return 0, plan.vocab_size


def forced_token(plan: DecodePlan, step) -> jax.Array:
    """Image mode's token at a position that allows one id: "<" at 0, ">" after the codes, then the end key."""
    n = plan.image_tokens
    return jnp.where(step == 0, plan.open_id, jnp.where(step == n + 1, plan.close_id, plan.end_id)).astype(jnp.int32)


def is_forced(plan: DecodePlan, step) -> jax.Array:
    """Whether position `step` allows one id only (image mode outside its codes)."""
    if plan.mode != "image":
        return jnp.asarray(False)
    return (step < 1) | (step > plan.image_tokens)


def draw(logits: jax.Array, step, keys: jax.Array, *, greedy: bool, temperature, top_k, top_p, offset: int = 0,
         table_rows: int | None = None) -> jax.Array:
    """logits [batch, n] of response position `step` -> the picked ids [batch] int32: the argmax, or a draw
    after temperature, top-k and top-p with fold_in(row key, step). The logits may be the rows [offset,
    offset + n) of table_rows-wide rows (see categorical); the ids are the table's."""
    if greedy:
        return first_argmax(logits) + offset
    logits = filter_logits(logits / temperature, top_k, top_p)
    return categorical(step_keys(keys, step), logits, offset=offset, table_rows=table_rows) + offset


def tokens_from_rows(logits: jax.Array, step, keys: jax.Array, plan: DecodePlan, table_rows: int, *, greedy: bool,
                     temperature, top_k, top_p) -> jax.Array:
    """next_tokens for a sampled position from the logits of sampled_rows(plan) alone ([batch, stop - start]):
    the same ids next_tokens gives on the whole table row (its other entries -inf; the Gumbel noise drawn
    for the whole row)."""
    return draw(logits, step, keys, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                offset=sampled_rows(plan)[0], table_rows=table_rows)


def next_tokens(logits: jax.Array, step, keys: jax.Array, plan: DecodePlan, *, greedy: bool, temperature,
                top_k, top_p) -> jax.Array:
    """logits [batch, table] of response position `step` -> token ids [batch] int32."""
    logits = jnp.where(allowed_tokens(plan, step, logits.shape[-1]), logits, -jnp.inf)
    return draw(logits, step, keys, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)


def advance(tokens: jax.Array, done: jax.Array, plan: DecodePlan) -> tuple[jax.Array, jax.Array]:
    """Finished rows emit pad; a row is done once it emitted a stop id -> (tokens, done)."""
    tokens = jnp.where(done, plan.pad_id, tokens)
    stops = np.asarray(plan.stop_ids, np.int32)
    hit = jnp.any(tokens[:, None] == stops[None, :], axis=-1) if stops.size else jnp.zeros_like(done)
    return tokens, done | hit
