"""TensorBoard logs of one run through tensorboardX (its record framing, protos and summary builders): scalars,
image grids, markdown text and hparams, written by process 0 alone, local or gs:// (llmcxr_jax.storage). Every
trainer and `evaluate` logs through `Board`.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from llmcxr_jax import storage
from llmcxr_jax.train.metrics import grid_pixels

# A bucket object cannot be appended to: a gs:// event file is re-uploaded whole at every write, so past this many
# bytes the board starts a new file (TensorBoard reads a directory's event files in name order as one run).
ROTATE_BYTES = 8 << 20
_SEQUENCE = itertools.count()  # orders the files of one process that open within the same second


class Board:
    """The event files of one run under `logdir`; what a call writes is on disk (or in the bucket) when it returns.

    tensorboardX's SummaryWriter queues events for a background thread and flushes on a timer; this writes each
    event through tensorboardX's RecordWriter synchronously, so a preempted run loses nothing it logged and a
    gs:// copy can follow every write. A gs:// logdir is written to a local staging file, uploaded after each call.
    In processes other than 0 every method does nothing.

    purge_from: a resumed run's first new step; TensorBoard hides the events an earlier attempt logged from that
    step on (a SessionLog START, as tensorboardX's purge_step), so no step shows twice.
    """

    def __init__(self, logdir: str, *, purge_from: int | None = None):
        self.logdir = logdir
        self.enabled = jax.process_index() == 0
        self.path: str | None = None  # the event file now written (in logdir)
        if not self.enabled:
            return
        _import_tensorboardx()
        self._remote = storage.is_remote(logdir)
        if self._remote:
            self._local = tempfile.mkdtemp(prefix="llmcxr-tensorboard-")
        else:
            self._local = str(storage.path(logdir))
            os.makedirs(self._local, exist_ok=True)
        self._open()
        if purge_from:
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self._write([Event(step=int(purge_from), session_log=SessionLog(status=SessionLog.START))])

    # ---------------------------------------------------------------- what runs log

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Every 0-d numeric value of `values` under its key; arrays and strings are left out."""
        if not self.enabled:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        # Summary.Value directly: tensorboardX.summary.scalar logs a warning for every NaN (an AUROC without positives)
        kept = [Summary.Value(tag=k, simple_value=float(np.asarray(v))) for k, v in values.items() if _is_number(v)]
        if kept:
            self._summary(step, Summary(value=kept))

    def image(self, tag: str, step: int, rows: Sequence[np.ndarray]) -> None:
        """rows: equal-shaped [n, H, W, C] arrays in [-1, 1] -> one grid image (a row each, as the PNG grids)."""
        if not self.enabled:
            return
        from tensorboardX import summary

        self._summary(step, summary.image(tag, grid_pixels(list(rows)), dataformats="HWC"))

    def text(self, tag: str, step: int, markdown: str) -> None:
        """Markdown text, shown by TensorBoard's Text tab (as tag + "/text_summary", tensorboardX's naming)."""
        if not self.enabled:
            return
        from tensorboardX import summary

        self._summary(step, summary.text(tag, markdown))

    def hparams(self, values: Mapping[str, Any], metrics: Sequence[str]) -> None:
        """The run's settings (flatten() them first) for the HParams tab, beside the scalar tags `metrics` it
        compares runs by. Values other than bool / int / float / str are written as their repr."""
        if not self.enabled:
            return
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event

        plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}
        plain = {k: v if isinstance(v, bool | int | float | str) else repr(v) for k, v in plain.items()}
        experiment, session_start, _ = summary.hparams(plain, {m: 0.0 for m in metrics})
        self._write([Event(step=0, summary=experiment), Event(step=0, summary=session_start)])

    # ---------------------------------------------------------------- files

    def close(self) -> None:
        if not self.enabled or self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if self._remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        """A new event file, its version record first (uploaded with the first write)."""
        from tensorboardX import RecordWriter
        from tensorboardX.proto.event_pb2 import Event

        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_SEQUENCE):04d}")
        self._name = name
        self.path = os.path.join(self.logdir, name)
        self._writer = RecordWriter(os.path.join(self._local, name))
        self._size = 0
        self._append(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._writer.flush()

    def _summary(self, step: int, summary) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._write([Event(step=int(step), summary=summary)])

    def _append(self, event) -> None:
        record = event.SerializeToString()
        self._writer.write(record)
        self._size += len(record) + 16  # the framing: length, its CRC, the record's CRC

    def _write(self, events: list) -> None:
        if self._remote and self._size > ROTATE_BYTES:  # the full object stays as last uploaded
            self._writer.close()
            self._open()
        for event in events:
            event.wall_time = time.time()
            self._append(event)
        self._writer.flush()
        if self._remote:
            self._upload()

    def _upload(self) -> None:
        with open(os.path.join(self._local, self._name), "rb") as f:
            storage.path(self.path).write_bytes(f.read())


def _import_tensorboardx() -> None:
    """Import tensorboardX without PyTorch: its writer module tries `import torch` (seconds, and CUDA libraries on a
    GPU host) only to accept torch tensors, and a Board hands it numpy. Blocking that one import takes
    tensorboardX's own fallback (it catches the ImportError); a process that already holds torch keeps it."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry stands
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


def _is_number(v) -> bool:
    a = np.asarray(v)
    return a.ndim == 0 and (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a run config's to_dict(), evaluate's options) -> {"train.learning_rate": 1e-4, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def numeric_leaves(tree: Mapping[str, Any], prefix: str = "", skip: Sequence[str] = ()) -> dict[str, float]:
    """The numbers of a nested results dict as {"report/labels/f1_micro": 0.4, ...}; bools, strings,
    lists and the subtrees named in `skip` are left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_leaves(value, f"{name}/", skip))
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_):
            out[name] = float(value)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table for TensorBoard's Text tab; cells on one line, their pipes escaped."""
    def cell(v) -> str:
        return " ".join(str(v).split()).replace("|", "\\|") or " "

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
