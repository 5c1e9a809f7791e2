"""VocabLayout arithmetic and the tokenizer directory handling."""
import json

import numpy as np
import pytest

from llmcxr_jax import vocab
from llmcxr_jax.vocab import VocabLayout


def test_llmcxr_layout_numbers():
    layout = VocabLayout.create(50281, 1024)
    assert layout.size == 51305
    assert layout.padded_size == 51328  # next multiple of 128
    assert layout.image_token(0) == 50281 and layout.image_token(1023) == 51304
    assert layout.image_code(51304) == 1023
    assert layout.image_token_range == (50281, 51305)


def test_padding_respects_tensor_axis():
    assert VocabLayout.create(50281, 1024, tensor_parallelism=3).padded_size % 384 == 0
    assert VocabLayout.create(100, 28).padded_size == 128  # exact multiple: no extra rows
    layout = VocabLayout.create(300, 37, tensor_parallelism=1)
    with pytest.raises(ValueError, match="does not split over tensor axis 5"):
        layout.check_tensor_parallelism(5)


def test_code_and_id_round_trip_and_membership():
    layout = VocabLayout.create(303, 37)
    codes = np.arange(37)
    ids = layout.image_token(codes)
    assert np.all(layout.image_code(ids) == codes)
    assert np.all(layout.is_image_token(ids))
    assert not np.any(layout.is_image_token(np.array([0, 302, 340, 383])))
    mask = layout.valid_row_mask()
    assert mask.shape == (384,) and mask.sum() == 340 and not mask[340:].any()


@pytest.mark.parametrize("bad", [-1, 37, 1000])
def test_codes_outside_codebook_are_rejected(bad):
    with pytest.raises(ValueError, match=f"image code {bad} is outside the codebook"):
        VocabLayout.create(303, 37).image_token(np.array([0, bad]))


def test_text_id_is_not_an_image_code():
    with pytest.raises(ValueError, match="token id 5 is not an image token"):
        VocabLayout.create(303, 37).image_code([303, 5])


def test_layout_serialises():
    layout = VocabLayout.create(50281, 1024, 8)
    assert VocabLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_tokenizer_gets_dolly_keys_and_pad_eos(tmp_path):
    from hf_helpers import make_tokenizer_dir

    make_tokenizer_dir(str(tmp_path / "tok"))
    tok, special, cfg = vocab.load_tokenizer(str(tmp_path / "tok"))
    base = tok.get_vocab_size(with_added_tokens=False)
    assert vocab.text_size(tok) == 300 + 3 and base <= 300
    assert special.pad_id == special.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.decode([special.response_key_id], skip_special_tokens=False) == "### Response:\n"
    # the exact prompt key is one token, as LLM-CXR's response-only loss needs
    enc = tok.encode("Below is a task.\n\n### Response:\nok").ids
    assert special.response_key_id in enc
    # saving and reloading changes nothing; the keys are not added twice
    vocab.save_tokenizer(tok, cfg, str(tmp_path / "saved"))
    tok2, special2, _ = vocab.load_tokenizer(str(tmp_path / "saved"))
    assert vocab.text_size(tok2) == vocab.text_size(tok) and special2 == special


@pytest.mark.torch
def test_saved_tokenizer_loads_in_transformers_with_same_ids(tmp_path):
    from hf_helpers import make_tokenizer_dir
    from transformers import AutoTokenizer

    make_tokenizer_dir(str(tmp_path / "tok"))
    tok, special, cfg = vocab.load_tokenizer(str(tmp_path / "tok"))
    vocab.save_tokenizer(tok, cfg, str(tmp_path / "saved"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert len(hf) == vocab.text_size(tok)
    assert hf.pad_token_id == special.pad_id and hf.eos_token_id == special.eos_id
    for key, tid in ((vocab.END_KEY, special.end_key_id), (vocab.RESPONSE_KEY, special.response_key_id),
                     (vocab.INSTRUCTION_KEY, special.instruction_key_id)):
        assert hf.convert_tokens_to_ids(key) == tid
    text = "### Instruction:\nWrite a report.\n\n### Response:\nNo acute process.\n\n### End"
    assert hf(text)["input_ids"] == tok.encode(text).ids


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        vocab.load_tokenizer(str(tmp_path))
