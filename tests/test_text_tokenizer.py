"""A tokenizer trained on corpus text loads in transformers and keeps LLM-CXR's image marker."""
import pytest

from llmcxr_jax import vocab
from llmcxr_jax.data import prompts, text_tokenizer

TEXTS = ["The lungs are clear. No pleural effusion or pneumothorax.", "Mild cardiomegaly.",
         "Small right pleural effusion.", "Is there a pneumothorax? No."] * 50


def test_trained_tokenizer_round_trips_and_splits_the_marker(tmp_path):
    tok, special, _ = text_tokenizer.train_tokenizer(TEXTS, str(tmp_path), vocab_size=400)
    assert tok.encode(prompts.IMAGE_MARKER).tokens == ["<", "image", ">"]
    assert special.pad_id == special.eos_id == tok.token_to_id(text_tokenizer.EOS)
    text = prompts.format_prompt("Describe.", "Mild cardiomegaly.")
    ids = tok.encode(text).ids
    assert special.response_key_id in ids and special.end_key_id in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text)["input_ids"] == ids and len(hf) == vocab.text_size(tok)
    assert hf.pad_token == hf.eos_token == text_tokenizer.EOS


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        text_tokenizer.train_tokenizer(TEXTS, str(tmp_path), vocab_size=50)


def test_corpus_texts_gather_reports_vqa_and_dolly(tmp_path):
    from llmcxr_jax import synthetic
    from llmcxr_jax.data import mimic_cxr

    root = str(tmp_path / "corpus")
    synthetic.synthesize(root, num_images=12, image_size=32, seed=0)
    texts = text_tokenizer.corpus_texts(root)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    n_vqa = len(mimic_cxr.read_vqa(root).items)
    n_dolly = len(mimic_cxr.read_dolly(f"{root}/databricks-dolly-15k.jsonl").items)
    assert len(texts) == len(corpus.records) + n_vqa + n_dolly
    assert texts[0] == mimic_cxr.stage_text(corpus.records[0], 1)
