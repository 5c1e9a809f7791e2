"""Tokenized examples -> fixed-shape LM batches [rows, seq_len], as a checkpointable grain stage. Owns the batch's
fields and dtypes (BATCH_SPEC), the packing policy (greedy first-fit within a batch, examples never split), the
row layout (segment ids, restarting positions, example-id slots) and the iterator state.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmcxr_jax.errors import UsageError

# A batch's [rows, seq_len] arrays, field -> dtype: what the train step reads (and compile-check lowers).
BATCH_SPEC = {
    "input_ids": np.dtype(np.int32),  # token ids; pad_id after the last example of a row
    "targets": np.dtype(np.int32),  # the next token of each position; pad_id where there is none
    "loss_mask": np.dtype(np.float32),  # 1.0 where the target is trained (the response, or every token)
    "segment_ids": np.dtype(np.int32),  # 1, 2, ... per example in its row; 0 = padding
    "positions": np.dtype(np.int32),  # position ids, restarting at 0 with each example
    "modality": np.dtype(np.int8),  # 1 where the target is an image code, 0 for text
}
ROW_LAYOUT_KEYS = ("segment_ids", "positions")  # written by packing; the other fields come from each example
EXAMPLE_KEYS = tuple(k for k in BATCH_SPEC if k not in ROW_LAYOUT_KEYS)  # per-token arrays of one example
PAD_KEYS = ("input_ids", "targets")  # filled with pad_id where no example is (the rest with 0)
# Besides BATCH_SPEC each batch carries "example_ids" [rows, per_row]: each row's example ids, -1 = empty slot.
EXAMPLE_IDS_DTYPE = np.dtype(np.int32)


class PackedRows(grain.IterDataset):
    """Examples -> batches; per_row=1 gives one padded example per row.

    Each parent element is a dict with EXAMPLE_KEYS arrays of its length n, "example_id", "task"
    (an index into task_names) and "dropped" (1 for a too-long example that is only counted).
    """

    def __init__(self, parent, *, rows: int, seq_len: int, per_row: int, pad_id: int, task_names: Sequence[str]):
        super().__init__(parent)
        self._args = (rows, seq_len, per_row, pad_id, tuple(task_names))

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"PackedRows(rows={self._args[0]}, seq_len={self._args[1]}, per_row={self._args[2]})"


class PackedRowsIterator(grain.DatasetIterator):
    """Greedy first-fit within one batch: each example goes to the first row with room (tokens and
    example slots); the first example that fits no row closes the batch and opens the next one.
    The state is the parent's state before that carried-over example, so a restore re-reads it
    and rebuilds exactly the remaining batches. A finite parent ends with a partly filled batch.
    """

    def __init__(self, parent, rows, seq_len, per_row, pad_id, task_names):
        super().__init__(parent)
        self._rows, self._seq_len, self._per_row, self._pad = rows, seq_len, per_row, pad_id
        self._task_names = task_names
        self._pending = self._pending_state = None
        self.dropped: collections.Counter = collections.Counter()  # task -> too-long examples seen

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[list[dict]] = [[] for _ in range(self._rows)]
        used = [0] * self._rows
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    elem = next(self._parent)
                except StopIteration:
                    break
                if elem["dropped"]:
                    self.dropped[self._task_names[int(elem["task"])]] += 1
                    continue
                self._pending, self._pending_state = elem, state
            n = len(self._pending["input_ids"])
            if n > self._seq_len:
                raise UsageError(f"example {self._pending['example_id']} has {n} tokens, more than seq_len "
                                 f"{self._seq_len}; drop it before packing (max_length)")
            fit = [r for r in range(self._rows) if used[r] + n <= self._seq_len and len(rows[r]) < self._per_row]
            if not fit:
                break
            rows[fit[0]].append(self._pending)
            used[fit[0]] += n
            self._pending = None
        if not any(rows):
            raise StopIteration
        return self._assemble(rows)

    def _assemble(self, rows) -> dict[str, np.ndarray]:
        shape = (self._rows, self._seq_len)
        b = {k: np.full(shape, self._pad if k in PAD_KEYS else 0, dt) for k, dt in BATCH_SPEC.items()}
        b["example_ids"] = np.full((self._rows, self._per_row), -1, EXAMPLE_IDS_DTYPE)
        for r, row in enumerate(rows):
            off = 0
            for k, ex in enumerate(row):
                n = len(ex["input_ids"])
                sl = (r, slice(off, off + n))
                for key in EXAMPLE_KEYS:
                    b[key][sl] = ex[key]
                b["segment_ids"][sl] = k + 1
                b["positions"][sl] = np.arange(n)
                b["example_ids"][r, k] = ex["example_id"]
                off += n
        return b

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "dropped": dict(self.dropped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self.dropped = collections.Counter(state["dropped"])
