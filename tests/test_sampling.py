"""Sampling decoder: KV-cache loop vs a naive recompute, HF greedy parity, image-span and text
constraints over many seeds, filter parity with HF logits warpers, stopping and retries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer import sampling as smp
from llmcxr_jax.infer.generate import (
    GenerateOutput,
    generate,
    generate_image_unconstrained,
    generate_with_plan,
    make_plan,
)
from llmcxr_jax.infer.sampling import SamplingConfig
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
from llmcxr_jax.vocab import SpecialTokens, VocabLayout

T, K = 60, 16
LAYOUT = VocabLayout.create(T, K)  # 76 real rows, 128 stored
SPECIAL = SpecialTokens(eos_id=0, pad_id=2, end_key_id=1, instruction_key_id=3, response_key_id=4)
OPEN, CLOSE = 5, 6
CFG = GPTNeoXConfig(vocab_size=LAYOUT.size, padded_vocab_size=LAYOUT.padded_size, hidden_size=32, num_layers=2,
                    num_heads=4, intermediate_size=64, rotary_pct=0.25, rotary_base=10000.0,
                    max_position_embeddings=128, layer_norm_eps=1e-5, use_parallel_residual=True,
                    attention_bias=True, hidden_act="gelu", initializer_range=0.2, dtype="float32",
                    param_dtype="float32", scan_layers=False, remat_policy="none")
LLMCXR = SamplingConfig.llmcxr(12)
HOT = SamplingConfig(max_new_tokens=12, greedy=False, temperature=1.5, top_k=0, top_p=1.0)


def cfg_with(s: SamplingConfig, **kw) -> SamplingConfig:
    return SamplingConfig(**{**s.__dict__, **kw})


def with_logit_bias(model, bias):
    """Adds `bias` [vocab] to every step's logits: the final norm pins hidden dim 0 to 1 and
    row 0 of the LM head carries the bias; the other dims keep the logits context dependent."""
    ln, head = model.final_layer_norm, model.embed_out["kernel"]
    ln.scale.set_value(ln.scale.get_value().at[0].set(0.0))
    ln.bias.set_value(ln.bias.get_value().at[0].set(1.0))
    head.set_value(head.get_value().at[0, :len(bias)].set(jnp.asarray(bias, jnp.float32)))
    return model


def fixed_distribution(model, logits):
    """A model whose next-token logits are `logits` at every position, whatever the context."""
    ln, head = model.final_layer_norm, model.embed_out["kernel"]
    ln.scale.set_value(jnp.zeros_like(ln.scale.get_value()))
    ln.bias.set_value(jnp.zeros_like(ln.bias.get_value()).at[0].set(1.0))
    head.set_value(jnp.zeros_like(head.get_value()).at[0, :len(logits)].set(jnp.asarray(logits, jnp.float32)))
    return model


def prompts(rng: np.random.Generator, lengths, width):
    ids = np.full((len(lengths), width), SPECIAL.pad_id, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(7, T, n)
        mask[i, width - n:] = True
    return ids, mask


def run(model, ids, mask, mode, sampling, seed=0, hw=6, special=SPECIAL) -> GenerateOutput:
    out = generate(model, ids, mask, layout=LAYOUT, special=special, mode=mode, rng=jax.random.key(seed),
                   sampling=sampling, image_tokens=hw, open_id=OPEN, close_id=CLOSE)
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def model():
    bias = np.zeros(LAYOUT.size)
    bias[SPECIAL.end_key_id] = 1.5  # stopping happens within a dozen steps now and then
    bias[T:] = 1.0  # image ids are tempting, so the text-mode mask has work to do
    return with_logit_bias(init_model(CFG, seed=0), bias)


# ------------------------------------------------------------------ naive reference

@nnx.jit
def forward(m, ids, mask):
    return m(ids, attention_mask=mask)


def ref_allowed(mode, step, hw):
    ids = np.arange(LAYOUT.padded_size)
    if mode == "unconstrained":
        return ids < LAYOUT.size
    if mode == "text":
        return ids < T
    if step == 0:
        return ids == OPEN
    if step <= hw:
        return (ids >= T) & (ids < T + K)
    return ids == (CLOSE if step == hw + 1 else SPECIAL.end_key_id)


def ref_filter(logits, s: SamplingConfig):
    """numpy: temperature, then top-k, then top-p on the renormalised top-k, by sorting."""
    x = logits.astype(np.float32) / np.float32(s.temperature)
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, bool)
    if s.top_k:
        keep[order[s.top_k:]] = False
    if s.top_p < 1.0:
        z = np.where(keep, x, -np.inf)[order]
        p = np.exp(z - z[0])
        p = (p / p.sum()).astype(np.float32)
        before = np.cumsum(p) - p
        drop = before >= s.top_p
        drop[0] = False
        keep[order[drop]] = False
    return np.where(keep, x, -np.inf)


def naive_generate(model, ids, mask, mode, s: SamplingConfig, seed, hw=6):
    """Full forward over prompt + tokens so far at every step; key of row r at step t is
    fold_in(fold_in(rng, r), t)."""
    b, p = ids.shape
    n = s.max_new_tokens
    seq = np.concatenate([ids, np.full((b, n), SPECIAL.pad_id, np.int32)], 1)
    full_mask = np.concatenate([mask, np.ones((b, n), bool)], 1)  # causal: later columns never matter
    rng = jax.random.key(seed)
    done = np.zeros(b, bool)
    lengths = np.zeros(b, int)
    for t in range(n):
        logits = np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(full_mask)))[:, p + t - 1]
        for r in range(b):
            if done[r]:
                seq[r, p + t] = SPECIAL.pad_id
                continue
            x = np.where(ref_allowed(mode, t, hw), logits[r], -np.inf)
            if s.greedy:
                tok = int(np.argmax(x))
            else:
                key = jax.random.fold_in(jax.random.fold_in(rng, r), t)
                tok = int(jax.random.categorical(key, jnp.asarray(ref_filter(x, s))))
            seq[r, p + t] = tok
            lengths[r] += 1
            done[r] = tok in (SPECIAL.end_key_id, SPECIAL.eos_id)
        if done.all():
            return seq[:, p:], lengths, t + 1
    return seq[:, p:], lengths, n


@pytest.mark.parametrize("mode,s", [
    ("text", cfg_with(HOT, temperature=0.7)),
    ("image", cfg_with(HOT, temperature=1.0, top_k=5)),
    ("text", LLMCXR),
    ("unconstrained", cfg_with(HOT, temperature=1.3, top_k=20, top_p=0.8)),
], ids=["temperature", "top_k_image", "top_p", "all_three"])
def test_kv_cache_sampling_equals_naive_recompute(model, mode, s):
    ids, mask = prompts(np.random.default_rng(1), [8, 3, 5, 1], 8)
    for seed in (0, 1):
        out = run(model, ids, mask, mode, s, seed=seed)
        ref, lengths, steps = naive_generate(model, ids, mask, mode, s, seed)
        np.testing.assert_array_equal(out.tokens, ref)
        np.testing.assert_array_equal(out.lengths, lengths)
        assert int(out.steps) == steps


def test_same_seed_same_tokens_and_rows_follow_their_own_keys(model):
    ids, mask = prompts(np.random.default_rng(2), [8, 2, 4, 6], 8)
    keys = jax.random.split(jax.random.key(7), 4)
    gen = lambda i, m, k: jax.tree.map(np.asarray, generate(  # noqa: E731
        model, i, m, layout=LAYOUT, special=SPECIAL, mode="text", rng=k, sampling=LLMCXR))
    a, b = gen(ids, mask, keys), gen(ids, mask, keys)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    perm = np.array([2, 0, 3, 1])  # rows moved around the batch keep their tokens
    np.testing.assert_array_equal(gen(ids[perm], mask[perm], keys[perm]).tokens, a.tokens[perm])
    others = gen(ids, mask, jax.random.split(jax.random.key(8), 4))
    assert (others.tokens != a.tokens).any()


# ------------------------------------------------------------------ HF greedy parity

def test_greedy_with_eos_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    from hf_helpers import left_padded_batch, make_hf_model

    from llmcxr_jax import sharding
    from llmcxr_jax.convert import hf_gpt_neox

    hf = make_hf_model(str(tmp_path), 97, seed=4)
    imported = hf_gpt_neox.import_hf(str(tmp_path), 0, mesh=sharding.make_mesh("1,-1,1"), dtype="float32")
    ids, mask, _ = left_padded_batch(np.random.default_rng(6), 97, [7, 4, 6], 7)
    hf.generation_config.eos_token_id = None

    def hf_greedy(**kw):
        with torch.no_grad():
            return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                               max_new_tokens=16, pad_token_id=1, **kw).numpy()[:, 7:]

    stop = int(hf_greedy()[0, 5])  # a token row 0 emits: that row must stop there, HF style
    ref = hf_greedy(eos_token_id=stop)
    special = SpecialTokens(eos_id=stop, pad_id=1, end_key_id=stop, instruction_key_id=2, response_key_id=3)
    out = generate(imported.model, ids, mask, layout=imported.layout, special=special, mode="text",
                   rng=jax.random.key(0), sampling=SamplingConfig.greedy_decoding(16))
    got = np.asarray(out.tokens)
    assert (ref == stop).any(axis=1)[0] and int(out.lengths[0]) <= 6
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    assert (got[:, ref.shape[1]:] == 1).all() and int(out.steps) == ref.shape[1]


# ------------------------------------------------------------------ constraints, many seeds

def test_image_and_text_constraints_hold_over_seeds():
    hw = 6
    span_escapes = image_in_free_text = 0
    for seed in range(24):
        g = np.random.default_rng(seed)
        bias = g.normal(0, 3, LAYOUT.size)
        bias[T:] += 2.0
        m = with_logit_bias(init_model(CFG, seed=seed), bias)
        ids, mask = prompts(g, g.integers(1, 9, 4), 8)
        s = (LLMCXR, HOT)[seed % 2]
        img = run(m, ids, mask, "image", s, seed=seed, hw=hw)
        assert (img.tokens[:, 0] == OPEN).all() and (img.tokens[:, hw + 1] == CLOSE).all()
        assert ((img.tokens[:, 1:hw + 1] >= T) & (img.tokens[:, 1:hw + 1] < T + K)).all()
        assert (img.tokens[:, hw + 2] == SPECIAL.end_key_id).all() and (img.tokens[:, hw + 3:] == SPECIAL.pad_id).all()
        assert (img.lengths == hw + 3).all() and img.done.all() and int(img.steps) == hw + 3
        txt = run(m, ids, mask, "text", s, seed=seed)
        for r in range(4):
            resp = txt.tokens[r, :txt.lengths[r]]
            assert (resp < T).all(), (seed, r, resp)
            assert (txt.tokens[r, txt.lengths[r]:] == SPECIAL.pad_id).all()
        free = run(m, ids, mask, "unconstrained", s, seed=seed)  # the masks must be doing the work
        image_in_free_text += int(LAYOUT.is_image_token(free.tokens).any())
        span_escapes += int((free.tokens < T).any())
        assert (free.tokens < LAYOUT.size).all()
    assert image_in_free_text >= 12 and span_escapes >= 12


def test_allowed_tokens_per_mode():
    image = make_plan(LAYOUT, SPECIAL, "image", image_tokens=4, open_id=OPEN, close_id=CLOSE)
    rows = LAYOUT.padded_size
    got = [np.flatnonzero(np.asarray(smp.allowed_tokens(image, t, rows))) for t in range(7)]
    assert [g.tolist() for g in got[:1] + got[5:]] == [[OPEN], [CLOSE], [SPECIAL.end_key_id]]
    for t in range(1, 5):
        assert got[t].tolist() == list(range(T, T + K))
    text = np.asarray(smp.allowed_tokens(make_plan(LAYOUT, SPECIAL, "text"), 3, rows))
    free = np.asarray(smp.allowed_tokens(make_plan(LAYOUT, SPECIAL, "unconstrained"), 3, rows))
    assert np.flatnonzero(text).tolist() == list(range(T))
    assert np.flatnonzero(free).tolist() == list(range(T + K))


# ------------------------------------------------------------------ filtering

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.92), (0.7, 10, 1.0), (1.3, 20, 0.6),
                                                     (1.0, 1, 1.0), (2.0, 0, 0.3)])
def test_filter_matches_transformers_logits_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).normal(0, 2, (16, 300)).astype(np.float32)
    logits[:, 250:] = -np.inf  # masked ids stay masked
    x = torch.tensor(logits)
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    ours = np.asarray(smp.filter_logits(jnp.asarray(logits) / temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(x.numpy()))
    assert np.isfinite(ours).sum(-1).min() >= 1


def test_sampled_frequencies_follow_the_renormalised_distribution():
    logits = jnp.log(jnp.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    plan = smp.DecodePlan(mode="unconstrained", text_size=6, image_codes=0, vocab_size=6, stop_ids=(), pad_id=0)
    n = 40000
    picks = np.asarray(smp.next_tokens(jnp.tile(logits, (n, 1)), 3, smp.row_keys(jax.random.key(0), n), plan,
                                       greedy=False, temperature=1.0, top_k=0, top_p=0.75))
    freq = np.bincount(picks, minlength=6) / n
    np.testing.assert_allclose(freq[:3], np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.01)  # 0.4+0.25 < 0.75
    assert (freq[3:] == 0).all()


def test_top_k1_top_p_tiny_and_cold_temperature_equal_greedy(model):
    ids, mask = prompts(np.random.default_rng(4), [5, 2, 8, 4], 8)
    greedy = run(model, ids, mask, "text", SamplingConfig.greedy_decoding(12))
    for s in (cfg_with(HOT, temperature=1.0, top_k=1), cfg_with(LLMCXR, top_p=1e-6),
              cfg_with(HOT, temperature=1e-5)):
        np.testing.assert_array_equal(run(model, ids, mask, "text", s, seed=3).tokens, greedy.tokens)
    hot = run(model, ids, mask, "text", cfg_with(HOT, temperature=50.0), seed=3)
    assert (hot.tokens != greedy.tokens).any()


# ------------------------------------------------------------------ stopping

def test_rows_stop_at_the_end_key_and_pad_afterwards():
    bias = np.zeros(LAYOUT.size)
    bias[[SPECIAL.eos_id, SPECIAL.end_key_id, SPECIAL.pad_id]] = -30.0
    m = with_logit_bias(init_model(CFG, seed=5), bias)
    ids, mask = prompts(np.random.default_rng(5), [6, 3, 8, 1], 8)
    greedy = SamplingConfig.greedy_decoding(12)
    free = run(m, ids, mask, "text", greedy)
    assert int(free.steps) == 12 and (free.lengths == 12).all() and not free.done.any()
    t = next(t for t in range(2, 12) if free.tokens[0, t] not in free.tokens[0, :t])
    end = int(free.tokens[0, t])
    special = SpecialTokens(eos_id=0, pad_id=2, end_key_id=end, instruction_key_id=3, response_key_id=4)
    out = run(m, ids, mask, "text", greedy, special=special)
    for r in range(4):
        hits = np.flatnonzero(free.tokens[r] == end)
        n = hits[0] + 1 if hits.size else 12
        assert out.lengths[r] == n and out.done[r] == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        assert (out.tokens[r, n:] == SPECIAL.pad_id).all()
    assert out.lengths[0] == t + 1
    assert int(out.steps) == (out.lengths.max() if out.done.all() else 12)


@pytest.mark.parametrize("stop", [SPECIAL.end_key_id, SPECIAL.eos_id])
def test_loop_ends_as_soon_as_every_row_is_done(stop):
    logits = np.zeros(LAYOUT.size)
    logits[stop] = 40.0
    m = fixed_distribution(init_model(CFG, seed=0), logits)
    ids, mask = prompts(np.random.default_rng(0), [3, 4, 8, 1], 8)
    out = run(m, ids, mask, "text", LLMCXR)
    assert int(out.steps) == 1 and (out.lengths == 1).all() and out.done.all()
    assert (out.tokens[:, 0] == stop).all() and (out.tokens[:, 1:] == SPECIAL.pad_id).all()


# ------------------------------------------------------------------ unconstrained retries

def test_unconstrained_images_retry_until_exactly_hw_codes():
    logits = np.full(LAYOUT.size, -30.0)
    logits[SPECIAL.end_key_id] = np.log(0.3)
    logits[T:] = np.log(0.7 / K)  # image-token count before the end key is geometric: P(2) = 0.147
    m = fixed_distribution(init_model(CFG, seed=0), logits)
    ids, mask = prompts(np.random.default_rng(0), [3, 4, 8, 1], 8)
    args = dict(layout=LAYOUT, special=SPECIAL, rng=jax.random.key(1), sampling=LLMCXR, image_tokens=2)
    res = generate_image_unconstrained(m, ids, mask, max_retries=59, **args)
    assert res.ok.all() and res.retries.max() > 0 and res.retry_rate > 0 and (res.found == 2).all()
    assert ((res.codes >= 0) & (res.codes < K)).all()
    again = generate_image_unconstrained(m, ids, mask, max_retries=59, **args)
    np.testing.assert_array_equal(again.codes, res.codes)
    np.testing.assert_array_equal(again.retries, res.retries)
    # each row's kept try is the first whose response, sampled alone with fold_in(row key, try), has
    # exactly 2 image ids; its codes are those ids in order
    keys = smp.row_keys(jax.random.key(1), 4)
    plan = smp.DecodePlan(mode="unconstrained", text_size=T, image_codes=K, vocab_size=LAYOUT.size,
                          stop_ids=(SPECIAL.end_key_id,), pad_id=SPECIAL.pad_id)  # LLM-CXR stops at "### End" only
    for r in range(4):
        counts = []
        for t in range(int(res.retries[r]) + 1):
            key = jax.random.fold_in(keys[r], t)[None]
            out = generate_with_plan(m, ids[r:r + 1], mask[r:r + 1], plan=plan, rng=key, sampling=LLMCXR)
            resp = np.asarray(out.tokens)[0, :int(out.lengths[0])]
            counts.append(int(((resp >= T) & (resp < T + K)).sum()))
        assert counts[-1] == 2 and 2 not in counts[:-1], (r, counts)
        np.testing.assert_array_equal(res.codes[r], resp[resp >= T] - T)

    logits[SPECIAL.end_key_id] = 40.0  # the end key at once: never an image
    m = fixed_distribution(m, logits)
    fail = generate_image_unconstrained(m, ids, mask, max_retries=2, **args)
    assert not fail.ok.any() and (fail.retries == 2).all() and (fail.codes == -1).all() and (fail.found == 0).all()
    args["sampling"] = SamplingConfig.greedy_decoding(12)
    greedy = generate_image_unconstrained(m, ids, mask, max_retries=2, **args)
    assert not greedy.ok.any() and (greedy.retries == 0).all()  # a greedy response is the same every try


def test_unconstrained_images_stop_only_at_the_end_key():
    """As LLM-CXR (it hands transformers "### End" as eos_token_id): <|endoftext|> does not end the
    response, so image ids after it count; stopping there too would see about one image id per try."""
    logits = np.full(LAYOUT.size, -30.0)
    logits[SPECIAL.eos_id] = np.log(0.5)
    logits[T:] = np.log(0.5 / K)
    m = fixed_distribution(init_model(CFG, seed=0), logits)
    ids, mask = prompts(np.random.default_rng(0), [3, 4, 8, 1, 5, 2, 6, 7], 8)
    res = generate_image_unconstrained(m, ids, mask, layout=LAYOUT, special=SPECIAL, rng=jax.random.key(2),
                                       sampling=cfg_with(LLMCXR, top_p=1.0, max_new_tokens=24), image_tokens=12,
                                       max_retries=0)
    # Binomial(24, 0.5) image ids per response: mean 12; stopping at eos would give a mean of 1
    assert res.found.mean() > 8 and res.found.max() <= 24


# ------------------------------------------------------------------ bad input

def test_bad_input_fails_loudly(model):
    ids, mask = prompts(np.random.default_rng(0), [3, 2], 3)
    with pytest.raises(ValueError, match="cannot hold an image response"):
        run(model, ids, mask, "image", cfg_with(LLMCXR, max_new_tokens=8), hw=6)
    with pytest.raises(ValueError, match="left padded"):
        run(model, ids[:, ::-1], mask[:, ::-1], "text", LLMCXR)
    with pytest.raises(ValueError, match="mode"):
        run(model, ids, mask, "pictures", LLMCXR)
    with pytest.raises(ValueError, match="one key per row"):
        generate(model, ids, mask, layout=LAYOUT, special=SPECIAL, mode="text",
                 rng=jax.random.split(jax.random.key(0), 3), sampling=LLMCXR)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, greedy=False, temperature=0.0, top_k=0, top_p=1.0)
    with pytest.raises(ValueError, match="top_p"):
        cfg_with(LLMCXR, top_p=0.0)
    with pytest.raises(ValueError, match="table rows"):
        generate(model, ids, mask, layout=VocabLayout.create(T, K + 100), special=SPECIAL, mode="text",
                 rng=jax.random.key(0), sampling=LLMCXR)


def test_first_argmax_and_categorical_equal_jax_argmax_and_categorical():
    """The sampler's own argmax and draw (two vectorised reductions) give jnp.argmax's and
    jax.random.categorical's ids: ties go to the first maximum, a NaN wins, a row of -inf gives 0, and
    every row's draw equals categorical with that row's key."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 3000)).astype(np.float32))
    x = x.at[1, 7].set(9.0).at[1, 11].set(9.0).at[2, 5].set(jnp.nan).at[3].set(-jnp.inf)
    x = x.at[4, :2000].set(-jnp.inf)
    np.testing.assert_array_equal(smp.first_argmax(x), jnp.argmax(x, axis=-1))
    keys = smp.row_keys(jax.random.key(3), 6)
    finite = jnp.where(jnp.isnan(x), 0.0, x).at[3].set(0.0)
    for step in range(4):
        k = smp.step_keys(keys, step)
        np.testing.assert_array_equal(smp.categorical(k, finite), jax.vmap(jax.random.categorical)(k, finite))


@pytest.mark.parametrize("mode", ["text", "image", "unconstrained"])
def test_the_rows_a_position_may_emit_give_the_whole_rows_tokens(model, mode):
    """The decoder computes the head over sampled_rows alone (image: the codes' columns, forced ids at
    the other positions): those logits are the whole head's (to float32 rounding: another matmul shape
    sums in another order), and picks from them equal next_tokens on the whole table row, greedy and sampled."""
    plan = make_plan(LAYOUT, SPECIAL, mode, image_tokens=3, open_id=5, close_id=6)
    table = model.cfg.padded_vocab_size
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 1, model.cfg.hidden_size)).astype(np.float32))
    full = model.head_logits(x)[:, 0]
    start, stop = smp.sampled_rows(plan)
    np.testing.assert_allclose(model.head_logits(x, rows=(start, stop))[:, 0], full[:, start:stop], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(full[:, start:stop]).max()))
    keys = smp.row_keys(jax.random.key(7), 3)
    for greedy, knobs in ((True, (1.0, 0, 1.0)), (False, (1.3, 0, 0.8)), (False, (0.7, 4, 1.0))):
        kw = dict(greedy=greedy, temperature=knobs[0], top_k=knobs[1], top_p=knobs[2])
        for step in range(6):
            want = smp.next_tokens(full, step, keys, plan, **kw)
            if bool(smp.is_forced(plan, step)):
                got = jnp.full((3,), smp.forced_token(plan, step))
            else:
                got = smp.tokens_from_rows(full[:, start:stop], step, keys, plan, table, **kw)
            np.testing.assert_array_equal(got, want)
    with pytest.raises(UsageError, match="outside the table"):
        model.head_logits(x, rows=(0, table + 1))
