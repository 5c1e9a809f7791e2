"""Overhead of the LM training loop itself (llmcxr_jax.train.lm.train): steps/s of the tiny stage-1 model on a
small synthetic corpus, with no eval and no checkpoint inside the timed window, so what differs between two
versions of the loop (host syncs, logging) shows against a step that costs little.

    python benchmarks/train_loop.py                       # 300 steps, log_every 50, CPU
    python benchmarks/train_loop.py --steps 600 --log-every 100 --json out.json

The rate is read from metrics.jsonl: the mean step_time_s of the logged windows after the first two (the
first holds compilation). Prints a JSON result.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CODES_PER_IMAGE, CODEBOOK = 16, 64


def make_corpus(directory: str, num_images: int, seed: int = 0) -> dict[str, str]:
    """A synthetic MIMIC-layout corpus, random image codes and a BPE tokenizer trained on its text."""
    from llmcxr_jax import synthetic
    from llmcxr_jax.data import codes as code_files
    from llmcxr_jax.data import mimic_cxr, text_tokenizer

    root = os.path.join(directory, "corpus")
    synthetic.synthesize(root, num_images=num_images, image_size=32, seed=seed)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    rng = np.random.default_rng(seed)
    pkl = os.path.join(directory, "codes.pickle")
    with open(pkl, "wb") as f:
        pickle.dump({r.dicom_id: rng.integers(0, CODEBOOK, CODES_PER_IMAGE).tolist() for r in corpus.records}, f)
    codes = os.path.join(directory, "codes")
    code_files.import_pickle(pkl, codes, codes_per_image=CODES_PER_IMAGE, codebook_size=CODEBOOK)
    tokenizer = os.path.join(directory, "tokenizer")
    text_tokenizer.train_tokenizer(text_tokenizer.corpus_texts(root), tokenizer, vocab_size=512)
    return {"root": root, "codes": codes, "tokenizer": tokenizer}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="train.batch_size (rows of data.seq_len)")
    p.add_argument("--seq", type=int, default=128, help="data.seq_len")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()
    sys.path.insert(0, ROOT)

    import jax

    from llmcxr_jax import configs
    from llmcxr_jax.train import lm
    from llmcxr_jax.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(tmp, args.images)
        overrides = [f"data.root={data['root']}", f"data.codes={data['codes']}", f"data.tokenizer={data['tokenizer']}",
                     f"model.image_codes={CODEBOOK}", "data.dolly_eval_rows=20", f"data.seq_len={args.seq}",
                     f"data.max_length={args.seq}", f"train.batch_size={args.batch}", f"train.steps={args.steps}",
                     f"train.log_every={args.log_every}", "train.eval_every=0",
                     f"train.checkpoint_every={args.steps}", "train.mesh=1,1,1"]
        cfg = configs.load_config(os.path.join(ROOT, "configs", "llmcxr_stage1.py:tiny"), overrides)
        workdir = os.path.join(tmp, "run")
        t0 = time.perf_counter()
        lm.train(cfg, workdir, echo=False)
        wall = time.perf_counter() - t0
        records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "step_time_s" in r]
    # windows: step 1 (compile), then every log_every; the last window ends at the final step (a checkpoint)
    windows = [r for r in records if r["step"] > args.log_every and r["step"] < args.steps]
    if not windows:
        sys.exit(f"no timed window: give --steps above 2 x --log-every ({args.steps}, {args.log_every})")
    step_s = float(np.mean([r["step_time_s"] for r in windows]))
    result = {"steps": args.steps, "log_every": args.log_every, "batch": args.batch, "seq": args.seq,
              "windows": len(windows), "step_time_ms": 1e3 * step_s, "steps_per_s": 1.0 / step_s,
              "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in windows])), "wall_s": wall,
              "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}
    from benchmarks.report import emit

    emit(result, args.json)


if __name__ == "__main__":
    main()
