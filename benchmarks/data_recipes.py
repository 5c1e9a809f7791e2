"""What each data-recipe choice changes, measured: one epoch of the LM batch pipeline per choice (ours, each
of LLM-CXR's choices alone, and the "_original" variant) on a synthetic corpus, 256 random codes per image and a
BPE tokenizer trained on its text: pool sizes, task weights, examples and steps per epoch, examples per step,
tokens per epoch (real, loss, computed = rows x seq_len, and rows x the batch's longest row rounded up to 8, what
LLM-CXR's collator pads a batch to).

    python benchmarks/data_recipes.py                        # 400 images, stages 1 and 2, the 3b data settings
    python benchmarks/data_recipes.py --images 1000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHOICES = {  # name -> (variant suffix, overrides)
    "ours": ("", []),
    "directions=parity": ("", ["--config.data.directions=parity"]),
    "mix=original": ("", ["--config.data.mix=original"]),
    "packing=False": ("", ["--config.data.packing=False"]),
    "_original variant": ("_original", []),
}


def make_inputs(directory: str, images: int, codes_per_image: int, seed: int) -> dict[str, str]:
    """Synthetic corpus, random codes (codebook 1024), a tokenizer trained on the corpus text, and LLM-CXR-style
    selection lists (a dict keyed by dicom id, a list) holding our own rebuilt selections."""
    from llmcxr_jax import synthetic
    from llmcxr_jax.data import codes as code_files
    from llmcxr_jax.data import mimic_cxr, text_tokenizer

    root = os.path.join(directory, "corpus")
    synthetic.synthesize(root, num_images=images, image_size=32, seed=seed)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    rng = np.random.default_rng(seed)
    pkl = os.path.join(directory, "codes.pickle")
    with open(pkl, "wb") as f:
        pickle.dump({r.dicom_id: rng.integers(0, 1024, codes_per_image).tolist() for r in corpus.records}, f)
    code_files.import_pickle(pkl, os.path.join(directory, "codes"), codes_per_image=codes_per_image,
                             codebook_size=1024)
    with open(os.path.join(root, "mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle"), "wb") as f:
        pickle.dump({i: {"note": "rebuilt"} for i in sorted(corpus.selected_pa_ap_earliest)}, f)
    with open(os.path.join(root, "eval_dicom_ids.pickle"), "wb") as f:
        pickle.dump([r.dicom_id for r in corpus.evaluation], f)
    text_tokenizer.train_tokenizer(text_tokenizer.corpus_texts(root), os.path.join(directory, "tok"), 2048)
    return {"root": root, "codes": os.path.join(directory, "codes"), "tokenizer": os.path.join(directory, "tok")}


def measure(inputs: dict[str, str], stage: int, suffix: str, overrides: list[str]) -> dict:
    import grain

    from llmcxr_jax import configs, vocab
    from llmcxr_jax.data import lm_batches
    from llmcxr_jax.train import lm_data

    cfg = configs.load_config(os.path.join(ROOT, "configs", f"llmcxr_stage{stage}.py:3b{suffix}"), [
        f"--config.data.root={inputs['root']}", f"--config.data.codes={inputs['codes']}", *overrides])
    tok, special, _ = vocab.load_tokenizer(inputs["tokenizer"])
    layout = vocab.VocabLayout.create(vocab.text_size(tok), 1024)
    sources = lm_data.read_sources(cfg.data)
    pipe = lm_data.make_batches(sources, "train", tok, special, layout, cfg.data, cfg.train.batch_size,
                                shard=grain.sharding.ShardOptions(0, 1))
    steps = examples = real = loss = computed = to_longest = 0
    per_task = dict.fromkeys(lm_batches.TASKS, 0)
    it = pipe.iterator(num_epochs=1)
    for batch in it:
        ids = batch["example_ids"][batch["example_ids"] >= 0]
        steps, examples = steps + 1, examples + len(ids)
        real += int((batch["segment_ids"] > 0).sum())
        loss += int(batch["loss_mask"].sum())
        computed += batch["input_ids"].size
        longest = int((batch["segment_ids"] > 0).sum(1).max())
        to_longest += batch["input_ids"].shape[0] * -(-longest // 8) * 8
        for i in ids:
            per_task[pipe.describe(int(i)).task] += 1
    return {"stage": stage, "pool_sizes": pipe.pool_sizes,
            "task_weights": {t: round(w, 4) for t, w in pipe.task_weights.items()},
            "epoch_examples": pipe.epoch_size, "examples_trained": examples, "too_long": sum(it.dropped.values()),
            "examples_per_task": per_task, "steps": steps, "examples_per_step": round(examples / max(steps, 1), 2),
            "real_tokens": real, "loss_tokens": loss, "computed_tokens": computed, "padded_to_longest": to_longest,
            "fill": round(real / max(computed, 1), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--codes-per-image", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="1,2")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(tmp, args.images, args.codes_per_image, args.seed)
        for stage in (int(s) for s in args.stages.split(",")):
            for name, (suffix, overrides) in CHOICES.items():
                row = {"choice": name, **measure(inputs, stage, suffix, overrides)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| stage | choice | examples | CXR->report / report->CXR / VQA / text | steps | examples/step "
          "| real tokens | loss tokens | computed tokens (fill) | padded to longest |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        tasks = " / ".join(f"{n:,}" for n in r["examples_per_task"].values())
        print(f"| {r['stage']} | {r['choice']} | {r['examples_trained']:,} | {tasks} | {r['steps']:,} "
              f"| {r['examples_per_step']} | {r['real_tokens']:,} | {r['loss_tokens']:,} "
              f"| {r['computed_tokens']:,} ({r['fill']:.0%}) | {r['padded_to_longest']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
