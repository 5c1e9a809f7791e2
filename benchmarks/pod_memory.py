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


def _gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def _ms(s) -> str:
    return f"{s * 1e3:.1f} ms" if s and s > 0 else "-"


def markdown(rows: list[dict]) -> str:
    """The three tables from a results file (the last result of each compile wins)."""
    runs = {(r["model"], r["topology"], r["mesh"], r["batch"], r["attention"], r["logits_chunk"]): r
            for r in rows if "needed_bytes" in r or "error" in r}
    out = ["| model | topology (mesh) | attention | logits_chunk | memory per chip | of HBM | XLA cost model | "
           "est. step at 40% MFU |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (model, topo, mesh, batch, att, chunk), r in runs.items():
        if batch == GLOBAL_ROWS and mesh == stage1_mesh(r.get("num_chips", 0)) and topo.startswith("v5p-64"):
            out.append(f"| {model} | {topo} ({mesh}) | {att} | {chunk} | {_gib(r['needed_bytes'])} | "
                       f"{100 * r['needed_bytes'] / r['hbm_bytes']:.0f}% | {_ms(r['xla_optimal_seconds'])} | "
                       f"{_ms(r['step_seconds_at_40pct'])} |")
    out += ["", "| model | smallest v4 slice | memory per chip | smallest v5p slice | memory per chip |",
            "| --- | --- | --- | --- | --- |"]
    for model in dict.fromkeys(k[0] for k in runs):
        cells = []
        for names in SLICES.values():
            fit = [r for k, r in runs.items() if k[0] == model and k[1] in names and k[3] == GLOBAL_ROWS
                   and (k[4], k[5]) == ("splash", 512) and r.get("fits")]
            best = min(fit, key=lambda r: r["num_chips"], default=None)
            memory = f"{_gib(best['needed_bytes'])} of {_gib(best['hbm_bytes'])}" if best else ""
            cells += [f"{best['topology']} ({best['num_chips']} chips)" if best else "none tried fits", memory]
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    out += ["", "| model | topology (mesh) | attention, logits_chunk | rows per chip | global batch | "
            "memory per chip | fits |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (model, topo, mesh, batch, att, chunk), r in runs.items():
        chips = r.get("num_chips", 0)
        if model == "3b" and chips and mesh == f"1,{chips},1" and topo in ("v4-32", "v5p-64"):
            need = _gib(r["needed_bytes"]) if r.get("needed_bytes") else "?"
            out.append(f"| {model} | {topo} ({mesh}) | {att}, {chunk} | {batch // chips} | {batch} x 2048 | {need} | "
                       f"{'yes' if r.get('fits') else 'no'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pod_memory.json", help="JSON lines, appended as results come")
    p.add_argument("--only", default="settings,smallest,batch", help="comma list of tables")
    p.add_argument("--models", default="3b,7b,12b")
    p.add_argument("--topology", default="v5p-64", help="topology of the settings table")
    p.add_argument("--markdown", action="store_true", help="print the tables of --out's results and exit")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.out) as f:
            print(markdown([json.loads(line) for line in f if line.strip()]))
        return 0

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
