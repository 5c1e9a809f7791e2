"""Jitted KV-cache decoding: prefill the left-padded prompts, then a `lax.while_loop` that emits
one token per row per step until every row has stopped or max_new_tokens is reached.
Image responses are constrained to "<", h*w image tokens, ">", "### End", or sampled freely and
retried until they hold h*w image tokens, as the original LLM-CXR did (capped here).
`reporting_steps` tells a host function each step as it is decoded (the web demo's progress bars).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer.sampling import (
    DecodePlan,
    SamplingConfig,
    advance,
    forced_token,
    is_forced,
    row_keys,
    sampled_rows,
    step_keys,
    tokens_from_rows,
)
from llmcxr_jax.models.gpt_neox import GPTNeoXForCausalLM, KVCache
from llmcxr_jax.vocab import SpecialTokens, VocabLayout


@struct.dataclass
class GenerateOutput:
    """tokens [batch, max_new_tokens] (pad after a row stopped); lengths [batch]: tokens a row
    emitted, its stop id included; done [batch]: the row stopped; steps: positions decoded."""

    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    steps: jax.Array


# While `reporting_steps` is active, decoding reports each step to this host function.
_step_listener: Callable[[int, int], None] | None = None
_listener_lock = threading.Lock()


@contextlib.contextmanager
def reporting_steps(listener: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, every decode of this process calls listener(emitted, max_new_tokens) as it
    goes: emitted counts the positions sampled so far (1 after the prefill, then one more per loop
    step). The calls come from XLA's host-callback thread, in step order, and all arrive before the
    decode's tokens are ready. One block at a time (a lock). The decoder runs with a
    jax.debug.callback in its loop: a second compiled program, the same sampled tokens."""
    global _step_listener
    with _listener_lock:
        _step_listener = listener
        try:
            yield
        finally:
            _step_listener = None


def _tell(emitted, max_new: int) -> None:
    listener = _step_listener
    if listener is not None:
        listener(int(emitted), max_new)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "max_new", "greedy", "report_steps"))
def _decode(graphdef, state, input_ids, attention_mask, keys, knobs, plan: DecodePlan, max_new: int, greedy: bool,
            report_steps: bool = False):
    model = nnx.merge(graphdef, state)
    tell = functools.partial(jax.debug.callback, functools.partial(_tell, max_new=max_new)) if report_steps \
        else lambda _: None
    batch, prompt_len = input_ids.shape
    rows, table = sampled_rows(plan), model.cfg.padded_vocab_size

    def pick(x, step):  # x [batch, 1, embed]: the last position's hidden state -> ids [batch]
        def sampled(_):  # the logits of the rows this position may emit (every other row would be -inf)
            logits = model.head_logits(x, rows=rows)[:, 0]
            return tokens_from_rows(logits, step, keys, plan, table, greedy=greedy, temperature=knobs[0],
                                    top_k=knobs[1], top_p=knobs[2])

        if plan.mode != "image":
            return sampled(None)
        return jax.lax.cond(is_forced(plan, step), lambda _: jnp.full((batch,), forced_token(plan, step)),
                            sampled, None)

    cache = KVCache.create(model.cfg, batch, prompt_len + max_new)
    x, cache = model.decode_states(input_ids, cache, attention_mask)
    first, done = advance(pick(x[:, -1:], 0), jnp.zeros((batch,), bool), plan)
    tokens = jnp.full((batch, max_new), plan.pad_id, jnp.int32).at[:, 0].set(first)
    lengths = jnp.ones((batch,), jnp.int32)
    tell(jnp.int32(1))

    def keep_going(carry):
        step, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, done, lengths = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # [batch, 1]
        x, cache = model.decode_states(prev, cache)
        nxt, new_done = advance(pick(x, step), done, plan)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], step, axis=1)
        tell(step + 1)
        return step + 1, tokens, cache, new_done, lengths + (~done).astype(jnp.int32)

    carry = (jnp.int32(1), tokens, cache, done, lengths)
    steps, tokens, _, done, lengths = jax.lax.while_loop(keep_going, body, carry)
    return GenerateOutput(tokens=tokens, lengths=lengths, done=done, steps=steps)


def _check_prompts(input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, bool)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise UsageError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, prompt]")
    if not isinstance(mask, jax.core.Tracer) and not bool(np.asarray(mask)[:, -1].all()):
        raise UsageError("prompts must be left padded: every row's last attention_mask entry must be 1")
    return ids, mask


def generate_with_plan(model: GPTNeoXForCausalLM, input_ids, attention_mask, *, plan: DecodePlan, rng,
                       sampling: SamplingConfig) -> GenerateOutput:
    """The decoder for any DecodePlan; `generate` builds the plan from the vocabulary."""
    ids, mask = _check_prompts(input_ids, attention_mask)
    if plan.vocab_size != model.cfg.vocab_size:
        raise UsageError(f"plan has {plan.vocab_size} real vocabulary rows, the model {model.cfg.vocab_size}")
    if plan.mode == "image" and sampling.max_new_tokens < plan.image_response_length:
        raise UsageError(f"max_new_tokens {sampling.max_new_tokens} cannot hold an image response of "
                         f"{plan.image_response_length} tokens (\"<\", {plan.image_tokens} codes, \">\", end key)")
    positions = model.cfg.max_position_embeddings
    if ids.shape[1] + sampling.max_new_tokens > positions:
        raise UsageError(f"the prompt ({ids.shape[1]} tokens) and max_new_tokens ({sampling.max_new_tokens}) need "
                         f"{ids.shape[1] + sampling.max_new_tokens} positions; this model has {positions}: shorten "
                         "the report, question or instruction, or lower --max-new-tokens")
    graphdef, state = nnx.split(model)
    knobs = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
    return _decode(graphdef, state, ids, mask, row_keys(rng, ids.shape[0]), knobs, plan,
                   sampling.max_new_tokens, sampling.greedy, report_steps=_step_listener is not None)


def stop_ids(special: SpecialTokens, stop_at_eos: bool = True) -> tuple[int, ...]:
    """The ids that end a response: the end key ("### End") and, unless stop_at_eos is False (LLM-CXR
    hands only the end key to transformers' generate), eos."""
    return tuple(sorted({special.end_key_id, special.eos_id} if stop_at_eos else {special.end_key_id}))


def make_plan(layout: VocabLayout, special: SpecialTokens, mode: str, *, image_tokens: int = 0,
              open_id: int = -1, close_id: int = -1, stop_at_eos: bool = True) -> DecodePlan:
    """Rows stop after the end key ("### End") or eos (the end key only when stop_at_eos is False);
    finished rows emit pad. The image-span fields are kept only in image mode, so other modes share one
    compiled decoder."""
    image = mode == "image"
    return DecodePlan(mode=mode, text_size=layout.text_size, image_codes=layout.image_codes,
                      vocab_size=layout.size, stop_ids=stop_ids(special, stop_at_eos),
                      pad_id=special.pad_id, image_tokens=image_tokens if image else 0,
                      open_id=open_id if image else -1, close_id=close_id if image else -1,
                      end_id=special.end_key_id if image else -1)


def generate(model: GPTNeoXForCausalLM, input_ids, attention_mask, *, layout: VocabLayout,
             special: SpecialTokens, mode: str, rng, sampling: SamplingConfig, image_tokens: int = 0,
             open_id: int = -1, close_id: int = -1, stop_at_eos: bool = True) -> GenerateOutput:
    """Continue left-padded prompts input_ids [batch, prompt] -> GenerateOutput.

    mode "text": image ids and padded rows are never emitted. "image": the response is forced to
    open_id, exactly image_tokens image ids, close_id, the end key (open/close ids are "<" and
    ">" as the tokenizer spells them). "unconstrained": any real id, as LLM-CXR sampled.
    Rows stop at the end key or eos; stop_at_eos False: at the end key only, as LLM-CXR did.
    rng: one key, or one key per row; position t of row r uses fold_in(key_r, t).
    """
    if layout.padded_size != model.cfg.padded_vocab_size:
        raise UsageError(f"layout has {layout.padded_size} table rows, the model {model.cfg.padded_vocab_size}")
    plan = make_plan(layout, special, mode, image_tokens=image_tokens, open_id=open_id, close_id=close_id,
                     stop_at_eos=stop_at_eos)
    return generate_with_plan(model, input_ids, attention_mask, plan=plan, rng=rng, sampling=sampling)


def greedy_generate(model: GPTNeoXForCausalLM, input_ids, attention_mask, max_new_tokens: int,
                    eos_id: int = -1) -> jax.Array:
    """input_ids [batch, prompt] (left padded) -> [batch, max_new_tokens] greedy continuation.

    eos_id = -1 decodes exactly max_new_tokens tokens; otherwise rows that produced eos repeat it.
    """
    cfg = model.cfg
    plan = DecodePlan(mode="unconstrained", text_size=cfg.vocab_size, image_codes=0, vocab_size=cfg.vocab_size,
                      stop_ids=() if eos_id < 0 else (eos_id,), pad_id=max(eos_id, 0))
    out = generate_with_plan(model, input_ids, attention_mask, plan=plan, rng=jax.random.key(0),
                             sampling=SamplingConfig.greedy_decoding(max_new_tokens))
    return out.tokens


@dataclasses.dataclass
class UnconstrainedImages:
    """codes [batch, image_tokens] (-1 where no try succeeded); retries [batch]: tries after the first
    (max_retries for a row that never succeeded); ok [batch]: a try held exactly image_tokens image
    ids; found [batch]: image ids in the response kept (image_tokens) or, for a failed row, its last try;
    responses: per row, the ids that try sampled, its stop id ("### End") included when it emitted one."""

    codes: np.ndarray
    retries: np.ndarray
    ok: np.ndarray
    found: np.ndarray
    responses: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def retry_rate(self) -> float:
        """Extra tries per row, averaged: 0 when every first try had exactly h*w image tokens."""
        return float(np.mean(self.retries))


def image_codes_in(response: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """The codes of every image id in one response, in order, wherever they sit: LLM-CXR keeps exactly
    these (it never checks for "<" and ">" around them)."""
    return layout.image_code(response[layout.is_image_token(response)])


def _bucket(n: int, batch: int) -> int:
    """Rows re-run together: n rounded up to a power of two (at most batch), so retries of any
    number of rows compile at most log2(batch) more decoders."""
    return min(batch, 1 << max(n - 1, 0).bit_length())


def generate_image_unconstrained(model: GPTNeoXForCausalLM, input_ids, attention_mask, *, layout: VocabLayout,
                                 special: SpecialTokens, rng, sampling: SamplingConfig, image_tokens: int,
                                 max_retries: int) -> UnconstrainedImages:
    """LLM-CXR's report->CXR decoding (its generate_eval.py): sample over the whole real vocabulary,
    keep the image ids of the response, and try again until they are exactly image_tokens.

    As there, a row stops only at the end key ("### End" is the eos_token_id the original hands to
    transformers' generate, so <|endoftext|> does not end a response) or after max_new_tokens (300 in
    the original for 256 codes). The original retries without end; here a row gives up after
    max_retries retries. Try t of row r samples with fold_in(key_r, t); only the rows still failing
    are run again. A greedy response does not change with the key, so greedy decoding tries once.
    """
    if max_retries < 0:
        raise UsageError(f"max_retries must be >= 0 (0: one try, no retry), got {max_retries}")
    if sampling.max_new_tokens < image_tokens:
        raise UsageError(f"max_new_tokens {sampling.max_new_tokens} cannot hold {image_tokens} image tokens")
    if layout.padded_size != model.cfg.padded_vocab_size:
        raise UsageError(f"layout has {layout.padded_size} table rows, the model {model.cfg.padded_vocab_size}")
    ids, mask = (np.asarray(a) for a in _check_prompts(input_ids, attention_mask))
    plan = make_plan(layout, special, "unconstrained", stop_at_eos=False)
    batch = ids.shape[0]
    keys = row_keys(jnp.asarray(rng), batch)
    codes = np.full((batch, image_tokens), -1, np.int64)
    retries = np.full((batch,), 0 if sampling.greedy else max_retries, np.int64)
    ok = np.zeros((batch,), bool)
    found = np.zeros((batch,), np.int64)
    responses: list[list[int]] = [[] for _ in range(batch)]
    for attempt in range(1 if sampling.greedy else max_retries + 1):
        pending = np.flatnonzero(~ok)
        rows = np.concatenate([pending, np.full(_bucket(len(pending), batch) - len(pending), pending[0])])
        keys_t = step_keys(keys[rows], attempt)
        out = generate_with_plan(model, ids[rows], mask[rows], plan=plan, rng=keys_t, sampling=sampling)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i, r in enumerate(pending):
            responses[r] = [int(t) for t in tokens[i, :lengths[i]]]
            got = image_codes_in(tokens[i, :lengths[i]], layout)
            found[r] = got.size
            if got.size == image_tokens:
                codes[r], retries[r], ok[r] = got, attempt, True
        if ok.all():
            break
    return UnconstrainedImages(codes=codes, retries=retries, ok=ok, found=found, responses=responses)
