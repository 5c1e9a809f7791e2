"""Reload an export with transformers (PyTorch) and compare its logits with ours on image tokens."""
import argparse

import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcxr_jax import checkpoint, sharding


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--hf", required=True)
    args = p.parse_args()
    lm = checkpoint.load_lm(args.ckpt, sharding.make_mesh("1,-1,1"), dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.hf)
    text = tok("### Instruction:\nWrite a report.\n\nInput:\n<")["input_ids"]
    codes = np.random.default_rng(0).integers(0, lm.layout.image_codes, 16)
    ids = np.array([text + list(lm.layout.image_token(codes)) + tok(">")["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lm.model(jnp.asarray(ids)))[..., : lm.layout.size]
    print(f"tokenizer length T = {len(tok)}, image codes K = {lm.layout.image_codes}, "
          f"HF vocab_size = {hf.config.vocab_size}, stored rows = {lm.layout.padded_size}")
    print(f"sequence of {ids.shape[1]} tokens ({len(codes)} image tokens): "
          f"max |logits(JAX) - logits(transformers)| = {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
