"""Data pipeline throughput. "encode": images/s of `encode_images` end to end (grain read +
preprocess, sharded jitted VQ-GAN encode, ArrayRecord shards), and of its two halves alone
(loading only; device encode only), on generated JPEGs with a randomly initialised VQ-GAN.

    python benchmarks/data_pipeline.py                                   # tiny VQ-GAN (64 px), CPU
    python benchmarks/data_pipeline.py --variant f16_1024 --images 8 --batch 2   # LLM-CXR's 256 px
    python benchmarks/data_pipeline.py --json out.json

"lm_batches": batches/s and tokens/s of the LM batch pipeline (stage-1 task mix over a synthetic
corpus, tokenizer trained on its text, packed 2048-token rows), with --workers grain processes.

    python benchmarks/data_pipeline.py --only lm_batches --workers 2

Each benchmark is a function of the parsed args returning a flat dict (one table row); add
more to BENCHMARKS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def write_jpegs(directory: str, count: int, size: tuple[int, int], seed: int = 0) -> list[tuple[str, str]]:
    """(dicom_id, path) pairs of smooth greyscale JPEGs (width, height = size), CXR-like in cost."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        noise = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1), dtype=np.uint8)
        img = Image.fromarray(noise).resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(2))
        path = os.path.join(directory, f"img{n:06d}.jpg")
        img.save(path, quality=90)
        out.append((f"bench{n:06d}", path))
    return out


def bench_encode(args) -> dict:
    import jax

    from llmcxr_jax import configs
    from llmcxr_jax.data import encode
    from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan
    from llmcxr_jax.sharding import make_mesh

    c = configs.load_config(os.path.join(ROOT, "configs", f"vqgan_f16_1024.py:{args.variant}"))
    cfg = VQGANConfig(**{**c.model.to_dict(), "dtype": args.dtype})
    model = init_vqgan(cfg, 0)
    mesh = make_mesh(args.mesh)
    r = cfg.resolution
    source = (args.source_size or int(r * 1.25), int((args.source_size or int(r * 1.25)) * 1.2))
    with tempfile.TemporaryDirectory() as tmp:
        items = write_jpegs(tmp, args.images, source)
        run = lambda out, its: encode.encode_images(  # noqa: E731
            model, its, os.path.join(tmp, out), batch_size=args.batch, mesh=mesh, num_workers=args.workers,
            num_threads=args.threads, progress=False, shard_size=args.shard_size)
        run("warmup", items[:args.batch])  # compiles; later runs reuse the cached jitted encode
        summary = run("codes", items)

        t0 = time.perf_counter()  # loading alone: the grain half
        batches = encode.image_batches([(n, 0, i, p) for n, (i, p) in enumerate(items)], r, cfg.in_channels,
                                       args.batch, args.workers, args.threads)
        loaded = sum(len(b["position"]) for b in batches)
        load_s = time.perf_counter() - t0

    _, graphdef, params, fn, _ = encode._prepare_model(model, mesh)  # device half: one batch, repeated
    x = jax.device_put(np.zeros((args.batch, r, r, cfg.in_channels), np.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(encode.BATCH_AXES)))
    with jax.set_mesh(mesh):
        jax.block_until_ready(fn(params, x))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            jax.block_until_ready(fn(params, x))
        device_s = (time.perf_counter() - t0) / args.steps
    return {
        "benchmark": "encode", "variant": args.variant, "resolution": r, "source_px": f"{source[0]}x{source[1]}",
        "images": args.images, "batch": args.batch, "workers": args.workers, "dtype": args.dtype,
        "mesh": "x".join(str(v) for v in mesh.shape.values()), "device": jax.devices()[0].device_kind,
        "images_per_s": summary["images_per_s"], "load_only_images_per_s": loaded / load_s,
        "device_only_images_per_s": args.batch / device_s,
    }


def lm_inputs(directory: str, num_images: int, codes_per_image: int, codebook: int, seed: int = 0):
    """A synthetic corpus -> (tokenizer, special, layout, image_text, vqa, text, codes) with random
    codes standing in for encoded images (their values do not change the pipeline's cost)."""
    from llmcxr_jax import synthetic, vocab
    from llmcxr_jax.data import lm_batches, mimic_cxr, text_tokenizer

    root = os.path.join(directory, "corpus")
    synthetic.synthesize(root, num_images=num_images, image_size=32, seed=seed)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    image_text = lm_batches.image_text_examples(mimic_cxr.stage_records(corpus, 1), stage=1)
    vqa = mimic_cxr.vqa_for_records(mimic_cxr.read_vqa(root).items, mimic_cxr.vqa_image_records(corpus))
    text = mimic_cxr.read_dolly(os.path.join(root, "databricks-dolly-15k.jsonl")).items
    tok, special, _ = text_tokenizer.train_tokenizer(text_tokenizer.corpus_texts(root),
                                                     os.path.join(directory, "tokenizer"), vocab_size=4096)
    layout = vocab.VocabLayout.create(vocab.text_size(tok), codebook)
    rng = np.random.default_rng(seed)
    codes = {r.dicom_id: rng.integers(0, codebook, codes_per_image).astype(np.uint16) for r in corpus.records}
    return tok, special, layout, image_text, vqa, text, codes


def bench_lm_batches(args) -> dict:
    """LM batches/s and tokens/s of the grain pipeline (stage-1 mix, packed rows), beside the
    token rate the trainer needs to match LLM-CXR's 8 x A100 run (REFERENCE.md: ~9.5k tokens/s)."""
    import grain

    from llmcxr_jax.data import lm_batches

    with tempfile.TemporaryDirectory() as tmp:
        tok, special, layout, image_text, vqa, text, codes = lm_inputs(tmp, args.lm_images, 256, 1024)
        cfg = {"seq_len": args.seq_len, "max_length": args.seq_len, "batch_size": args.lm_batch,
               "packing": not args.no_packing, "num_workers": args.workers, "num_threads": args.threads}
        pipe = lm_batches.LmBatches(tok, special, layout, image_text=image_text, vqa=vqa, text=text, codes=codes,
                                    config=cfg, shard=grain.sharding.ShardOptions(0, 1))
        it = pipe.iterator()
        next(it)  # starts workers, fills buffers
        t0, tokens, rows = time.perf_counter(), 0, 0
        for _ in range(args.lm_steps):
            b = next(it)
            tokens += int((b["segment_ids"] > 0).sum())
            rows += b["input_ids"].shape[0]
        dt = time.perf_counter() - t0
    return {"benchmark": "lm_batches", "images": args.lm_images, "seq_len": args.seq_len, "batch": args.lm_batch,
            "packing": not args.no_packing, "workers": args.workers, "batches_per_s": args.lm_steps / dt,
            "tokens_per_s": tokens / dt, "fill": tokens / (rows * args.seq_len),
            "llmcxr_8xA100_tokens_per_s": 9.5e3}


BENCHMARKS = {"encode": bench_encode, "lm_batches": bench_lm_batches}


def table(rows: list[dict]) -> str:
    """Markdown table over the union of the rows' keys (floats to 3 significant figures)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {sorted(BENCHMARKS)}")
    p.add_argument("--json", default=None, help="also write the rows here")
    g = p.add_argument_group("encode")
    g.add_argument("--variant", default="tiny", choices=("tiny", "f16_1024"))
    g.add_argument("--images", type=int, default=256)
    g.add_argument("--batch", type=int, default=32, help="global batch (a multiple of the data x fsdp devices)")
    g.add_argument("--workers", type=int, default=0, help="grain worker processes")
    g.add_argument("--threads", type=int, default=8, help="grain read threads per process")
    g.add_argument("--shard-size", type=int, default=4096)
    g.add_argument("--source-size", type=int, default=0, help="JPEG width in px (default 1.25 x resolution)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--mesh", default="-1,1,1")
    g.add_argument("--steps", type=int, default=3, help="timed repeats of the device-only encode")
    g = p.add_argument_group("lm_batches")
    g.add_argument("--lm-images", type=int, default=1000, help="synthetic corpus size")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--lm-batch", type=int, default=16, help="rows per batch (LLM-CXR: global batch 16)")
    g.add_argument("--lm-steps", type=int, default=30, help="timed batches")
    g.add_argument("--no-packing", action="store_true", help="one example per row, padded")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from llmcxr_jax import distributed

    distributed.mark_absl_flags_parsed()  # grain workers (--workers)
    args = parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
    rows = [BENCHMARKS[n](args) for n in names]
    print(table(rows))
    print(json.dumps(rows, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
