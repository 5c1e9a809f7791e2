"""The markdown `python -m benchmarks` writes: the machine, the versions, the date and command, and one table of
ours vs the PyTorch peer per case against issue 21's goals, kept between two marker lines of docs/performance.md."""
from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata

from benchmarks import suite
from llmcxr_jax.errors import UsageError

BEGIN = "<!-- python -m benchmarks: begin -->"
END = "<!-- python -m benchmarks: end -->"
BUSY_LIMIT = 0.1  # other work on the CPUs above this fraction makes a run unfair to PyTorch
PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "diffusers")
HEADER = ("| benchmark | case | ours | PyTorch peer | ours / peer | goal | met |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def usable_cpus() -> int:
    """The CPUs this process may run on: XLA:CPU sizes its thread pool by them, and the scripts give torch as many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fastest(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn (which waits for its own result), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def emit(result, path: str | None = None) -> None:
    """A benchmark script's result: printed as JSON, and written to path (its --json) when given."""
    print("\n" + json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def machine() -> dict:
    """CPU model, core counts and memory of this machine (Linux /proc files, else what platform knows)."""
    cpu, memory = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            kb = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), None)
        memory = None if kb is None else kb / 2**20
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cpus(), "memory_gib": memory,
            "platform": platform.platform()}


def cpu_busy(seconds: float = 0.3) -> float | None:
    """The fraction of all CPUs' time spent busy over the next `seconds` (Linux /proc/stat; None elsewhere): taken
    while the runner waits, it is other work that would share the cores with a benchmark."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def versions() -> dict:
    """Python and the installed versions of the packages the benchmarks compare."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:,.{digits}f} {unit}"


def cell(text: str) -> str:
    """Text that stays inside one table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(runs: list[dict]) -> str:
    """The markdown table of runs: each {"job", "script", "args", "status": "ok" with "result" (the script's JSON)
    or "failed" with "error" (its last stderr line)}."""
    jobs = {j.name: j for j in suite.JOBS}
    lines = [HEADER]
    for run in runs:
        job = jobs[run["job"]]
        title = cell(suite.title(run["script"], run["args"]))
        if run["status"] != "ok":
            lines.append(f"| {title} | failed: {cell(run['error'])} | - | - | - | {job.goal_text()} | no |")
            continue
        for r in job.rows(run["result"]):
            ratio = None if r["peer"] is None else r["ours"] / r["peer"]
            met = "-" if ratio is None or job.goal is None else "yes" if ratio >= job.goal else "no"
            ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"| {title} | {cell(r['case'])} | {rate(r['ours'], r['unit'])} | {rate(r['peer'], r['unit'])} "
                         f"| {ratio_text} | {job.goal_text(r.get('keep', False))} | {met} |")
    return "\n".join(lines)


def ceilings(runs: list[dict]) -> str:
    """The second table: for each case whose model FLOPs its script counted (the codec, the training step), the
    peer's rate in model GFLOP/s against the fastest float32 matmul this machine ran (matmul_peak.py): ours / peer
    cannot pass XLA's best matmul rate / the peer's model rate without doing fewer multiplications than the model.
    Empty without a matmul_peak run."""
    jobs = {j.name: j for j in suite.JOBS}
    peak = next((r["result"] for r in runs if r["job"] == "matmul_peak" and r["status"] == "ok"), None)
    if peak is None:
        return ""
    xla = max(r["jax_gflops"] for r in peak["rows"])
    torch = max(r["torch_gflops"] for r in peak["rows"])
    lines = ["What the machine allows: the fastest float32 matmul measured above, "
             f"{xla:,.0f} GFLOP/s in XLA:CPU and {torch:,.0f} in PyTorch, against each case's model FLOPs (its "
             "convolutions and matmuls, counted by the script). Ours / peer can pass the ceiling, XLA's best matmul "
             "rate over the peer's model rate, only by doing fewer multiplications than the model.",
             "",
             "| benchmark | case | model GFLOP per item | ours GFLOP/s | peer GFLOP/s | ceiling | goal |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        job = jobs[run["job"]]
        if run["status"] != "ok" or job.goal is None:
            continue
        for r in job.rows(run["result"]):
            if not r.get("model_flops") or r["peer"] is None:
                continue
            ours, peer = r["ours"] * r["model_flops"] / 1e9, r["peer"] * r["model_flops"] / 1e9
            lines.append(f"| {cell(suite.title(run['script'], run['args']))} | {cell(r['case'])} | "
                         f"{r['model_flops'] / 1e9:.3g} | {ours:,.0f} | {peer:,.0f} | {xla / peer:.2f}x | "
                         f"{job.goal_text()} |")
    return "\n".join(lines)


def block(env: dict, runs: list[dict], command: str, date: str, smoke: bool) -> str:
    """The whole marked block: heading, machine, versions, date, command, table (and a note on --smoke)."""
    m, v = env["machine"], env["versions"]
    memory = "unknown memory" if m["memory_gib"] is None else f"{m['memory_gib']:.1f} GiB memory"
    threads = sorted({r["result"]["torch_threads"] for r in runs
                      if r["status"] == "ok" and r["result"].get("torch_threads") is not None})
    thread_text = ", ".join(str(t) for t in threads) or "not recorded"
    busy = [r.get("cpu_busy_before") for r in runs]
    busy_text = ", ".join("unknown" if b is None else f"{b:.0%}" for b in busy)
    if any(b is not None and b > BUSY_LIMIT for b in busy):
        busy_text += (f" (above {BUSY_LIMIT:.0%}: PyTorch's OpenMP threads slow down many times over when other work "
                      "shares their cores; rerun on a quiet machine)")
    lines = [
        BEGIN,
        "## All CPU benchmarks side by side (`python -m benchmarks`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable by this process), {memory}, "
        f"{m['platform']}. XLA:CPU uses the usable cores; PyTorch threads: {thread_text}. CPU busy with other "
        f"work just before each benchmark: {busy_text}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Date: {date}. Command: `{command}` (each benchmark in its own process, one after another; float32, the "
        "same inputs and shapes on both sides, the same weights for the codec and the sampler (lm_step's two models "
        "are initialised apart), warm-up excluded, PyTorch under torch.inference_mode except in the training step).",
    ]
    if smoke:
        lines.append("This is a --smoke run: the smallest shapes and one timed repeat, to show the runner works; "
                     "its numbers say nothing about speed.")
    lines += ["", table(runs)]
    limits = ceilings(runs)
    if limits:
        lines += ["", limits]
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, new_block: str) -> str:
    """text with its marked block replaced by new_block, or, when it has none yet, new_block put after its title
    paragraph: the leading "# " heading and the plain paragraph under it, if any (not a heading, table or list)."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != ends or begins > 1 or (begins and text.index(END) < text.index(BEGIN)):
        raise UsageError(f"the file has {begins} '{BEGIN}' and {ends} '{END}' lines; keep one of each (begin first) "
                         "or neither, then run again")
    if begins:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        return text[:start] + new_block + text[end:]
    if not text.strip():
        return "# Performance\n\n" + new_block + "\n"
    lines = text.splitlines(keepends=True)

    def skip(at: int, blank: bool) -> int:  # past the run of blank (or non-blank) lines from at
        while at < len(lines) and bool(lines[at].strip()) != blank:
            at += 1
        return at

    at = 0
    if lines[0].startswith("# "):
        at = skip(1, blank=True)
        if at < len(lines) and not lines[at].lstrip().startswith(("#", "|", "-", "*", "<!--", "```")):
            at = skip(skip(at, blank=False), blank=True)
    head = "".join(lines[:at])
    if head and not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    rest = "".join(lines[at:])
    return head + new_block + ("\n\n" + rest if rest else "\n")
