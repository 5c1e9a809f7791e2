"""One prepared speed check for a lent NVIDIA GPU (H100 / H200, one chip, ~8 minutes), each part against the
PyTorch reference on the same GPU. Run it through benchmarks/accelerator_check.sh (it sets up the paths).

  lm_train_xla, lm_train_cudnn  our jitted stage-1 train step (configs/llmcxr_stage1.py:3b: dolly-v2-3b shape,
                                random init, bf16 compute, scanned layers, remat) at 2 x 2048 tokens with
                                model.attention=xla / cudnn, on a synthetic packed batch: tokens/s and MFU
  lm_train_torch                transformers' GPTNeoXForCausalLM, same shape and batch, float32 weights under
                                bf16 autocast (our precision), SDPA attention, gradient checkpointing, fused AdamW
  generate                      our sampler vs transformers `generate` for a 256-code image (benchmarks/generate.py)
  vqgan                         f16_1024 VQ-GAN encode / decode vs diffusers' VQModel (benchmarks/vqgan_codec.py)

Each part runs in its own process under its own time limit (a crash, an out-of-memory or a hang loses only
that part; what it finished is kept); timings are medians of N steps after warm-up steps (compilation
excluded). Writes accelerator_check.json, accelerator_check.md and accelerator_check.log (the parts' output)
to --out (default $OUT, else the current folder). --smoke: tiny shapes on the CPU, every part in this process
(--isolate: one process each), so the test suite runs the whole script in seconds. The parts themselves:
benchmarks/accelerator_parts.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accelerator_parts as parts  # noqa: E402 (beside this file, not a package)

# seconds each part may take, its start-up and compilation included (500 in all); a timing loop stops at 0.7 x
BUDGET_S = {"lm_train_xla": 100, "lm_train_cudnn": 90, "lm_train_torch": 80, "generate": 150, "vqgan": 80}


# ---------------------------------------------------------------- the driver

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "grain", "torch", "transformers",
            "diffusers", "numpy")


def environment() -> dict:
    """What ran where, read without starting JAX or CUDA in this process (the parts need the whole GPU)."""
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "gpus": gpus, "versions": versions, "missing": [k for k, v in versions.items() if v is None],
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_here(name: str, shape: dict, deadline: float, emit) -> dict:
    """One part in this process: its result with status "ok", or what it had emitted with status "error" and
    the exception's first line (the traceback goes to stderr)."""
    last = {}

    def keep(partial: dict) -> None:
        last.clear()
        last.update(partial)
        emit({**partial, "status": "partial"})

    try:
        return {**parts.run_part(name, shape, deadline, keep), "status": "ok"}
    except Exception as e:  # recorded; the driver goes on with the next part
        traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {**last, "status": "error", "error": f"{type(e).__name__}: {first_line}"[:300]}


def run_inline(name: str, args) -> dict:
    """--smoke: the part in this process (no hard time limit; its timing loop still stops at 0.7 x budget)."""
    t0 = time.perf_counter()
    shape = parts.SMOKE if args.smoke else parts.FULL
    result = run_here(name, shape, time.monotonic() + 0.7 * BUDGET_S[name] * args.budget_scale, lambda _: None)
    return _finish(name, result, t0)


def run_child(name: str, args) -> dict:
    """The part in its own process, killed at its budget; whatever it emitted before is kept."""
    budget = BUDGET_S[name] * args.budget_scale
    path = os.path.join(args.out, f".part_{name}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--part-out", path,
           "--deadline-in", str(0.7 * budget)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    if name in ("lm_train_xla", "lm_train_cudnn"):
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # JAX alone: 3b weights, grads and Adam ~45 GB
    else:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX and PyTorch share the GPU in these parts
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "accelerator_check.log"), "a") as log:
        log.write(f"\n===== {name} (budget {budget:.0f} s)\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, timeout=budget, env=env)
            status, tail = ("ok" if proc.returncode == 0 else "error"), proc.stderr
        except subprocess.TimeoutExpired as e:
            status = "timeout"
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log.write(tail)
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        os.remove(path)
    if status == "ok" and result.get("status") != "ok":
        status = "error"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    last_line = lines[-1][:300] if lines else ""
    if status == "timeout":
        result["error"] = f"no result within {budget:.0f} s" + (f"; {last_line}" if last_line else "")
    elif status == "error" and not result.get("error"):
        result["error"] = last_line or "the part exited without a result"
    result["status"] = status
    return _finish(name, result, t0)


def _finish(name: str, result: dict, t0: float) -> dict:
    result["seconds"] = time.perf_counter() - t0
    status = result["status"]
    print(f"{name}: {status} in {result['seconds']:.0f} s" + (f" ({result['error']})" if status != "ok" else ""),
          file=sys.stderr, flush=True)
    return result


def child_main(args) -> int:
    """--part: run one part, writing its result (partial ones first) to --part-out."""
    sys.path.insert(0, parts.ROOT)

    def write(result: dict) -> None:
        with open(args.part_out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(args.part_out + ".tmp", args.part_out)

    result = run_here(args.part, parts.SMOKE if args.smoke else parts.FULL, time.monotonic() + args.deadline_in,
                      write)
    write(result)
    return 0 if result["status"] == "ok" else 1


def _fmt(v, unit="", digits=0):
    return "-" if v is None else f"{v:,.{digits}f}{unit}"


def _train_cell(p: dict) -> str:
    if p.get("tokens_per_s"):
        return f"{_fmt(p['tokens_per_s'])} tok/s, MFU {_fmt(100 * p['mfu'] if p.get('mfu') else None, '%', 1)}"
    return _failed(p)


def _failed(p: dict) -> str:
    return f"{p.get('status', 'not run')}: {p.get('error', '')}".replace("|", "/") if p else "not run"


def markdown(report: dict) -> str:
    """One table of every part that was asked for: ours, the PyTorch reference, their ratio."""
    env, parts = report["environment"], report["sections"]
    lines = [f"# Accelerator check{' (smoke: tiny shapes)' if report['smoke'] else ''}", "",
             f"GPU: {', '.join(env['gpus']) or 'none seen by nvidia-smi'}; jax {env['versions'].get('jax')}, "
             f"torch {env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}, "
             f"diffusers {env['versions'].get('diffusers')}; total {report['total_s']:.0f} s.", "",
             "| part | ours | PyTorch reference | ours / reference | notes |", "| --- | --- | --- | --- | --- |"]
    ref = parts.get("lm_train_torch", {})
    ours_names = [n for n in ("lm_train_xla", "lm_train_cudnn") if n in parts]
    for name in ours_names:
        p = parts[name]
        ratio = p["tokens_per_s"] / ref["tokens_per_s"] if p.get("tokens_per_s") and ref.get("tokens_per_s") else None
        notes = (f"step {_fmt(p['step_time_s'], ' s', 3)} (median of {p['timed_steps']}), compile "
                 f"{_fmt(p.get('compile_s'), ' s', 1)}, logits_chunk {p.get('logits_chunk')}"
                 if p.get("tokens_per_s") else "")
        lines.append(f"| LM train step, attention={name.removeprefix('lm_train_')} | {_train_cell(p)} | "
                     f"{_train_cell(ref)} | {_fmt(ratio, 'x', 2)} | {notes} |")
    if ref and not ours_names:
        lines.append(f"| LM train step | not run | {_train_cell(ref)} | - | |")
    g = parts.get("generate")
    for row in (g or {}).get("rows", []):
        lines.append(f"| generate: {g['image_codes']}-code image, {row['sampler']}, batch 1 | "
                     f"{_fmt(row['ours_tokens_per_s'])} tok/s | {_fmt(row['hf_tokens_per_s'])} tok/s | "
                     f"{_fmt(row['ratio'], 'x', 2)} | {g['new_tokens']} new tokens, {g['dtype']} |")
    if g and g.get("status") != "ok":
        lines.append(f"| generate | {_failed(g)} | | | |")
    v = parts.get("vqgan")
    for what in ("encode", "decode"):
        r = (v or {}).get(f"{what}_images_per_s")
        if r:
            lines.append(f"| VQ-GAN {v['variant']} {what}, batch {v['batch']} | {_fmt(r['jax'], ' img/s', 1)} | "
                         f"{_fmt(r['torch'], ' img/s', 1)} (diffusers) | {_fmt(r['ratio'], 'x', 2)} | {v['dtype']} |")
    if v and v.get("status") != "ok":
        lines.append(f"| VQ-GAN | {_failed(v)} | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for the JSON, markdown and log")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU, every part in this process (the test suite's end-to-end run)")
    p.add_argument("--isolate", action="store_true", help="with --smoke: one process per part, as without it")
    p.add_argument("--only", default=",".join(parts.PARTS), help=f"comma-separated parts of {parts.PARTS}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every part's time limit")
    p.add_argument("--part", choices=parts.PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline-in", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return child_main(args)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(parts.PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {parts.PARTS}")
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "accelerator_check.log"), "w").close()
    t0 = time.perf_counter()
    report = {"smoke": args.smoke, "shape": parts.SMOKE if args.smoke else parts.FULL, "environment": environment(),
              "sections": {}}
    if report["environment"]["missing"]:
        print(f"not installed: {report['environment']['missing']} (see benchmarks/accelerator_check.sh "
              "--fetch-wheels)", file=sys.stderr, flush=True)
    runner = run_inline if args.smoke and not args.isolate else run_child
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before any part imports JAX
    for name in only:
        report["sections"][name] = runner(name, args)
        report["total_s"] = time.perf_counter() - t0
        with open(os.path.join(args.out, "accelerator_check.json"), "w") as f:  # rewritten after each part
            json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(args.out, "accelerator_check.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
