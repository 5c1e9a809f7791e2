"""Prompt strings against the Dolly template, image injection and loss masks (instruction files:
test_instructions.py)."""
import numpy as np
import pytest
from lm_helpers import CODES, K, make_tokenizer

from llmcxr_jax import vocab
from llmcxr_jax.data import prompts
from llmcxr_jax.vocab import VocabLayout

BLURB = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


@pytest.fixture(scope="module")
def tok_special(tmp_path_factory):
    tok, special, _ = make_tokenizer(str(tmp_path_factory.mktemp("tok")))
    return tok, special


def _encoder(tok, special, delimiters="text"):
    return prompts.PromptTokenizer(tok, VocabLayout.create(vocab.text_size(tok), K), special, delimiters)


def test_prompt_strings_match_the_dolly_template():
    # Written out literally from REFERENCE.md's template.
    with_input = (BLURB + "\n\n### Instruction:\nDescribe the film.\n\nInput:\nA film from 1999.\n\n"
                  "### Response:\nIt is about a heist.\n\n### End")
    no_input = BLURB + "\n\n### Instruction:\nName a bird.\n\n### Response:\nA robin.\n\n### End"
    assert prompts.format_prompt("Describe the film.", "It is about a heist.", "A film from 1999.") == with_input
    assert prompts.format_prompt("Name a bird.", "A robin.") == no_input
    assert prompts.format_prompt("Name a bird.", "A robin.", "") == no_input  # empty Dolly context
    gen = prompts.generation_prompt("Describe the film.", "A film from 1999.")
    assert gen == BLURB + "\n\n### Instruction:\nDescribe the film.\n\nInput:\nA film from 1999.\n\n### Response:\n"
    assert with_input.startswith(gen) and gen.endswith("### Response:\n")
    assert prompts.generation_prompt("Name a bird.") == no_input[:no_input.index("A robin.")]


def test_ten_distinct_paraphrases_per_image_task():
    for items in (prompts.REPORT_INSTRUCTIONS, prompts.IMAGE_INSTRUCTIONS):
        assert len(items) == 10 and len(set(items)) == 10 and all(s.strip() == s and s for s in items)
    assert not set(prompts.REPORT_INSTRUCTIONS) & set(prompts.IMAGE_INSTRUCTIONS)


@pytest.mark.parametrize("image_in_response", [False, True])
def test_image_tokens_sit_between_angle_brackets(tok_special, image_in_response):
    tok, special = tok_special
    enc = _encoder(tok, special)
    codes = np.random.default_rng(0).integers(0, K, CODES)
    text = (prompts.format_prompt("Make it.", prompts.IMAGE_MARKER, "Clear lungs.") if image_in_response
            else prompts.format_prompt("Report it.", "Clear lungs.", prompts.IMAGE_MARKER))
    plain = np.array(tok.encode(text).ids)
    ids = enc.encode(text, codes)
    lt, img, gt = tok.encode("<image>").ids
    start = int(np.flatnonzero(plain == img)[0])
    assert len(ids) == len(plain) - 1 + CODES
    assert ids[start - 1] == lt and ids[start + CODES] == gt
    np.testing.assert_array_equal(ids[start:start + CODES], vocab.text_size(tok) + codes)
    np.testing.assert_array_equal(ids[:start], plain[:start])
    np.testing.assert_array_equal(ids[start + CODES:], plain[start + 1:])
    ex = enc.example(ids)
    np.testing.assert_array_equal(ex.modality, (ex.targets >= vocab.text_size(tok)).astype(np.int8))
    # per target: "<" predicts the first code, the second-to-last code predicts the last one
    assert np.flatnonzero(ex.modality).tolist() == list(range(start - 1, start + CODES - 1))


def test_response_only_and_joint_loss_masks(tok_special):
    tok, special = tok_special
    enc = _encoder(tok, special)
    text = prompts.format_prompt("Report it.", "Clear lungs.", prompts.IMAGE_MARKER)
    ids = enc.encode(text, np.arange(CODES) % K)
    ex = enc.example(ids, "response")
    r = int(np.flatnonzero(ids == special.response_key_id)[0])
    np.testing.assert_array_equal(ex.targets[:-1], ids[1:])
    assert ex.targets[-1] == special.pad_id and ids[-1] == special.end_key_id  # no EOS appended
    # the first trained target is the first response token; "### End" is the last one
    assert np.flatnonzero(ex.loss_mask).tolist() == list(range(r, len(ids) - 1))
    assert ex.targets[r] == tok.encode("Clear").ids[0] and ex.targets[len(ids) - 2] == special.end_key_id
    joint = enc.example(ids, "joint")
    assert joint.loss_mask[:-1].all() and joint.loss_mask[-1] == 0
    with pytest.raises(ValueError, match="loss must be"):
        enc.example(ids, "all")
    with pytest.raises(ValueError, match="has no '### Response:\\\\n' token"):
        enc.example(np.array(tok.encode("no key here").ids), "response")


def test_marker_absent_or_twice_is_a_clear_error(tok_special):
    tok, special = tok_special
    enc = _encoder(tok, special)
    with pytest.raises(ValueError, match="'<image>' is not in the tokenized prompt"):
        enc.encode(prompts.format_prompt("Report it.", "Clear."), np.zeros(CODES, int))
    twice = prompts.format_prompt("Compare <image>.", "Clear.", prompts.IMAGE_MARKER)
    with pytest.raises(ValueError, match="occurs 2 times"):
        enc.encode(twice, np.zeros(CODES, int))
    with pytest.raises(ValueError, match="outside the codebook"):
        enc.encode(prompts.format_prompt("Report it.", "Clear.", "<image>"), np.full(CODES, K))


def test_special_delimiters(tok_special, tmp_path):
    _, special = tok_special
    tok, _, _ = make_tokenizer(str(tmp_path / "tok"))  # a fresh copy: we add tokens to it
    with pytest.raises(ValueError, match="no '<\\|image\\|>'/'<\\|/image\\|>' tokens"):
        _encoder(tok, special, "special")
    assert prompts.add_image_delimiters(tok) == 2 and prompts.add_image_delimiters(tok) == 0
    enc = _encoder(tok, special, "special")
    begin, end = tok.token_to_id(prompts.IMAGE_BEGIN), tok.token_to_id(prompts.IMAGE_END)
    codes = np.arange(CODES) % K
    ids = enc.encode(prompts.format_prompt("Report it.", "Clear.", prompts.IMAGE_MARKER), codes)
    b = int(np.flatnonzero(ids == begin)[0])
    assert ids[b + 1 + CODES] == end
    np.testing.assert_array_equal(ids[b + 1:b + 1 + CODES], vocab.text_size(tok) + codes)
    assert tok.token_to_id("image") not in ids.tolist()


def test_tokenizer_that_keeps_image_whole_is_rejected(tmp_path):
    tok, special, _ = make_tokenizer(str(tmp_path / "tok"))
    tok.add_tokens(["<image>"])
    with pytest.raises(ValueError, match="splits '<image>' into 1 tokens"):
        _encoder(tok, special)
    with pytest.raises(ValueError, match="build the layout from this tokenizer"):
        prompts.PromptTokenizer(tok, VocabLayout.create(vocab.text_size(tok) - 1, K), special)
