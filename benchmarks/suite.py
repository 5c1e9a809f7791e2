"""What `python -m benchmarks` runs: each CPU benchmark script with its full and --smoke arguments, issue 21's
goal for it, and how its --json result becomes table rows (ours vs the PyTorch peer, one row per case)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llmcxr_jax.errors import UsageError

GROUPS = ("peak", "codec", "generate", "lm_step")  # what --only picks from


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of one script (in its own process); `rows(result)` reads the JSON it wrote."""

    name: str  # key in the JSON results
    group: str  # one of GROUPS
    script: str  # file name under benchmarks/
    args: tuple[str, ...]  # the full run
    smoke_args: tuple[str, ...] | None  # --smoke: the smallest shapes the script allows; None: not run then
    repeats_flag: str  # the script's option that --repeats sets (its timed runs)
    goal: float | None  # issue 21: ours / peer at least this (None: a measurement of the machine, no goal)
    rows: Callable[[dict], list[dict]]

    def command(self, smoke: bool, repeats: int | None) -> list[str]:
        """The script's arguments (without --json) for a full or --smoke run."""
        args = list(self.smoke_args if smoke else self.args)
        if repeats is not None:
            args += [self.repeats_flag, str(repeats)]
        return args

    def goal_text(self, keep: bool = False) -> str:
        """">= 3x", or "keep >= 3x" for a case that meets it already; "reference" without a goal."""
        if self.goal is None:
            return "reference"
        return f"{'keep ' if keep else ''}>= {self.goal:g}x"


def title(script: str, args: list[str]) -> str:
    """The table's benchmark cell: the script and the arguments it ran with."""
    return "`" + " ".join([script, *args]) + "`"


def row(case: str, ours: float, peer: float | None, unit: str, **extra) -> dict:
    """One case: rates of ours and the peer in `unit` (higher is faster)."""
    return {"case": case, "ours": ours, "peer": peer, "unit": unit, **extra}


def peak_rows(result: dict) -> list[dict]:
    """matmul_peak.py: float32 matmul GFLOP/s of XLA:CPU (ours) and PyTorch, a square one and the sampler's head."""
    return [row(r["case"], r["jax_gflops"], r["torch_gflops"], "GFLOP/s") for r in result["rows"]]


def codec_rows(result: dict) -> list[dict]:
    """vqgan_codec.py: encode and decode images/s (and the model FLOPs of one image)."""
    size = f"{result['resolution']} px, batch {result['batch']}"
    return [row(f"{op}, {size}", result[f"{op}_images_per_s"]["jax"], result[f"{op}_images_per_s"]["torch"], "img/s",
                model_flops=result.get("model_flops_per_image", {}).get(op))
            for op in ("encode", "decode")]


def generate_rows(result: dict) -> list[dict]:
    """generate.py: new tokens/s per case, sampler and batch; batch 1 is ahead already (the goal is to keep it)."""
    return [row(f"{r['case']}, {r['new_tokens']} tokens, batch {r['batch']}, {r['sampler']}",
                r["ours_tokens_per_s"], r.get("hf_tokens_per_s"), "tok/s", keep=r["batch"] == 1)
            for r in result["rows"]]


def lm_step_rows(result: dict) -> list[dict]:
    """lm_step.py: forward+backward tokens/s."""
    shape = result["shape"]
    case = (f"forward+backward, {result['batch']} x {result['seq']} tokens, hidden {shape['hidden']}, "
            f"{shape['layers']} layers, vocab {result['vocab']}")
    return [row(case, result["jax_tokens_per_s"], result.get("torch_tokens_per_s"), "tok/s",
                model_flops=result.get("model_flops_per_token"))]


JOBS = (
    Job("matmul_peak", "peak", "matmul_peak.py", (), ("--size", "256", "--batches", "1", "--repeats", "2"),
        "--repeats", None, peak_rows),
    Job("codec_tiny", "codec", "vqgan_codec.py", ("--variant", "tiny", "--batch", "8"),
        ("--variant", "tiny", "--batch", "1", "--steps", "1", "--warmup", "1"), "--steps", 1.5, codec_rows),
    Job("codec_f16_1024", "codec", "vqgan_codec.py", ("--variant", "f16_1024", "--batch", "8"),
        None, "--steps", 1.5, codec_rows),  # a 256 px model: minutes even at batch 1, so not in --smoke
    Job("generate", "generate", "generate.py", ("--preset", "tiny"),
        ("--preset", "tiny", "--batches", "1", "--report-tokens", "4", "--image-tokens", "4",
         "--report-prompt", "8", "--image-prompt", "8", "--cases", "report,image", "--samplers", "greedy"),
        "--repeats", 3.0, generate_rows),
    Job("lm_step", "lm_step", "lm_step.py", (),
        ("--batch", "1", "--seq", "16", "--vocab", "1152", "--steps", "1", "--warmup", "1"),
        "--steps", 1.5, lm_step_rows),
)


def select(only: str | None, smoke: bool) -> list[Job]:
    """The jobs of the --only groups (all when None) that this kind of run includes."""
    groups = GROUPS if only is None else tuple(g.strip() for g in only.split(",") if g.strip())
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise UsageError(f"--only {only!r} names {', '.join(unknown) or 'nothing'}; give a comma-separated subset of "
                         f"{','.join(GROUPS)}")
    return [j for j in JOBS if j.group in groups and (j.smoke_args is not None or not smoke)]
