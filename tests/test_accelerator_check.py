"""benchmarks/accelerator_check.sh end to end on the CPU (--smoke, tiny shapes): every part is in the JSON and
the markdown with real numbers, a part that fails is recorded without stopping the others, and a part that
outruns its time limit in its own process is reported as a timeout."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator_check.sh")
PARTS = ("lm_train_xla", "lm_train_cudnn", "lm_train_torch", "generate", "vqgan")


def _run(out, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is what the check uses
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", SCRIPT, "--smoke", "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accelerator_check.json").read_text()), (out / "accelerator_check.md").read_text()


@pytest.mark.slow  # ~45 s warm: every part compiles in its own run
def test_smoke_run_reports_every_part(tmp_path):
    report, table = _run(tmp_path)
    parts = report["sections"]
    assert tuple(parts) == PARTS and report["smoke"] is True
    assert report["environment"]["versions"]["jax"] and report["total_s"] > 0
    shape = report["shape"]
    tokens = shape["batch"] * shape["seq"]

    ours = parts["lm_train_xla"]
    assert ours["status"] == "ok", ours
    assert ours["attention"] == "xla" and ours["timed_steps"] == shape["steps"]
    assert ours["step_time_s"] == float(np.median(ours["step_times_s"])) > 0
    assert math.isclose(ours["tokens_per_s"], tokens / ours["step_time_s"])
    assert ours["mfu"] is None and ours["peak_flops"] is None  # no known peak for a CPU
    vocab = 509 + 64  # the tiny model's text tokens + image codes
    assert 0 < ours["loss"] < math.log(vocab) + 1, ours["loss"]

    cudnn = parts["lm_train_cudnn"]  # cuDNN attention needs an NVIDIA GPU: recorded, and the run went on
    assert cudnn["status"] == "error" and "cudnn" in cudnn["error"] and "\n" not in cudnn["error"]

    torch_part = parts["lm_train_torch"]
    assert torch_part["status"] == "ok", torch_part
    assert math.isclose(torch_part["tokens_per_s"], tokens / torch_part["step_time_s"])
    assert 0 < torch_part["loss"] < math.log(vocab) + 1

    gen = parts["generate"]
    assert gen["status"] == "ok", gen
    (row,) = gen["rows"]
    assert row["sampler"] == "greedy" and row["ours_tokens"] == row["hf_tokens"] == gen["new_tokens"]
    assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
    assert math.isclose(row["ratio"], row["ours_tokens_per_s"] / row["hf_tokens_per_s"])

    vq = parts["vqgan"]
    assert vq["status"] == "ok", vq
    for what in ("encode_images_per_s", "decode_images_per_s"):
        r = vq[what]
        assert r["jax"] > 0 and r["torch"] > 0 and math.isclose(r["ratio"], r["jax"] / r["torch"])

    assert f"{ours['tokens_per_s']:,.0f} tok/s" in table and f"{torch_part['tokens_per_s']:,.0f} tok/s" in table
    assert "attention=cudnn | error: UsageError" in table
    assert f"{row['ours_tokens_per_s']:,.0f} tok/s" in table
    assert f"{vq['decode_images_per_s']['jax']:,.1f} img/s" in table


def test_a_part_past_its_time_limit_is_a_timeout(tmp_path):
    report, table = _run(tmp_path, "--isolate", "--only", "lm_train_xla", "--budget-scale", "0.01")
    part = report["sections"]["lm_train_xla"]
    assert part["status"] == "timeout" and part["error"].startswith("no result within 1 s"), part
    assert part["seconds"] < 30 and "timeout: no result within 1 s" in table
    assert "===== lm_train_xla" in (tmp_path / "accelerator_check.log").read_text()
