"""What a pod needs for LLM-CXR stage 1, from ahead-of-time TPU compiles of the real train step on
this CPU-only machine (libtpu): the tables of docs/performance.md.

    python benchmarks/pod_memory.py --out pod_memory.json            # every table (an hour on 2 cores)
    python benchmarks/pod_memory.py --only settings --models 3b     # one table, one model

Tables (each compile is `llmcxr compile-check` of configs/llmcxr_stage1.py:<model>, memory per chip
as XLA reports it):
  settings: memory per chip for model.attention xla vs splash and train.logits_chunk 0 vs 512, at
            LLM-CXR's global batch of 16 x 2048 on --topology;
  smallest: the smallest v4 and v5p slice on which each model's stage 1 fits at 16 x 2048 (splash,
            chunked loss), FSDP over up to 16 chips (the batch's rows) and tensor parallelism beyond;
  batch:    the largest per-chip batch (rows of 2048) for 3b on v4-32 and v5p-64, FSDP over every chip.
Results are appended to --out as they come, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGE1 = os.path.join(ROOT, "configs", "llmcxr_stage1.py")
SETTINGS = [("xla", 0), ("xla", 512), ("splash", 0), ("splash", 512)]
SLICES = {"v4": ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128"),
          "v5p": ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128")}
GLOBAL_ROWS = 16  # LLM-CXR: 2 per GPU x 8


def compile_once(model: str, topology: str, mesh: str, batch: int, attention: str, chunk: int) -> dict:
    from llmcxr_jax import configs
    from llmcxr_jax.train import compile_check, lm

    overrides = [f"model.attention={attention}", f"train.logits_chunk={chunk}", f"train.batch_size={batch}"]
    config = configs.load_config(f"{STAGE1}:{model}", overrides)
    tokens, flops = lm.step_flops(config)
    start = time.perf_counter()
    try:
        r = compile_check.compile_check(lambda m: lm.lower_train_step(config, m), topology, mesh_shape=mesh,
                                        tokens_per_step=tokens, model_flops_per_step=flops)
    except ValueError as e:  # a mesh the batch does not divide over, etc.: recorded, not fatal
        return {"model": model, "topology": topology, "mesh": mesh, "batch": batch, "attention": attention,
                "logits_chunk": chunk, "error": str(e).splitlines()[0]}
    out = {"model": model, "topology": topology, "mesh": mesh, "batch": batch, "attention": attention,
           "logits_chunk": chunk, "fits": r.fits, "needed_bytes": r.needed_bytes, "hbm_bytes": r.hbm_bytes,
           "temp_bytes": r.temp_bytes, "argument_bytes": r.argument_bytes, "num_chips": r.num_chips,
           "xla_optimal_seconds": r.xla_optimal_seconds, "custom_kernels": list(r.custom_kernels),
           "step_seconds_at_40pct": r.step_seconds, "oom": r.oom_message, "wall_s": time.perf_counter() - start}
    print(json.dumps(out), flush=True)
    return out


def chips_of(topology: str) -> int:
    from llmcxr_jax.train import topologies

    return topologies.parse_topology(topology).num_chips


def stage1_mesh(chips: int) -> str:
    """FSDP over up to GLOBAL_ROWS chips (each holds whole rows), tensor parallelism beyond."""
    fsdp = min(chips, GLOBAL_ROWS)
    return f"1,{fsdp},{chips // fsdp}"


def settings_table(models, topology, record):
    mesh = stage1_mesh(chips_of(topology))
    for model in models:
        for attention, chunk in SETTINGS:
            record(compile_once(model, topology, mesh, GLOBAL_ROWS, attention, chunk))


def smallest_table(models, record):
    for model in models:
        for names in SLICES.values():
            for topology in names:
                r = record(compile_once(model, topology, stage1_mesh(chips_of(topology)), GLOBAL_ROWS, "splash", 512))
                if r.get("fits"):
                    break


def batch_table(record):
    for topology in ("v4-32", "v5p-64"):
        chips = chips_of(topology)
        best = 0
        for per_chip in (1, 2, 4, 8, 16):
            r = record(compile_once("3b", topology, f"1,{chips},1", per_chip * chips, "splash", 512))
            if not r.get("fits"):
                break
            best = per_chip
        record({"model": "3b", "topology": topology, "largest_rows_per_chip": best})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pod_memory.json", help="JSON lines, appended as results come")
    p.add_argument("--only", default="settings,smallest,batch", help="comma list of tables")
    p.add_argument("--models", default="3b,7b,12b")
    p.add_argument("--topology", default="v5p-64", help="topology of the settings table")
    args = p.parse_args(argv)

    def record(row: dict) -> dict:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    models = args.models.split(",")
    only = args.only.split(",")
    if "settings" in only:
        settings_table(models, args.topology, record)
    if "smallest" in only:
        smallest_table(models, record)
    if "batch" in only:
        batch_table(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
