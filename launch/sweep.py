"""Ablation sweeps: `run` validates every run's config and workdir, then trains them (locally in
sequence, or submitted through launch/tpu_pod.py / launch/slurm_submit.py); `report` turns the
runs' metrics.jsonl into runs.csv, runs.md and loss_curves.png.

A sweep file (configs/ablations/*.py) defines get_sweep() -> {"base": "FILE[:VARIANT]",
"command": "train" | "train-vqgan", "common": [overrides], "runs": {name: [overrides] or
{"base", "command", "overrides"}}}. Overrides apply in the order base < common < --set < the
run's own (a run's overrides define it, so a sweep-wide --set never undoes them); "{root}" in an
override is the sweep's --workdir, so a stage-2 run can start from a stage-1 run of the sweep.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
COMMANDS = ("train", "train-vqgan")
SUBMITTERS = {"tpu": "tpu_pod.py", "slurm": "slurm_submit.py"}
RUN_FILE = "sweep_run.json"  # what the sweep asked of a run, for `report`


class SweepError(ValueError):
    """A one-line reason; `main` prints it and exits 2."""


# ---------------------------------------------------------------- the sweep file

def _key(item: str) -> str:
    return item.strip().removeprefix("--config.").removeprefix("config.")


def _resolve_spec(spec: str) -> str:
    """FILE[:VARIANT] with FILE relative to the working directory or, failing that, the repository."""
    path, sep, variant = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    return os.path.abspath(path) + sep + variant


def load_sweep(path: str) -> tuple[dict, dict[str, dict]]:
    """-> (the sweep dict, {name: {"base", "command", "overrides"}}) in file order."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location("llmcxr_sweep_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep()")
    sweep = module.get_sweep()
    extra = set(sweep) - {"base", "command", "common", "runs"}
    if extra or "base" not in sweep or not sweep.get("runs"):
        raise SweepError(f"{path}: get_sweep() must give base and runs (and optionally command, common); "
                         f"unknown keys {sorted(extra)}")
    runs = {}
    for name, run in sweep["runs"].items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise SweepError(f"{path}: run name {name!r} is not a plain directory name")
        run = dict(run) if isinstance(run, dict) else {"overrides": list(run)}
        if set(run) - {"base", "command", "overrides"}:
            raise SweepError(f"run {name}: unknown keys {sorted(set(run) - {'base', 'command', 'overrides'})}")
        run.setdefault("base", sweep["base"])
        run.setdefault("command", sweep.get("command", "train"))
        run.setdefault("overrides", [])
        if run["command"] not in COMMANDS:
            raise SweepError(f"run {name}: command {run['command']!r} is not one of {COMMANDS}")
        runs[name] = run
    return sweep, runs


def _has_key(cfg, key: str) -> bool:
    import ml_collections

    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _set_command(item: str) -> str | None:
    """`train-vqgan:train.init_from=X` applies to the train-vqgan runs only; a bare KEY=VALUE to all."""
    head = item.partition("=")[0]
    return head.partition(":")[0] if ":" in head else None


def _set_item(item: str) -> str:
    """The override without its command prefix."""
    return _key(item.split(":", 1)[1] if _set_command(item) else item)


def _set_name(item: str) -> str:
    """What an unused --set is reported as: [COMMAND:]KEY."""
    cmd = _set_command(item)
    return (f"{cmd}:" if cmd else "") + _set_item(item).partition("=")[0]


def plan(sweep: dict, runs: dict[str, dict], root: str, only: list[str], sets: list[str]) -> list[dict]:
    """Every selected run with its final overrides, config and workdir; raises SweepError on the
    first bad run, an unused --set key, or a workdir that holds a different config."""
    from llmcxr_jax import configs

    unknown = [n for n in only if n not in runs]
    if unknown:
        raise SweepError(f"--only {' '.join(unknown)}: no such run; runs are {' '.join(runs)}")
    used: set[str] = set()

    def one(index: int, name: str, run: dict, selected: bool = True) -> dict:
        base = _resolve_spec(run["base"])
        common = [_key(o).replace("{root}", root) for o in sweep.get("common", [])]
        own = [_key(o).replace("{root}", root) for o in run["overrides"]]
        try:
            probe = configs.load_config(base, common)
            site = [s for s in sets if _set_command(s) in (None, run["command"])
                    and _has_key(probe, _set_item(s).partition("=")[0])]
            if selected:  # an unselected run is only looked at (has it finished?): it uses no --set
                used.update(_set_name(s) for s in site)
            overrides = common + [_set_item(s) for s in site] + own
            cfg = configs.load_config(base, overrides)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise SweepError(f"run {name}: {e.args[0] if isinstance(e, KeyError) else e}") from None
        return {"name": name, "index": index, "command": run["command"], "base": base, "overrides": overrides,
                "own": own, "config": cfg, "workdir": os.path.join(root, name),
                "after": [other for other in runs if other != name and _starts_from(own, root, other)]}

    planned = [one(i, name, run) for i, (name, run) in enumerate(runs.items()) if not only or name in only]
    chosen = {p["name"] for p in planned}
    for p in planned:  # a run that starts from another run of the sweep needs it done, or in this submission
        for other in p["after"]:
            if other not in chosen and not finished(one(list(runs).index(other), other, runs[other], False)):
                raise SweepError(f"run {p['name']} starts from run {other}, which has not finished; select it too "
                                 f"(--only ... {other})")
    unused = sorted({_set_name(s) for s in sets} - used)
    if unused:
        raise SweepError(f"--set {unused[0]}: no selected run's config has this key")
    for p in planned:
        _check_workdir(p)
    return planned


def _check_workdir(p: dict) -> None:
    """The JSON the trainer would write (metrics.claim_workdir) must equal what the workdir holds."""
    path = os.path.join(p["workdir"], "config.json")
    if _remote(path) or not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f)
    now = json.loads(p["config"].to_json_best_effort())
    if before != now:
        diff = _diff(before, now)
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:3]) + (" ..." if len(diff) > 3 else "")
        raise SweepError(f"run {p['name']}: {p['workdir']} holds a run with a different config ({shown}); "
                         "give a new --workdir or remove that run")


def _diff(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


# ---------------------------------------------------------------- running

def _remote(path: str) -> bool:
    """gs://... and other URLs: the trainer reads them, this script does not (no done check, no
    config.json comparison; the trainer itself refuses a workdir of another model)."""
    return "://" in path


def _starts_from(own: list[str], root: str, other: str) -> bool:
    """One of a run's own overrides names run `other`'s workdir ("{root}/OTHER"), e.g. as train.init_from."""
    there = os.path.join(root, other)
    return any(v == there or v.startswith(there + "/") for v in (o.partition("=")[2] for o in own))


def finished(p: dict) -> bool:
    """The trainers save a checkpoint at train.steps; its step directory means the run is done."""
    final = os.path.join(p["workdir"], "checkpoints", str(int(p["config"].train.steps)))
    return not _remote(p["workdir"]) and os.path.isdir(final)


def train_argv(p: dict, program: list[str], base: str | None = None) -> list[str]:
    return [*program, p["command"], "--config", base or p["base"], "--workdir", p["workdir"],
            *(f"--config.{o}" for o in p["overrides"])]


def submit_argv(backend: str, p: dict, submit_args: list[str]) -> list[str]:
    """`SCRIPT SUBMIT_ARGS -- llmcxr COMMAND ...`. TPU workers run from their own checkout, so a
    config inside this repository goes by its repository-relative path; SLURM jobs share this
    filesystem and get one job name per run."""
    script = os.path.join(LAUNCH, SUBMITTERS[backend])
    base = p["base"]
    if backend == "tpu" and os.path.commonpath([REPO, base.partition(":")[0]]) == REPO:
        base = os.path.relpath(base, REPO)
    if backend == "slurm" and not any(a.startswith("--job-name") for a in submit_args):
        submit_args = [*submit_args, f"--job-name=llmcxr-{p['name']}"]
    return [sys.executable, script, *submit_args, "--", *train_argv(p, ["llmcxr"], base)]


def run_sweep(planned: list[dict], backend: str, dry_run: bool, submit_args: list[str]) -> list[str]:
    """Trains (local) or submits each run in order; returns the names of runs that failed. A run
    that starts from another run of this sweep (p["after"]) waits for it: locally it is skipped if
    that one failed; on SLURM its job gets --dependency=afterok on that one's job id."""
    failed, failed_names, jobs = [], set(), {}
    pending = {p["name"] for p in planned if not finished(p)}
    if backend == "tpu" and "supervise" not in submit_args:
        for p in planned:
            if any(o in pending for o in p["after"]):
                raise SweepError(f"run {p['name']} starts from run {p['after'][0]}, submitted with it to a TPU pod "
                                 "that returns at once; add --submit-arg=supervise (waits for each run) or submit "
                                 f"{p['name']} after {p['after'][0]} finishes")
    for i, p in enumerate(planned, 1):
        tag = f"[{i}/{len(planned)}] {p['name']}"
        if finished(p):
            print(f"sweep: {tag}: finished at step {p['config'].train.steps}; skipped", file=sys.stderr)
            continue
        broken = [o for o in p["after"] if o in failed_names]
        if broken:
            failed.append(f"{p['name']} (not started: {broken[0]} failed)")
            failed_names.add(p["name"])
            print(f"sweep: {tag}: not started, it starts from {broken[0]}, which failed", file=sys.stderr)
            continue
        extra = []
        if backend == "slurm" and any(o in jobs for o in p["after"]):
            extra = ["--dependency=afterok:" + ":".join(jobs[o] for o in p["after"] if o in jobs)]
        argv = train_argv(p, [sys.executable, "-m", "llmcxr_jax.cli"]) if backend == "local" \
            else submit_argv(backend, p, [*submit_args, *extra])
        if dry_run:
            print(shlex.join(argv))
            jobs[p["name"]] = f"<{p['name']}>"  # stands for the job id sbatch would print
            continue
        if backend != "local" and not os.path.isfile(argv[1]):
            raise SweepError(f"--backend {backend} needs {argv[1]}, which does not exist")
        if not _remote(p["workdir"]):
            os.makedirs(p["workdir"], exist_ok=True)
            with open(os.path.join(p["workdir"], RUN_FILE), "w") as f:
                json.dump({k: p[k] for k in ("name", "index", "command", "base", "overrides", "own")}
                          | {"backend": backend, "argv": argv}, f, indent=2)
        print(f"sweep: {tag}: {shlex.join(argv)}", file=sys.stderr, flush=True)
        t0 = time.time()
        if backend == "slurm":  # slurm_submit.py prints "slurm job ID": its dependents wait on it
            done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
            sys.stdout.write(done.stdout)
            rc = done.returncode
            ids = re.findall(r"^slurm job (\d+)$", done.stdout, re.M)
            if ids:
                jobs[p["name"]] = ids[-1]
            elif rc == 0 and any(p["name"] in q["after"] for q in planned):
                raise SweepError(f"run {p['name']}: no job id in slurm_submit.py's output; submit the runs that "
                                 "start from it later with --only")
        else:
            rc = subprocess.call(argv)
        print(f"sweep: {tag}: exit {rc} after {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if rc:
            failed.append(f"{p['name']} (exit {rc})")
            failed_names.add(p["name"])
    return failed


# ---------------------------------------------------------------- report

COLUMNS = ("name", "command", "steps", "final_loss", "final_eval_loss", "min_eval_loss", "tokens_per_s_median",
           "overrides")


def _series(rows: list[dict], keys: tuple[str, ...]) -> tuple[str, list[tuple[int, float]]]:
    """The first of `keys` the log has, as (step, value) pairs in step order; a step logged again
    after a resume keeps its latest value."""
    for key in keys:
        points = {int(r["step"]): float(r[key]) for r in rows if key in r and np.isfinite(float(r[key]))}
        if points:
            return key, sorted(points.items())
    return "", []


def collect(root: str) -> list[dict]:
    """One summary per ROOT/NAME that holds a metrics.jsonl (LM: loss / eval_loss; VQ-GAN:
    total_loss / eval_l1)."""
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        meta = {}
        if os.path.isfile(os.path.join(root, name, RUN_FILE)):
            with open(os.path.join(root, name, RUN_FILE)) as f:
                meta = json.load(f)
        _, train = _series(rows, ("loss", "total_loss"))
        _, evals = _series(rows, ("eval_loss", "eval_l1"))
        rates = [float(r["tokens_per_s"]) for r in rows if "tokens_per_s" in r and int(r["step"]) > 1]
        found.append({
            "name": name, "command": meta.get("command", ""), "steps": max(int(r["step"]) for r in rows) if rows else 0,
            "final_loss": train[-1][1] if train else None, "final_eval_loss": evals[-1][1] if evals else None,
            "min_eval_loss": min(v for _, v in evals) if evals else None,
            "tokens_per_s_median": float(np.median(rates)) if rates else None,
            "overrides": " ".join(meta.get("own", [])), "train_curve": train, "eval_curve": evals,
            "order": meta.get("index", 1 << 30)})
    return sorted(found, key=lambda r: (r["order"], r["name"]))


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(runs: list[dict], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in (("csv", "runs.csv"), ("md", "runs.md"), ("png", "loss_curves.png"))}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in runs:
            w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in COLUMNS) + " |" for r in runs]
    lines.append("\nloss: last train loss (VQ-GAN: total_loss); eval: held-out loss (VQ-GAN: eval_l1); tokens/s: "
                 "the trainer's loss-token rate, median over log lines after step 1 (which includes compilation).")
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_curves(runs, paths["png"])
    return paths


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_curves(runs: list[dict], path: str, panel: tuple[int, int] = (640, 420)) -> None:
    """Two panels (train loss, eval loss) vs step, one colour per run, legend below; PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(13)
    legend_h = 22 * ((len(runs) + 2) // 3) + 10
    img = Image.new("RGB", (2 * panel[0], panel[1] + legend_h), "white")
    draw = ImageDraw.Draw(img)
    for col, (title, key) in enumerate((("train loss", "train_curve"), ("eval loss", "eval_curve"))):
        _panel(draw, font, (col * panel[0], 0, panel[0], panel[1]), title, [(r[key], PALETTE[i % len(PALETTE)])
                                                                            for i, r in enumerate(runs)])
    for i, r in enumerate(runs):
        x, y = 60 + (i % 3) * (2 * panel[0] - 80) // 3, panel[1] + 6 + 22 * (i // 3)
        draw.line([(x, y + 8), (x + 28, y + 8)], fill=PALETTE[i % len(PALETTE)], width=3)
        draw.text((x + 36, y), r["name"], fill="black", font=font)
    img.save(path)


def _panel(draw, font, box, title: str, curves: list) -> None:
    x0, y0, w, h = box
    left, right, top, bottom = x0 + 70, x0 + w - 20, y0 + 30, y0 + h - 45
    draw.text((x0 + w // 2 - 30, y0 + 8), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [p for c, _ in curves for p in c]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill="gray", font=font)
        return
    steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    (sx0, sx1), (vy0, vy1) = _span(steps.min(), steps.max()), _span(values.min(), values.max())

    def at(step, value):
        return (left + (step - sx0) / (sx1 - sx0) * (right - left),
                bottom - (value - vy0) / (vy1 - vy0) * (bottom - top))

    for sx in _ticks(sx0, sx1):
        px, _ = at(sx, vy0)
        draw.line([(px, top + 1), (px, bottom - 1)], fill=(230, 230, 230))
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px - 3 * len(f"{sx:.6g}"), bottom + 7), f"{sx:.6g}", fill="black", font=font)
    for vy in _ticks(vy0, vy1):
        _, py = at(sx0, vy)
        draw.line([(left + 1, py), (right - 1, py)], fill=(230, 230, 230))
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((x0 + 4, py - 7), f"{vy:.6g}", fill="black", font=font)
    draw.text((x0 + w // 2 - 12, bottom + 24), "step", fill="black", font=font)
    for curve, colour in curves:
        xy = [at(s, v) for s, v in curve]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) <= 40 else xy[-1:]:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def _ticks(lo: float, hi: float) -> np.ndarray:
    """About five round values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / 5
    mag = 10.0 ** np.floor(np.log10(raw))
    step = mag * next(m for m in (1, 2, 5, 10) if m * mag >= raw)
    return np.round(np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step, 12)


def _span(lo: float, hi: float) -> tuple[float, float]:
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 0.5)
    return lo - pad, hi + pad


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="validate every run, then train (or submit) them in order; rerun to resume")
    r.add_argument("sweep", help="sweep file, e.g. configs/ablations/paper.py")
    r.add_argument("--workdir", required=True, help="sweep root; run NAME trains in ROOT/NAME")
    r.add_argument("--only", nargs="+", default=[], metavar="NAME", help="these runs only")
    r.add_argument("--backend", default="local", choices=("local", *SUBMITTERS))
    r.add_argument("--dry-run", action="store_true", help="validate and print the commands; start nothing")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run whose config has KEY (data paths, steps); "
                        "COMMAND:KEY=VALUE (train: or train-vqgan:) for that command's runs only")
    r.add_argument("--submit-arg", action="append", default=[], metavar="ARG",
                   help="passed to launch/tpu_pod.py or launch/slurm_submit.py before the `--` and the job's command")
    p = sub.add_parser("report", help="runs.csv, runs.md and loss_curves.png from ROOT/*/metrics.jsonl")
    p.add_argument("--workdir", required=True, help="sweep root")
    p.add_argument("--out", default=None, help="output directory (default ROOT)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            for item in args.set:
                if "=" not in item:
                    raise SweepError(f"--set {item!r} is not KEY=VALUE")
                if _set_command(item) not in (None, *COMMANDS):
                    raise SweepError(f"--set {item!r}: {_set_command(item)!r} is not a command; prefix a key with "
                                     f"one of {', '.join(COMMANDS)} and a colon, or give none")
            root = args.workdir if _remote(args.workdir) else os.path.abspath(args.workdir)
            if _remote(root) and args.backend == "local":
                raise SweepError(f"--backend local trains into a local --workdir; {root} is for tpu/slurm")
            sweep, runs = load_sweep(args.sweep)
            planned = plan(sweep, runs, root, args.only, args.set)
            failed = run_sweep(planned, args.backend, args.dry_run, args.submit_arg)
            if failed:
                print(f"sweep: error: runs failed: {', '.join(failed)}", file=sys.stderr)
                return 1
            return 0
        runs = collect(args.workdir)
        if not runs:
            raise SweepError(f"{args.workdir} holds no run with a metrics.jsonl")
        paths = write_report(runs, args.out or args.workdir)
        with open(paths["md"]) as f:
            print(f.read(), file=sys.stderr)
        print(json.dumps({"runs": len(runs)} | paths))
        return 0
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
