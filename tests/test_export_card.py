"""export-hf's generation_config.json and model card: transformers' generate on the export stops at
"### End" with no arguments and equals our greedy decoding token for token; the file's settings are
LLM-CXR's; the card states this export's T, K and ids, and its Python snippets run as written."""
import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from generator_helpers import VQ, tiny_lm
from hf_helpers import make_hf_model
from lm_helpers import make_tokenizer

from llmcxr_jax import checkpoint, cli, sharding
from llmcxr_jax.convert import diffusers_vqgan, hf_gpt_neox, hf_model_card
from llmcxr_jax.data import prompts
from llmcxr_jax.infer import generate as gen
from llmcxr_jax.infer import sampling, tasks
from llmcxr_jax.models.vqgan import init_vqgan

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
K = 64  # the codebook of generator_helpers.VQ, so the card's decode snippet can run on its export
MESH = "1,-1,1"
ALPHA = 12.0  # the logit a written transition gets; random rows stay within about +-0.5
A, B, C, IMAGE_CODE = 100, 150, 200, 5  # text ids (not special) and the image code in the chain


def _write_chain(model, chain, text_size):
    """Turn a random model into one whose greedy choice follows `chain` (a dict: token -> next token).

    Each token of the chain gets an embedding of norm 10 along its own direction (orthonormal and
    mean-free, so the final LayerNorm maps it to sqrt(hidden) times that direction); the output-head
    column of the next token gets ALPHA / sqrt(hidden) times that direction. The layers stay random
    and only nudge the residual stream, so the whole forward pass still runs and the written
    transition wins by a margin of about ALPHA in both runtimes."""
    emb = np.array(model.embed_in["embedding"].get_value())  # [rows, hidden]
    head = np.array(model.embed_out["kernel"].get_value())  # [hidden, rows]
    hidden = emb.shape[1]
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(hidden, len(chain)))
    basis -= basis.mean(0)  # mean-free: LayerNorm keeps the direction
    directions, _ = np.linalg.qr(basis)  # [hidden, n] orthonormal columns, still mean-free
    for j, (token, nxt) in enumerate(chain.items()):
        u = directions[:, j]
        emb[token] = 10.0 * u
        head[:, nxt] += ALPHA / np.sqrt(hidden) * u
    model.embed_in["embedding"].set_value(jnp.asarray(emb))
    model.embed_out["kernel"].set_value(jnp.asarray(head))
    assert all(t < text_size + K for t in chain.values())


@pytest.fixture(scope="module")
def chain_export(tmp_path_factory):
    """A tiny LM whose greedy response to any prompt ending in "### Response:\\n" is A, an image
    token, B, "### End" (and C after that), saved as a checkpoint and exported by `llmcxr export-hf`."""
    root = tmp_path_factory.mktemp("chain")
    tok_dir = str(root / "tok")
    make_tokenizer(tok_dir)  # "<image>" is "<", "image", ">" as in GPT-NeoX's tokenizer
    mesh = sharding.make_mesh(MESH)
    lm = checkpoint.load_lm(tiny_lm(str(root / "random"), tok_dir, K), mesh, dtype="float32")
    s, t = lm.special, lm.layout.text_size
    image = lm.layout.image_token(IMAGE_CODE)
    chain = {s.response_key_id: A, A: image, image: B, B: s.end_key_id, s.end_key_id: C}
    _write_chain(lm.model, chain, t)
    ckpt, out = str(root / "ckpt"), str(root / "export")
    checkpoint.save_params(ckpt, lm.model, lm.metadata, tokenizer=lm.tokenizer, tokenizer_config=lm.tokenizer_config)
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", out]) == 0
    lm = checkpoint.load_lm(ckpt, mesh, dtype="float32")
    return lm, out, [A, image, B, s.end_key_id]


def _prompt(lm, codes):
    encoder = prompts.PromptTokenizer(lm.tokenizer, lm.layout, lm.special)
    text = prompts.generation_prompt(hf_model_card.REPORT_INSTRUCTION, prompts.IMAGE_MARKER)
    return encoder.encode(text, np.asarray(codes)).astype(np.int64)


def _ours(lm, ids, max_new_tokens=hf_model_card.REPORT_SAMPLING["max_new_tokens"]):
    """Our greedy decoding over every real id (as transformers' generate), stopping at eos or "### End"."""
    out = gen.generate(lm.model, ids, np.ones_like(ids, bool), layout=lm.layout, special=lm.special,
                       mode="unconstrained", rng=jax.random.key(0),
                       sampling=sampling.SamplingConfig.greedy_decoding(max_new_tokens))
    return np.asarray(out.tokens), np.asarray(out.lengths)


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_generate_reads_stop_and_pad_ids_from_the_file_and_equals_our_greedy(chain_export, tmp_path):
    lm, out, expected = chain_export
    s = lm.special
    prompt = _prompt(lm, np.arange(16) % K)
    # row 1 ends in "### Response:\n"; row 0 is one token further along the chain (same length, no padding),
    # so it stops a step earlier and transformers fills its last place with the file's pad id
    ids = np.stack([np.concatenate([prompt[1:], [A]]), prompt])
    tokens, lengths = _ours(lm, ids)
    assert tokens[1, :lengths[1]].tolist() == expected  # the chain is what our sampler writes
    assert tokens[0, :lengths[0]].tolist() == expected[1:] and lengths.tolist() == [3, 4]
    hf = _load(out)
    assert hf.generation_config.eos_token_id == [s.eos_id, s.end_key_id]
    assert hf.generation_config.pad_token_id == s.pad_id
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ids), do_sample=False).numpy()[:, ids.shape[1]:]
    assert theirs.shape[1] == 4  # stopped at "### End", far before max_new_tokens 128
    assert theirs[1].tolist() == expected and theirs[0].tolist() == expected[1:] + [s.pad_id]
    np.testing.assert_array_equal(theirs, tokens[:, :4])
    assert (tokens[:, 4:] == s.pad_id).all()
    # the same weights without generation_config.json: transformers knows only config.json's eos and
    # runs past "### End" (the chain goes on to C): the stop at "### End" came from the file
    bare = str(tmp_path / "no_generation_config")
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns(hf_model_card.GENERATION_CONFIG))
    with torch.no_grad(), pytest.warns(UserWarning, match="default `max_length`"):  # not the file's 128
        longer = _load(bare).generate(torch.tensor(ids[1:]), do_sample=False).numpy()[0, ids.shape[1]:]
    assert longer[:5].tolist() == expected + [C]


def test_generation_config_holds_llmcxr_report_settings(chain_export):
    from transformers import GenerationConfig

    lm, out, _ = chain_export
    s = lm.special
    with open(os.path.join(out, "generation_config.json")) as f:
        written = json.load(f)
    assert written == {"eos_token_id": [s.eos_id, s.end_key_id], "pad_token_id": s.eos_id, "do_sample": True,
                       "top_p": 0.92, "top_k": 0, "temperature": 1.0, "max_new_tokens": 128}
    assert s.pad_id == s.eos_id  # LLM-CXR pads with eos; the file takes the checkpoint's pad id
    # the numbers our own sampler uses for reports (infer/ sits above convert/, so they live twice)
    ours = tasks.default_sampling("report", greedy=False, max_new_tokens=None, codes_per_image=16)
    assert (written["temperature"], written["top_p"], written["top_k"], written["max_new_tokens"]) == \
        (ours.temperature, ours.top_p, ours.top_k, ours.max_new_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = GenerationConfig.from_pretrained(out)
        loaded.validate(strict=True)  # raises on any issue transformers would only log
    assert loaded.eos_token_id == [s.eos_id, s.end_key_id] and loaded.top_k == 0 and loaded.do_sample


def _card(directory):
    with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_card_states_this_exports_layout_ids_template_and_terms(chain_export):
    lm, out, _ = chain_export
    s, t = lm.special, lm.layout.text_size
    card = _card(out)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and {"gpt_neox", "chest-x-ray", "llm-cxr"} <= set(front["tags"])
    assert front["library_name"] == "transformers"
    assert f"T = {t}" in card and f"K = {K}" in card and f"T + K = {t + K}" in card
    assert f"| {t} .. {t + K - 1} | image tokens" in card
    assert f"table of {lm.layout.padded_size} rows" in card and f"the {lm.layout.padded_size - t - K} padding" in card
    assert f"| `### End` | {s.end_key_id} |" in card and f"| eos | {s.eos_id} |" in card
    assert f"{_load(out).num_parameters():,} parameters" in card
    assert "| `### Response:\\n` |" in card
    assert prompts.format_prompt("{instruction}", "{response}", "{input}") in card
    open_id, _, close_id = lm.tokenizer.encode("<image>").ids
    assert f"`<`, `image`, `>` (ids {open_id}, " in card and f", {close_id} in this tokenizer)" in card
    assert "force_not_quantize=True" in card and "llmcxr export-vqgan --format diffusers" in card
    assert "MIMIC-CXR" in card and "data use agreement" in card
    assert "top_p` 0.92" in card and "max_new_tokens` 128" in card


def test_card_template_and_settings_agree_with_the_prompt_and_sampler_modules():
    assert hf_model_card.INTRO_BLURB == prompts.INTRO_BLURB
    assert hf_model_card.IMAGE_MARKER == prompts.IMAGE_MARKER
    assert hf_model_card.template() == prompts.format_prompt("{instruction}", "{response}", "{input}")
    assert hf_model_card.REPORT_INSTRUCTION in prompts.REPORT_INSTRUCTIONS
    assert hf_model_card.REPORT_SAMPLING == {
        "do_sample": True, "temperature": sampling.LLMCXR_TEMPERATURE, "top_p": sampling.LLMCXR_TOP_P,
        "top_k": sampling.LLMCXR_TOP_K, "max_new_tokens": tasks.REPORT_TOKENS}


def _snippets(card):
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def _fill(code, old, new):
    assert code.count(old) == 1, old
    return code.replace(old, new)


def test_card_report_snippet_builds_our_prompt_ids_and_generates_our_tokens(chain_export, monkeypatch):
    lm, out, expected = chain_export
    report, _ = _snippets(_card(out))
    codes = [int(c) for c in (np.arange(16) * 7) % K]
    report = _fill(report, "codes = [...]", f"codes = {codes}")
    greedy = "model.generate(torch.tensor([ids]), do_sample=False)"  # the one change: greedy, to compare
    report = _fill(report, "model.generate(torch.tensor([ids]))", greedy)
    monkeypatch.chdir(out)  # the snippet reads export_dir = "."
    ns = {}
    exec(compile(report, "card-report-snippet", "exec"), ns)
    ours = _prompt(lm, codes)
    assert ns["ids"] == ours.tolist()
    assert ns["out"][0, len(ns["ids"]):].tolist() == expected
    tokens, lengths = _ours(lm, ours[None])
    assert tokens[0, :lengths[0]].tolist() == expected
    assert ns["report"] == lm.tokenizer.decode([A, B], skip_special_tokens=True).strip()


def test_card_decode_snippet_equals_our_vqgan_decode(chain_export, tmp_path):
    lm, out, _ = chain_export
    _, decode = _snippets(_card(out))
    vq = init_vqgan(VQ, 0)
    book = vq.quantize.embedding
    book.set_value(book.get_value() * 200.0)  # spread the codes so the decoded images differ per code
    vq_dir = str(tmp_path / "vqgan")
    diffusers_vqgan.export_diffusers(vq, vq_dir)
    codes = np.random.default_rng(4).integers(0, K, VQ.codes_per_image)
    open_id, _, close_id = lm.tokenizer.encode("<image>").ids
    response = [open_id] + lm.layout.image_token(codes).tolist() + [close_id, lm.special.end_key_id]
    ns = {"response": response}
    exec(compile(_fill(decode, '"VQGAN_DIR"', repr(vq_dir)), "card-decode-snippet", "exec"), ns)
    ours = np.asarray(vq.decode(jnp.asarray(codes[None], jnp.int32)))  # [1, H, W, C]
    theirs = ns["pixels"].permute(0, 2, 3, 1).numpy()
    assert ours.std() > 0.01  # a picture, not a constant
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert ns["image"].shape == (VQ.resolution, VQ.resolution, 3) and ns["image"].dtype == np.uint8
    ns = {"response": response[:-3]}  # one image token short: the snippet refuses, as LLM-CXR samples again
    with pytest.raises(ValueError, match="15 image tokens, not 16"):
        exec(compile(_fill(decode, '"VQGAN_DIR"', repr(vq_dir)), "card-decode-snippet", "exec"), ns)


def test_bare_lm_export_writes_what_it_knows_and_says_ids_are_needed(tmp_path):
    """No tokenizer, no special ids, no image rows: the sampling settings only, plus config.json's eos
    when the source config has one; the card asks for the stop ids and shows no image sections."""
    from transformers import GenerationConfig

    src = str(tmp_path / "hf")
    make_hf_model(src, 97)  # its config.json says eos_token_id 0
    imp = hf_gpt_neox.import_hf(src, 0, mesh=sharding.make_mesh(MESH), dtype="float32")
    plain, based = str(tmp_path / "plain"), str(tmp_path / "based")
    hf_gpt_neox.export_hf(imp.model, plain)
    hf_gpt_neox.export_hf(imp.model, based, hf_config=imp.hf_config)
    for directory, eos in ((plain, None), (based, 0)):
        with open(os.path.join(directory, "generation_config.json")) as f:
            written = json.load(f)
        expected = dict(hf_model_card.REPORT_SAMPLING)
        if eos is not None:
            expected["eos_token_id"] = eos
        assert written == expected
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            GenerationConfig.from_pretrained(directory).validate(strict=True)
        card = _card(directory)
        assert "no special-token ids" in card and "eos_token_id=[EOS_ID, END_ID]" in card
        assert "K = 0" in card and "T = 97" in card and "## Decoding image tokens" not in card
        assert "```python" not in card  # no snippet that would need ids this export lacks
