"""`python -m benchmarks`: every CPU benchmark (VQ-GAN codec, sampler, LM train step) against its PyTorch peer,
each in its own process one after another (a fresh JAX and torch per benchmark), then one markdown table with the
machine, versions, date and command, written between docs/performance.md's marker lines.

    python -m benchmarks                                  # the full run: minutes per benchmark on 2 cores
    python -m benchmarks --only codec,lm_step --repeats 5 --json runs/bench.json
    python -m benchmarks --smoke --out /tmp/perf.md       # tiny shapes, a minute: does the runner work?

A benchmark that fails is a table row with its last stderr line, and the command exits 1 after the others ran.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from benchmarks import report, suite
from llmcxr_jax.errors import UsageError

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
DEFAULT_OUT = os.path.join(ROOT, "docs", "performance.md")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_job(job: suite.Job, smoke: bool, repeats: int | None, timeout: float) -> dict:
    """Runs one benchmark script in a fresh process on the CPU (JAX and torch both) and reads its --json."""
    args = job.command(smoke, repeats)
    run = {"job": job.name, "script": job.script, "args": args}
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # CPU numbers, even on a GPU host
    with tempfile.TemporaryDirectory(prefix="benchmarks_") as tmp:
        out = os.path.join(tmp, "result.json")
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.join(BENCH, job.script), *args, "--json", out], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            return {**run, "status": "failed", "seconds": time.perf_counter() - start,
                    "error": f"timed out after {timeout:g} s (--timeout)", "stderr_tail": stderr[-4000:]}
        run["seconds"] = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(out):
            reason = last_line(proc.stderr) or f"exit status {proc.returncode}, nothing on stderr"
            if proc.returncode < 0:
                reason = f"killed by signal {-proc.returncode}; {reason}"
            return {**run, "status": "failed", "error": reason, "stderr_tail": proc.stderr[-4000:]}
        with open(out) as f:
            result = json.load(f)
    try:
        job.rows(result)
    except (KeyError, TypeError) as e:  # the script's JSON changed under the table
        return {**run, "status": "failed", "result": result,
                "error": f"the table cannot read its --json result ({type(e).__name__}: {e})"}
    return {**run, "status": "ok", "result": result}


def updated(path: str | None, block: str) -> str:
    """The text of the markdown file at path (empty if none yet) with its marked block replaced by block."""
    if not path:
        return ""
    existing = ""
    if os.path.exists(path):
        with open(path) as f:
            existing = f.read()
    try:
        return report.replace_block(existing, block)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="markdown file whose marked block gets the table (default docs/performance.md; with --smoke "
                        "nothing is written unless --out is given)")
    p.add_argument("--json", default=None, help="also write every benchmark's full results to this file")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(suite.GROUPS)}")
    p.add_argument("--smoke", action="store_true", help="the smallest shapes, one timed repeat, no f16_1024 codec")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per benchmark (codec and lm_step --steps, generate --repeats); default: each "
                        "script's own")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one benchmark may run before it fails")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} must be at least 1")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g} must be positive seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    jobs = suite.select(args.only, args.smoke)
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    updated(out, "")  # a file with broken markers fails now, not after the runs
    command = "python -m benchmarks" + (" " + shlex.join(argv) if argv else "")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    env = {"machine": report.machine(), "versions": report.versions()}

    runs = []
    for i, job in enumerate(jobs, 1):
        script = shlex.join([f"benchmarks/{job.script}", *job.command(args.smoke, args.repeats)])
        print(f"[{i}/{len(jobs)}] {job.name}: python {script}", file=sys.stderr, flush=True)
        busy = report.cpu_busy()
        if busy is not None and busy > report.BUSY_LIMIT:
            print(f"warning: the CPUs are {busy:.0%} busy with other work; PyTorch's numbers will suffer most",
                  file=sys.stderr, flush=True)
        run = {**run_job(job, args.smoke, args.repeats, args.timeout), "cpu_busy_before": busy}
        outcome = "ok" if run["status"] == "ok" else f"FAILED: {run['error']}"
        if run.get("stderr_tail"):
            print("\n".join(run["stderr_tail"].splitlines()[-20:]), file=sys.stderr)
        print(f"[{i}/{len(jobs)}] {job.name}: {outcome} ({run['seconds']:.1f} s)", file=sys.stderr, flush=True)
        runs.append(run)

    text = report.block(env, runs, command, date, args.smoke)
    print(text)
    if out:
        new_text = updated(out, text)  # read again: the file may have been edited during the runs
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(new_text)
        print(f"table written to {out}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "date": date, "smoke": args.smoke, **env, "runs": runs}, f, indent=2)
        print(f"results written to {args.json}", file=sys.stderr)
    failed = [r["job"] for r in runs if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, OSError) as e:
        print(f"python -m benchmarks: {e}", file=sys.stderr)
        sys.exit(2)
