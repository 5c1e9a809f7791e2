"""Training records: the run's config.json, metrics.jsonl lines with rate and ETA, PNG grids; in a local
workdir or a gs:// one (llmcxr_jax.storage)."""
from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from llmcxr_jax import storage
from llmcxr_jax.errors import UsageError


def claim_workdir(workdir: str, config, must_match: dict[str, str]) -> None:
    """A workdir belongs to one run: write config.json on first use; on resume, every
    `must_match` entry ("section" or "section.key" -> what to call it) must equal the stored run's."""
    path = storage.path(workdir) / "config.json"
    now = json.loads(config.to_json_best_effort())
    if path.is_file():
        before = json.loads(path.read_text())
        for key, what in must_match.items():
            old, new = before, now
            for part in key.split("."):
                old, new = (old or {}).get(part), (new or {}).get(part)
            if old != new:
                raise UsageError(f"{workdir} holds a run with a different {what}; give a new --workdir")
    elif jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2))


class MetricsLog:
    """Appends one JSON line per log step (process 0 only) and prints a short progress line."""

    def __init__(self, workdir: str, total_steps: int, name: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, name)
        self._file = storage.AppendOnlyFile(self.path)
        self.total = total_steps
        self.t0 = time.time()
        self.first_step: int | None = None

    def write(self, step: int, values: dict[str, Any], echo: bool = True) -> None:
        if jax.process_index() != 0:
            return
        if self.first_step is None or step <= self.first_step:
            self.first_step, self.t0 = step, time.time()
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.append(json.dumps(record) + "\n")
        if echo:
            done = step - self.first_step
            rate = done / max(time.time() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            shown = " ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "step")
            print(f"step {step}/{self.total} {rate:.2f} steps/s eta {eta:.0f}s {shown}", file=sys.stderr, flush=True)


def read_metrics(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines() if line.strip()]


def _plain(v):
    v = np.asarray(jax.device_get(v))
    return v.item() if v.ndim == 0 else v.tolist()


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def grid_pixels(rows: list[np.ndarray]) -> np.ndarray:
    """rows: equal-shaped [n, H, W, C] arrays in [-1, 1] -> one RGB uint8 image [rows * H, n * W, 3], a row each."""
    tiles = []
    for row in rows:
        row = np.clip((np.asarray(row, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
        if row.shape[-1] == 1:
            row = np.repeat(row, 3, axis=-1)
        tiles.append(np.concatenate(list(row), axis=1))
    return np.concatenate(tiles, axis=0)


def save_image_grid(path: str, rows: list[np.ndarray]) -> None:
    """rows: equal-shaped [n, H, W, C] arrays in [-1, 1] -> one PNG, one row each."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(grid_pixels(rows)).save(png, format="PNG")
    out = storage.path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png.getvalue())
