"""train.profile_steps = "A:B": a jax.profiler trace of train steps A..B-1 (half-open, as a Python slice; steps
numbered as metrics.jsonl numbers them, the first step of a run is 1) written under WORKDIR/profile in the
layout TensorBoard's profile plugin reads (plugins/profile/<run>/<host>.xplane.pb). Process 0 only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Any

import jax

from llmcxr_jax import storage
from llmcxr_jax.errors import UsageError

PROFILE_DIR = "profile"  # under the workdir
STEP_NAME = "train"  # the jax.profiler.StepTraceAnnotation of each traced step (TensorBoard's step marker)


@dataclasses.dataclass(frozen=True)
class StepRange:
    """Steps first..stop-1 (1-based step numbers, stop excluded)."""

    first: int
    stop: int


def parse_profile_steps(spec: str, total_steps: int) -> StepRange | None:
    """train.profile_steps -> the steps to trace; "" -> None (no trace). A bad spec is a one-line UsageError."""
    spec = str(spec).strip()
    if not spec:
        return None
    first, sep, stop = spec.partition(":")
    try:
        steps = StepRange(int(first), int(stop))
    except ValueError:
        steps = None
    if not sep or steps is None or not 1 <= steps.first < steps.stop:
        raise UsageError(f"train.profile_steps {spec!r} is not A:B with 1 <= A < B (traces steps A..B-1, e.g. "
                         "'10:13' traces steps 10, 11 and 12); set it to '' for no trace")
    if steps.first > total_steps:
        raise UsageError(f"train.profile_steps {spec!r} starts after the last step (train.steps {total_steps}); "
                         "give an A <= train.steps")
    return steps


class StepProfiler:
    """Starts a trace just before step `first` (its batch read, then its dispatch) and stops it once step
    stop-1's outputs are ready, so the trace holds the device work of every traced step, not only its dispatch.
    On process 0 only: every process runs the same SPMD program, and one host's trace shows its devices'
    timeline. A gs:// workdir is traced into a local folder first and copied to WORKDIR/profile when the trace
    stops, so the trace does not depend on the filesystems the installed jaxlib was built with."""

    def __init__(self, steps: StepRange | None, workdir: str, enabled: bool | None = None):
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self.steps = steps if enabled else None
        self.target = os.path.join(os.fspath(workdir), PROFILE_DIR)
        self._staging: str | None = None
        self.active = False
        self.done = False

    @classmethod
    def from_config(cls, train_config, workdir: str) -> StepProfiler:
        return cls(parse_profile_steps(train_config.profile_steps, int(train_config.steps)), workdir)

    def traces(self, step: int) -> bool:
        """Whether `step` (about to run, or just finished) is inside the traced range."""
        return self.steps is not None and self.steps.first <= step < self.steps.stop

    def before_step(self, step: int) -> None:
        """Call before reading `step`'s batch. A run resumed inside the range starts the trace at its first step."""
        if self.active or self.done or not self.traces(step):
            return
        if storage.is_remote(self.target):
            self._staging = tempfile.mkdtemp(prefix="llmcxr_profile_")
            log_dir = self._staging
        else:
            log_dir = str(storage.path(self.target))
            os.makedirs(log_dir, exist_ok=True)
        jax.profiler.start_trace(log_dir)
        self.active = True

    def annotate(self, step: int):
        """The step's TensorBoard step marker while tracing; a no-op context otherwise."""
        if self.active:
            return jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)
        return contextlib.nullcontext()

    def after_step(self, step: int, outputs: Any, last: bool = False) -> None:
        """Call once `step` is dispatched, with its outputs; `last`: the run stops after it. At the last traced
        step (or the run's last), wait for the outputs and stop the trace."""
        if self.active and (last or step >= self.steps.stop - 1):
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        """Wait for `outputs` (if any), end the trace and put its files under WORKDIR/profile. Idempotent."""
        if not self.active:
            return
        try:
            if outputs is not None:
                jax.block_until_ready(outputs)
        finally:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            if self._staging is not None:
                copy_tree(self._staging, self.target)
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None


def copy_tree(local_dir: str, target: str) -> list[str]:
    """Copy every file under local_dir to the same relative path under `target` (local or gs://); the paths written."""
    out = []
    root = storage.path(target)
    for folder, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), local_dir)
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(folder, name), "rb") as f:
                dest.write_bytes(f.read())
            out.append(str(dest))
    return out

