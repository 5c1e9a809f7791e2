"""Train a byte-level BPE tokenizer on a corpus's own text (reports, VQA, Dolly rows) and save it
as a HF fast-tokenizer directory: what the demo and benchmarks use where no base LM is given.
"""
from __future__ import annotations

from collections.abc import Iterable

from llmcxr_jax import vocab
from llmcxr_jax.data import prompts
from llmcxr_jax.errors import UsageError

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 4096):
    """GPT-NeoX-style byte-level BPE (eos "<|endoftext|>", pad = eos, the Dolly keys added).

    The prompt template and instruction paraphrases are always part of the training text, and
    "<image>" must come out as the three tokens "<", "image", ">" that LLM-CXR's injection
    replaces; anything else is an error. Returns vocab.load_tokenizer(out_dir).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UsageError(f"vocab_size {vocab_size} is too small for a byte-level BPE; use at least 300")
    template = [prompts.format_prompt(i, "x", prompts.IMAGE_MARKER) for i in prompts.REPORT_INSTRUCTIONS]
    template += [prompts.format_prompt(i, prompts.IMAGE_MARKER, "x") for i in prompts.IMAGE_INSTRUCTIONS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chain(template * 20, texts), trainer)
    pieces = tok.encode(prompts.IMAGE_MARKER).tokens
    if len(pieces) != 3:
        raise UsageError(f'the trained tokenizer splits "<image>" into {pieces}, not "<", "image", ">"; '
                         "train on more text or a larger vocab_size")
    vocab.save_tokenizer(tok, {"eos_token": EOS, "bos_token": EOS, "unk_token": EOS, "pad_token": EOS,
                               "model_max_length": 2048}, out_dir)
    return vocab.load_tokenizer(out_dir)


def corpus_texts(root: str) -> list[str]:
    """A MIMIC-layout corpus's own text: stage-1 report text, VQA questions and answers, Dolly rows."""
    import os

    from llmcxr_jax.data import mimic_cxr

    corpus = mimic_cxr.load_corpus(root, progress=False)
    texts = [mimic_cxr.stage_text(r, 1) or "" for r in corpus.records]
    texts += [f"{q.question} {q.answer}" for q in mimic_cxr.read_vqa(root).items]
    dolly = os.path.join(root, "databricks-dolly-15k.jsonl")
    if os.path.isfile(dolly):
        texts += [f"{r['instruction']} {r['context']} {r['response']}" for r in mimic_cxr.read_dolly(dolly).items]
    return texts


def _chain(*parts: Iterable[str]):
    for part in parts:
        for text in part:
            if text:
                yield text
