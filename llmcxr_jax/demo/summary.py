"""WORKDIR/summary.md of a finished demo: what each phase made and how long it took, the scores
beside their chance baselines and the paper, a real-vs-generated grid, and the PyTorch check."""
from __future__ import annotations

import os

from llmcxr_jax.demo.phases import PHASES


def _phase_rows(state: dict) -> list[str]:
    rows = ["| phase | what | seconds | result |", "| --- | --- | --- | --- |"]
    for name, what, *_ in PHASES:
        entry = state.get(name, {})
        result = entry.get("result", {})
        short = ", ".join(f"{k}={_short(v)}" for k, v in result.items()
                          if not isinstance(v, (list, dict)) and k not in ("reference", "jax_report", "torch_report"))
        rows.append(f"| {name} | {what} | {entry.get('seconds', 0):.0f} | {short} |")
    return rows


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 40 else "..." + s[-37:]


def write(config, workdir: str, state: dict) -> str:
    total = sum(e["seconds"] for e in state.values())
    check = state["pytorch"]["result"]
    lines = [f"# LLM-CXR demo ({config.name})", "",
             f"Workdir `{os.path.abspath(workdir)}`; {total / 60:.1f} minutes of phases in all "
             "(a rerun skips finished phases).", "", *_phase_rows(state), "", "## Scores", ""]
    metrics_md = os.path.join(workdir, "eval", "metrics.md")
    with open(metrics_md) as f:
        body = f.read().split("\n", 1)[1].strip()  # drop its title
    lines += [body, ""]
    grid = os.path.join("eval", "grid_0.png")
    if os.path.isfile(os.path.join(workdir, grid)):
        lines += ["## report->CXR", "", "Top: the real evaluation image; below: the image the model drew from its "
                  "report (the caption).", "", f"![real vs generated]({grid})", ""]
    same = "the same" if check["same_tokens"] else "DIFFERENT"
    lines += ["## CXR->report, and the export in PyTorch", "",
              f"Image `{check['dicom_id']}`. Reference impression: {check['reference']}", "",
              f"- JAX, greedy: {check['jax_report'] or '(empty)'}",
              f"- transformers (PyTorch) from export/hf, greedy: {check['torch_report'] or '(empty)'}",
              f"- {same} {check['tokens']} tokens; diffusers' decode of the image's codes from export/diffusers "
              f"differs from ours by at most {check['diffusers_decode_max_abs_diff']:.1e}.", "",
              "Generated reports for every evaluation image: eval/reports.csv; all numbers: eval/metrics.json.", ""]
    path = os.path.join(workdir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
