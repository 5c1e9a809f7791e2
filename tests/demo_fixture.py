"""The quick demo, built once per test run (also under pytest-xdist: the first worker builds it under a
file lock in the run's shared temp folder, the others read it), with what its four runs printed.
tests/test_demo.py asserts on those runs; the serve and API tests use its model read-only."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
RUNS = {  # name -> `llmcxr` arguments after the workdir, in the order they run
    "first": [],  # finishes the demo that the partial run stopped after the codes
    "rerun": [],  # skips every phase
    "refused": ["--config.seed=1"],  # another config in the same workdir
}


@dataclasses.dataclass(frozen=True)
class QuickDemo:
    """A finished quick demo: its workdir, the model it trained, and what each run printed."""

    base: Path  # runs' outputs: partial.err, first.out, first.err, rerun.*, refused.*, runs.json
    workdir: str
    ckpt: str  # the stage-2 LM (pipeline.Paths.lm)
    vqgan: str  # the VQ-GAN (pipeline.Paths.vqgan_model)
    partial_phases: tuple[str, ...]  # phases.json's entries after `pipeline.run(..., only=("codes",))`
    exit_codes: dict[str, int]  # cli.main's return value of each run in RUNS

    def out(self, run: str) -> str:
        return (self.base / f"{run}.out").read_text()

    def err(self, run: str) -> str:
        return (self.base / f"{run}.err").read_text()


@contextlib.contextmanager
def _captured(base: Path, name: str):
    """sys.stdout / sys.stderr into BASE/NAME.out / .err (the demo prints through both, as capsys saw it)."""
    with open(base / f"{name}.out", "w") as out, open(base / f"{name}.err", "w") as err, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield


def _build(base: Path) -> None:
    """In this process, with the suite's 8 host devices, as tests/test_demo.py always ran it: stop after
    the codes (as a killed run would), finish with `llmcxr demo --quick`, rerun it, then try another config."""
    from llmcxr_jax import cli, configs
    from llmcxr_jax.demo import pipeline

    work = str(base / "demo")
    with _captured(base, "partial"):
        pipeline.run(configs.load_config(f"{DEMO}:quick"), work, only=("codes",))
    with open(os.path.join(work, "phases.json")) as f:
        partial = sorted(json.load(f))
    codes = {}
    for name, extra in RUNS.items():
        with _captured(base, name):
            codes[name] = cli.main(["demo", "--quick", "--workdir", work, *extra])
    (base / "runs.json").write_text(json.dumps({"partial_phases": partial, "exit_codes": codes}))


def _read(base: Path) -> QuickDemo:
    from llmcxr_jax.demo import pipeline

    runs = json.loads((base / "runs.json").read_text())
    paths = pipeline.Paths(str(base / "demo"))
    return QuickDemo(base, paths.workdir, paths.lm, paths.vqgan_model, tuple(runs["partial_phases"]),
                     runs["exit_codes"])


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> QuickDemo:
    # pytest-xdist's recipe: the workers' basetemps share one parent per run; without xdist, basetemp is
    # this run's own (its parent holds earlier runs, which must not be reused)
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "quick_demo"
    with FileLock(str(root / "quick_demo.lock")):
        if not (base / "runs.json").is_file():  # not built, or a worker failed half way: build afresh
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            _build(base)
    return _read(base)
