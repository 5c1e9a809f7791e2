"""A tiny LLM-CXR training setup: synthetic corpus, random 16-code images (K = 64) stored as code
shards, a BPE tokenizer trained on the corpus text, and the tiny stage configs pointed at them."""
import os
import pickle

import numpy as np

from llmcxr_jax import configs, synthetic
from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data import mimic_cxr, text_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
STAGE1 = os.path.join(ROOT, "configs", "llmcxr_stage1.py")
STAGE2 = os.path.join(ROOT, "configs", "llmcxr_stage2.py")
K, CODES = 64, 16


def make_setup(directory: str, num_images: int = 48, seed: int = 0) -> dict[str, str]:
    root = os.path.join(directory, "corpus")
    synthetic.synthesize(root, num_images=num_images, image_size=32, seed=seed)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    rng = np.random.default_rng(seed)
    pkl = os.path.join(directory, "codes.pickle")
    with open(pkl, "wb") as f:
        pickle.dump({r.dicom_id: rng.integers(0, K, CODES).tolist() for r in corpus.records}, f)
    codes_dir = os.path.join(directory, "codes")
    code_files.import_pickle(pkl, codes_dir, codes_per_image=CODES, codebook_size=K)
    tok_dir = os.path.join(directory, "tokenizer")
    text_tokenizer.train_tokenizer(text_tokenizer.corpus_texts(root), tok_dir, vocab_size=512)
    return {"root": root, "codes": codes_dir, "tokenizer": tok_dir}


def tiny_config(setup: dict[str, str], *overrides: str, stage: int = 1):
    base = [f"--config.data.root={setup['root']}", f"--config.data.codes={setup['codes']}",
            f"--config.data.tokenizer={setup['tokenizer']}", "--config.model.image_codes=64",
            "--config.data.dolly_eval_rows=20"]
    return configs.load_config(f"{STAGE1 if stage == 1 else STAGE2}:tiny", base + list(overrides))
