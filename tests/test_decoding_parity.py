"""Decoding as LLM-CXR did it: report text cleaned of spaces before punctuation exactly as transformers'
clean_up_tokenization (on by default in the original's transformers 4.28), report->CXR by sampling
freely and retrying until h*w image ids come out (with its 300 new tokens for 256 codes), and a
bfloat16 LM whose logits stay within bfloat16 rounding of float32's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_helpers import fixed_lm
from flax import nnx
from generator_helpers import VQ, tiny_lm
from lm_run_helpers import make_setup

from llmcxr_jax import checkpoint
from llmcxr_jax.infer import detokenize, tasks
from llmcxr_jax.infer.generate import GenerateOutput, generate_with_plan
from llmcxr_jax.infer.sampling import DecodePlan, row_keys
from llmcxr_jax.models.gpt_neox import KVCache
from llmcxr_jax.models.vqgan import init_vqgan

BF16_EPS = 2.0 ** -7  # spacing of bfloat16 numbers in [1, 2): 8 significant bits


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    setup = make_setup(str(d / "setup"), num_images=12)
    checkpoint.save_vqgan(str(d / "vqgan"), init_vqgan(VQ, 0))
    from llmcxr_jax.data import mimic_cxr
    image = mimic_cxr.load_corpus(setup["root"], progress=False).records[0].image_path
    return {"lm": tiny_lm(str(d / "lm"), setup["tokenizer"], 64), "vqgan": str(d / "vqgan"), "image": image,
            "fixed": fixed_lm(str(d / "fixed"), setup["tokenizer"])}


def hf_tokenizer(ckpt: str):
    """The checkpoint's tokenizer in transformers, decoding as 4.28 did. transformers 5 skips the
    clean-up for BPE tokenizers unless told to apply it anyway; 4.28 applied it to every tokenizer."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(
        f"{ckpt}/tokenizer", clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)


# ------------------------------------------------------------------ clean-up of spaces

PIECES = ["No", "effusion", "heart", "isn", "they", "I", "we", " ", "  ", "\n", ".", ",", "!", "?", "'", "n't",
          "'m", "'s", "'ve", "'re", " .", " ,", " !", " ?", " ' ", " n't", " 'm", " 's", " 've", " 're", "..."]


def test_clean_up_rule_equals_transformers():
    """Random strings rich in every pattern the rule rewrites (" ." " ?" " !" " ," " ' " " n't" " 'm"
    " 's" " 've" " 're", chained and overlapping) get the same text as transformers' own method."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerBase.clean_up_tokenization
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(PIECES, size=rng.integers(1, 30))) for _ in range(3000)]
    texts += ["No effusion . Heart isn 't enlarged , it 's fine !", "I 'm sure they 're right ; we 've seen it ?",
              " ' quoted ' ", "a . . b", "  .", "", "plain text"]
    changed = 0
    for text in texts:
        expected = theirs(None, text)  # an instance method that reads nothing from its instance
        assert detokenize.clean_up_tokenization(text) == expected, repr(text)
        changed += expected != text
    for before, _ in detokenize.CLEAN_UP_RULES:  # every rule had something to do
        assert sum(before in t for t in texts) > 100, before
    assert changed > 2700


REPORTS = ["No effusion . Heart isn 't enlarged , it 's fine !",
           "Mild edema ? I 'm told they 're stable , we 've seen it .", " Left base opacity . ",
           "Cardiomegaly , unchanged ! ' Follow up ' advised ."]


def _output(rows: list[list[int]], pad: int) -> GenerateOutput:
    width = max(len(r) for r in rows)
    tokens = np.array([r + [pad] * (width - len(r)) for r in rows], np.int32)
    lengths = np.array([len(r) for r in rows], np.int32)
    return GenerateOutput(tokens=tokens, lengths=lengths, done=np.ones(len(rows), bool), steps=np.int32(width))


def test_decoded_reports_equal_transformers_decode(env):
    """Response ids (special tokens inside, the end key after) -> our text == transformers'
    decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip(), and without
    the clean-up == its decode with clean_up_tokenization_spaces=False."""
    hf = hf_tokenizer(env["lm"])
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    sp = g.lm.special
    rows = []
    for i, text in enumerate(REPORTS):
        ids = g.lm.tokenizer.encode(text).ids
        ids.insert(len(ids) // 2, sp.instruction_key_id if i % 2 else sp.response_key_id)  # skipped by both
        rows.append(ids + [sp.end_key_id])
    out = _output(rows, sp.pad_id)
    responses = g.responses(out)
    assert [r[-1] for r in rows] == [sp.end_key_id] * len(rows) and all(len(r) == len(s) - 1
                                                                       for r, s in zip(responses, rows))
    cleaned = [hf.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip() for r in responses]
    raw = [hf.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip() for r in responses]
    assert g.texts(out) == cleaned
    assert all(c != r for c, r in zip(cleaned, raw))  # the clean-up had work in every report
    g.clean_up_spaces = False
    assert g.texts(out) == raw


def test_generated_report_equals_transformers_decode_of_its_ids(env):
    """A sampled report (the fixed LM writes spaces and full stops) against transformers' decode of
    the very ids the sampler emitted."""
    hf = hf_tokenizer(env["fixed"])
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    made = g.report_results([env["image"]] * 3, tasks.default_sampling("report", False, 40, g.codes_per_image), 5)
    reports, emitted = made.texts, [g.response_of(ids) for ids in made.generated_ids]
    assert len(emitted) == 3 and all(len(r) == 40 for r in emitted)
    assert reports == [hf.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()
                       for r in emitted]
    raw = [hf.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip() for r in emitted]
    assert all(" ." in r and len(t) < len(r) for r, t in zip(raw, reports))  # spaces before stops were removed


def test_image_ids_in_a_text_response_decode_as_transformers_drops_them(env):
    """allow_image_tokens_in_text: the fixed LM samples image ids (ids beyond the tokenizer) into a
    report; transformers' decode (with or without skip_special_tokens, the original's default being
    without) leaves them out, and so does ours: the same text as the report's text ids alone."""
    hf = hf_tokenizer(env["fixed"])
    g = tasks.Generator.load(env["fixed"], env["vqgan"], allow_image_tokens_in_text=True)
    made = g.report_results([env["image"]] * 3, tasks.default_sampling("report", False, 40, g.codes_per_image), 5)
    t = g.lm.layout.text_size
    assert all(sum(i >= t for i in ids) > 3 for ids in made.generated_ids)  # Binomial(40, 16/60) of them
    for text, ids in zip(made.texts, made.generated_ids):
        response = g.response_of(ids)
        for skip in (True, False):
            assert text == hf.decode(response, skip_special_tokens=skip, clean_up_tokenization_spaces=True).strip()
        assert text == hf.decode([i for i in response if i < t], clean_up_tokenization_spaces=True).strip()


# ------------------------------------------------------------------ report->CXR retries

def test_retry_decoding_is_the_original_loop(env):
    """Each input's image comes from its first try whose response (sampled over every id, stopped only
    by "### End", h*w + 44 new tokens) holds exactly h*w image ids; try t of input i samples with
    fold_in(fold_in(seed key, i), t). The codes are those ids in order, the image their decoding."""
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    n = g.codes_per_image
    sampling = tasks.default_sampling("image", False, None, n, top_p=1.0, image_decoding="retry")
    assert sampling.max_new_tokens == n + 44
    assert tasks.default_sampling("image", False, None, 256, image_decoding="retry").max_new_tokens == 300
    assert tasks.default_sampling("image", False, None, 256).max_new_tokens == 259  # constrained: the span
    reports = ["Small left effusion.", "No acute process.", "Mild cardiomegaly."]
    drawn = g.image(reports, sampling, seed=4, decoding="retry", max_retries=80)
    assert drawn.ok.all() and drawn.retries.sum() > 0 and (drawn.found == n).all()
    np.testing.assert_array_equal(drawn.images, g.decode_codes(drawn.codes))
    layout, special = g.lm.layout, g.lm.special
    plan = DecodePlan(mode="unconstrained", text_size=layout.text_size, image_codes=layout.image_codes,
                      vocab_size=layout.size, stop_ids=(special.end_key_id,), pad_id=special.pad_id)
    keys = row_keys(jax.random.key(4), len(reports))
    for i, prompt in enumerate(g.image_prompts(reports)):
        for t in range(int(drawn.retries[i]) + 1):
            out = generate_with_plan(g.lm.model, prompt[None], np.ones((1, len(prompt)), bool), plan=plan,
                                     rng=jax.random.fold_in(keys[i], t)[None], sampling=sampling)
            response = np.asarray(out.tokens)[0, :int(out.lengths[0])]
            vq = response[response >= layout.text_size] - layout.text_size  # what the original keeps
            assert (len(vq) == n) == (t == drawn.retries[i]), (i, t, len(vq))
        np.testing.assert_array_equal(drawn.codes[i], vq)
    again = g.image(reports, sampling, seed=4, decoding="retry", max_retries=80)
    np.testing.assert_array_equal(again.retries, drawn.retries)
    constrained = g.image(reports, tasks.default_sampling("image", False, None, n), seed=4)
    assert constrained.ok.all() and (constrained.retries == 0).all() and (constrained.found == n).all()


def test_retry_gives_up_after_max_retries(env):
    """16 new tokens hold 16 image ids only if every one is an image id (0.27 ** 16): each try fails,
    and the input fails after 1 + max_retries tries with a NaN image and a reason."""
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    sampling = tasks.default_sampling("image", False, 16, g.codes_per_image, top_p=1.0, image_decoding="retry")
    drawn = g.image(["Effusion.", "Edema."], sampling, seed=0, decoding="retry", max_retries=3)
    assert not drawn.ok.any() and (drawn.retries == 3).all() and np.isnan(drawn.images).all()
    assert (drawn.codes == -1).all() and (drawn.found < 16).all()
    assert drawn.failure(0) == f"no response held exactly 16 image tokens in 4 tries (the last held {drawn.found[0]})"
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        g.image(["Effusion."], sampling, decoding="retry", max_retries=-1)
    with pytest.raises(ValueError, match="image decoding 'free' is not one of constrained, retry"):
        g.image(["Effusion."], sampling, decoding="free")


# ------------------------------------------------------------------ bfloat16

@nnx.jit
def _prefill(model, ids, cache):
    return model.decode(ids, cache, jnp.ones(ids.shape, bool))


@nnx.jit
def _step(model, token, cache):
    return model.decode(token, cache)


def teacher_forced_logits(model, prompt: np.ndarray, continuation: list[int]) -> np.ndarray:
    """[len(continuation) + 1, vocab] float32: the KV-cache decoder's logits after the prompt and
    after each continuation token, as generation computes them."""
    cache = KVCache.create(model.cfg, 1, len(prompt) + len(continuation) + 1)
    logits, cache = _prefill(model, jnp.asarray(prompt[None], jnp.int32), cache)
    rows = [logits[0, -1]]
    for t in continuation:
        logits, cache = _step(model, jnp.asarray([[t]], jnp.int32), cache)
        rows.append(logits[0, -1])
    return np.asarray(jnp.stack(rows), np.float32)


def test_bfloat16_generation_stays_within_bfloat16_rounding_of_float32(env):
    """--dtype bfloat16 computes the LM in bfloat16 over float32 weights kept as saved.

    Tolerance: each activation rounded to bfloat16 carries a relative error of at most eps/2 = 2^-8;
    a token's logit passes through about 20 such roundings in this 2-layer model (embedding, norms,
    attention, MLP, residual sums), which add up like a random walk to ~sqrt(20) * 2^-8 ~ 1.7% of the
    logit scale in the worst direction; we allow 2 eps = 1.6% of the largest |logit|. It is tight
    enough to see a 2% change of the output head, and bfloat16 must differ from float32 by more than
    float32 rounding could (the dtype reached the matmuls)."""
    g32 = tasks.Generator.load(env["lm"], env["vqgan"])
    g16 = tasks.Generator.load(env["lm"], env["vqgan"], dtype="bfloat16")
    assert g16.lm.model.cfg.dtype == "bfloat16" and g32.lm.model.cfg.dtype == "float32"
    assert {p.dtype for p in jax.tree.leaves(nnx.state(g16.lm.model, nnx.Param))} == {jnp.dtype("float32")}
    prompt = g32.report_prompts([env["image"]])[0]
    greedy32 = g32.greedy_responses([prompt], 12)[0]
    greedy16 = g16.greedy_responses([prompt], 12)[0]
    assert len(greedy16) > 0 and max(greedy16) < g16.lm.layout.text_size
    real = g32.lm.layout.size
    ref = teacher_forced_logits(g32.lm.model, prompt, greedy32)[:, :real]
    got = teacher_forced_logits(g16.lm.model, prompt, greedy32)[:, :real]
    scale = np.abs(ref).max()
    tol = 2 * BF16_EPS * scale
    diff = np.abs(got - ref).max()
    assert 1e-4 * scale < diff <= tol, (diff, tol)
    # greedy picks agree wherever float32's top two logits are further apart than twice the tolerance
    for t, (a, b) in enumerate(zip(greedy32, greedy16)):
        top2 = np.sort(ref[t])[-2:]
        if top2[1] - top2[0] > 2 * tol:
            assert a == b, t
        if a != b:
            break
    head = g32.lm.model.embed_out["kernel"]
    head.set_value(head.get_value() * 1.02)
    nudged = teacher_forced_logits(g32.lm.model, prompt, greedy32)[:, :real]
    assert np.abs(nudged - ref).max() > tol
