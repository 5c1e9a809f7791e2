"""Write a tiny random GPT-NeoX with a byte-level BPE tokenizer as a HF directory (no download)."""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_helpers import make_hf_model, make_tokenizer_dir  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tok:
        make_tokenizer_dir(tok, vocab_size=300)
        make_hf_model(args.out, 300, hidden=64, layers=2, heads=4, tokenizer_dir=tok)
    print(f"tiny GPT-NeoX (hidden 64, 2 layers, 300-row table) and tokenizer written to {args.out}")


if __name__ == "__main__":
    main()
