"""`python -m benchmarks` (benchmarks/__main__.py): one --smoke run end to end writes a row with numbers for every
benchmark between the markers of a markdown file, leaving the rest of the file as it was; the table marks goals met
and not met and shows a failed benchmark with its last stderr line; the runner exits 1 when one fails."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks import report, suite  # noqa: E402
from llmcxr_jax.errors import UsageError  # noqa: E402

BEFORE = "# Performance\n\nWhat this file holds.\nIts second line.\n\n## Older tables\n\n| a | b |\n| --- | --- |\n"
NUMBER = r"[\d,]+(?:\.\d+)?"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `python -m benchmarks --smoke` into a file that already has a title paragraph and other text."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    out, results = tmp / "performance.md", tmp / "results.json"
    out.write_text(BEFORE)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    # a compilation cache of its own, every compile kept (the second run of the suite compiles nothing), apart
    # from the suite's: entries written while other xdist workers read the same key once aborted a worker
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache", "benchmarks_smoke"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--json", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out.read_text(), json.loads(results.read_text())


def test_smoke_run_writes_a_row_with_numbers_for_every_benchmark(smoke):
    proc, text, results = smoke
    jobs = suite.select(None, smoke=True)
    assert [j.group for j in jobs] == ["peak", "codec", "generate", "lm_step"]
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    before, rest = text.split(report.BEGIN)
    block, after = rest.split(report.END)
    assert before == "# Performance\n\nWhat this file holds.\nIts second line.\n\n"  # after the title paragraph
    assert after == "\n\n## Older tables\n\n| a | b |\n| --- | --- |\n"  # the rest untouched
    assert re.search(r"^Versions: python 3\.\d+\.\d+, jax \S+, jaxlib \S+, flax \S+, torch \S+, transformers \S+, "
                     r"diffusers \S+\.$", block, re.M), block
    assert re.search(r"^Machine: .+, \d+ cores \(\d+ usable by this process\), [\d.]+ GiB memory", block, re.M)
    assert "Command: `python -m benchmarks --smoke --out " in block and re.search(r"Date: \d{4}-\d\d-\d\d ", block)
    table, limits = block.split("What the machine allows: ")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    cases = {"matmul_peak": ["matmul 256 x 256 x 256", "LM head, batch 1: [1, 256] x [256, 51328]"],
             "codec_tiny": ["encode, 64 px, batch 1", "decode, 64 px, batch 1"],
             "generate": ["report, 4 tokens, batch 1, greedy", "image, 7 tokens, batch 1, greedy"],
             "lm_step": ["forward+backward, 1 x 16 tokens, hidden 512, 4 layers, vocab 1152"]}
    assert len(rows) == sum(len(c) for c in cases.values()), rows
    for job in jobs:
        for case in cases[job.name]:
            title = suite.title(job.script, job.command(True, None))
            (line,) = [r for r in rows if r.startswith(f"| {title} | {case} |")]
            unit = {"codec": "img/s", "peak": "GFLOP/s"}.get(job.group, "tok/s")
            goal = {"generate": "keep >= 3x", "peak": "reference"}.get(job.group, ">= 1.5x")
            met = "-" if job.group == "peak" else "(yes|no)"
            assert re.fullmatch(rf"\| .+ \| {NUMBER} {unit} \| {NUMBER} {unit} \| {NUMBER}x \| {goal} \| {met} \|",
                                line), line
    ceiling_rows = [line for line in limits.splitlines() if line.startswith("| `")]  # the codec's two, lm_step's
    assert len(ceiling_rows) == 3 and all(re.fullmatch(rf"\| .+ \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER}x "
                                                       r"\| >= 1.5x \|", line) for line in ceiling_rows), limits
    runs = {r["job"]: r for r in results["runs"]}
    assert set(runs) == set(cases) and all(r["status"] == "ok" for r in runs.values())
    assert results["smoke"] is True and results["versions"]["jax"] and results["machine"]["cores"] >= 1
    for run in runs.values():  # the PyTorch peer ran on as many threads as XLA:CPU
        assert run["result"]["torch_threads"] == report.usable_cpus(), run["job"]
    assert "[4/4] lm_step: ok (" in proc.stderr


def test_replace_block_replaces_the_marked_block_and_nothing_else():
    first, second = (f"{report.BEGIN}\n{word}\n{report.END}" for word in ("first", "second"))
    one = report.replace_block(BEFORE, first)
    assert one == BEFORE.replace("## Older", f"{first}\n\n## Older")
    two = report.replace_block(one, second)
    assert two == one.replace("first", "second")  # replaced, not appended
    # docs/performance.md's shape: no paragraph under the title, a section heading next
    assert report.replace_block("# P\n\n## Sub\n\ntext\n", first) == f"# P\n\n{first}\n\n## Sub\n\ntext\n"
    assert report.replace_block("", first) == f"# Performance\n\n{first}\n"
    with pytest.raises(UsageError, match="keep one of each"):
        report.replace_block(f"{report.BEGIN}\nno end\n", "new")
    with pytest.raises(UsageError, match="keep one of each"):
        report.replace_block(f"{report.END}\n{report.BEGIN}\n", "new")


def test_table_marks_goals_met_and_not_and_failed_benchmarks():
    runs = [
        {"job": "codec_tiny", "script": "vqgan_codec.py", "args": ["--batch", "8"], "status": "ok",
         "result": {"resolution": 64, "batch": 8, "encode_images_per_s": {"jax": 300.0, "torch": 150.0},
                    "decode_images_per_s": {"jax": 120.0, "torch": 100.0}}},
        {"job": "generate", "script": "generate.py", "args": [], "status": "ok",
         "result": {"rows": [{"case": "report", "new_tokens": 128, "batch": 1, "sampler": "top_p",
                              "ours_tokens_per_s": 1234.5, "hf_tokens_per_s": 400.0},
                             {"case": "image", "new_tokens": 259, "batch": 8, "sampler": "greedy",
                              "ours_tokens_per_s": 5.5, "hf_tokens_per_s": 2.0}]}},
        {"job": "lm_step", "script": "lm_step.py", "args": [], "status": "failed",
         "error": "RuntimeError: out of memory | again"},
    ]
    assert report.table(runs).splitlines()[2:] == [
        "| `vqgan_codec.py --batch 8` | encode, 64 px, batch 8 | 300 img/s | 150 img/s | 2.00x | >= 1.5x | yes |",
        "| `vqgan_codec.py --batch 8` | decode, 64 px, batch 8 | 120 img/s | 100 img/s | 1.20x | >= 1.5x | no |",
        "| `generate.py` | report, 128 tokens, batch 1, top_p | 1,234 tok/s | 400 tok/s | 3.09x | keep >= 3x | yes |",
        "| `generate.py` | image, 259 tokens, batch 8, greedy | 5.50 tok/s | 2.00 tok/s | 2.75x | >= 3x | no |",
        "| `lm_step.py` | failed: RuntimeError: out of memory \\| again | - | - | - | >= 1.5x | no |",
    ]


def test_ceilings_divide_xlas_best_matmul_rate_by_the_peers_model_rate():
    """ceiling = XLA's fastest matmul / the peer's model GFLOP/s (rate x model FLOPs per item); cases without
    model FLOPs, and runs without matmul_peak, give no row."""
    peak = {"job": "matmul_peak", "script": "matmul_peak.py", "args": [], "status": "ok",
            "result": {"rows": [{"case": "matmul", "jax_gflops": 300.0, "torch_gflops": 350.0},
                                {"case": "head", "jax_gflops": 20.0, "torch_gflops": 30.0}]}}
    codec = {"job": "codec_tiny", "script": "vqgan_codec.py", "args": [], "status": "ok",
             "result": {"resolution": 64, "batch": 8, "encode_images_per_s": {"jax": 100.0, "torch": 200.0},
                        "decode_images_per_s": {"jax": 50.0, "torch": 40.0},
                        "model_flops_per_image": {"encode": 1e9, "decode": 2.5e9}}}
    lm = {"job": "lm_step", "script": "lm_step.py", "args": [], "status": "ok",
          "result": {"batch": 1, "seq": 8, "vocab": 10, "shape": {"hidden": 4, "layers": 1},
                     "jax_tokens_per_s": 10.0, "torch_tokens_per_s": 20.0}}  # no model FLOPs recorded
    text = report.ceilings([peak, codec, lm])
    assert "300 GFLOP/s in XLA:CPU and 350 in PyTorch" in text
    assert [line for line in text.splitlines() if line.startswith("| `")] == [
        "| `vqgan_codec.py` | encode, 64 px, batch 8 | 1 | 100 | 200 | 1.50x | >= 1.5x |",
        "| `vqgan_codec.py` | decode, 64 px, batch 8 | 2.5 | 125 | 100 | 3.00x | >= 1.5x |"]
    assert report.ceilings([codec, lm]) == ""


def test_a_failing_benchmark_is_a_row_and_the_runner_exits_1(tmp_path, monkeypatch, capsys):
    bad = suite.Job("codec_bad", "codec", "vqgan_codec.py", ("--variant", "no-such-variant"), None, "--steps", 1.5,
                    suite.codec_rows)  # argparse rejects it before JAX is imported
    monkeypatch.setattr(suite, "JOBS", (bad,))
    out = tmp_path / "perf.md"
    assert runner.main(["--only", "codec", "--out", str(out)]) == 1
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| `vqgan_codec.py")]
    assert re.fullmatch(r"\| `vqgan_codec.py --variant no-such-variant` \| failed: .*error: argument --variant: "
                        r"invalid choice: 'no-such-variant'.* \| - \| - \| - \| >= 1.5x \| no \|", row), row
    assert "failed: codec_bad" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--only 'codec,speed' names speed"):
        runner.main(["--only", "codec,speed"])
