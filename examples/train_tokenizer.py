"""Train a byte-level BPE tokenizer on a MIMIC-layout corpus's own text (reports, VQA, Dolly rows)
and save it as a HF tokenizer directory, for LM runs that start from scratch.

    python examples/train_tokenizer.py --data CORPUS --out TOKENIZER_DIR [--vocab-size 4096]
"""
import argparse
import json
import os

from llmcxr_jax import vocab
from llmcxr_jax.data import mimic_cxr, text_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    corpus = mimic_cxr.load_corpus(args.data, progress=False)
    texts = [mimic_cxr.stage_text(r, 1) or "" for r in corpus.records]
    texts += [f"{q.question} {q.answer}" for q in mimic_cxr.read_vqa(args.data).items]
    dolly = os.path.join(args.data, "databricks-dolly-15k.jsonl")
    if os.path.isfile(dolly):
        texts += [f"{r['instruction']} {r['context']} {r['response']}" for r in mimic_cxr.read_dolly(dolly).items]
    tok, special, _ = text_tokenizer.train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(json.dumps({"out": args.out, "text_size": vocab.text_size(tok), "texts": len(texts),
                      "eos_id": special.eos_id, "response_key_id": special.response_key_id}))


if __name__ == "__main__":
    main()
