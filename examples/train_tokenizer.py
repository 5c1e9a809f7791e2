"""Train a byte-level BPE tokenizer on a MIMIC-layout corpus's own text (reports, VQA, Dolly rows)
and save it as a HF tokenizer directory, for LM runs that start from scratch.

    python examples/train_tokenizer.py --data CORPUS --out TOKENIZER_DIR [--vocab-size 4096]
"""
import argparse
import json

from llmcxr_jax import vocab
from llmcxr_jax.data import text_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    texts = text_tokenizer.corpus_texts(args.data)
    tok, special, _ = text_tokenizer.train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(json.dumps({"out": args.out, "text_size": vocab.text_size(tok), "texts": len(texts),
                      "eos_id": special.eos_id, "response_key_id": special.response_key_id}))


if __name__ == "__main__":
    main()
