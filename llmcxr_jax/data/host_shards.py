"""A process's logical data shards read side by side. The global batch is shard 0's rows, then
shard 1's, ...; process p owns a contiguous block of shards, so the global batches of a run do not
depend on how many processes read them (a 2-host run equals a 1-host run with 2 shards).
"""
from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from llmcxr_jax.errors import UsageError


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
    if num_shards < 1 or num_shards % process_count:
        raise UsageError(f"data.num_shards {num_shards} must be a positive multiple of the {process_count} "
                         "processes; use 0 for one shard per process")
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


class HostIterator:
    """next() concatenates one batch of each owned shard along rows. get_state()/set_state()
    carry every shard's position (bytes, as grain's orbax CheckpointHandler expects)."""

    def __init__(self, iterators: list[Any]):
        if not iterators:
            raise UsageError("a host needs at least one data shard")
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    @property
    def dropped(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for it in self.iterators:
            total.update(it.dropped)
        return total

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if len(states) != len(self.iterators):
            raise UsageError(f"data iterator state holds {len(states)} shards but this host reads "
                             f"{len(self.iterators)}; resume with the same data.num_shards and process count")
        for it, s in zip(self.iterators, states):
            it.set_state(s)

    def start_prefetch(self) -> None:
        for it in self.iterators:
            start = getattr(it, "start_prefetch", None)
            if start is not None:
                start()


def host_iterator(make_pipeline: Callable[[int, int], Any], num_shards: int, process_index: int,
                  process_count: int, num_epochs: int | None = None) -> tuple[HostIterator, list[Any]]:
    """make_pipeline(shard_index, num_shards) -> LmBatches; returns the iterator and the pipelines."""
    pipes = [make_pipeline(s, num_shards) for s in owned_shards(num_shards, process_index, process_count)]
    return HostIterator([p.iterator(num_epochs) for p in pipes]), pipes
