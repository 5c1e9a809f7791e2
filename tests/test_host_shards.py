"""Logical data shards: process blocks are contiguous and cover every shard once; the host
iterator concatenates shard rows and round-trips its state."""
import numpy as np
import pytest

from llmcxr_jax.data import host_shards


class Counter:
    def __init__(self, start, rows=2):
        self.n, self.start, self.rows = 0, start, rows
        self.dropped = {"text": start}

    def __next__(self):
        self.n += 1
        return {"x": np.full((self.rows, 3), self.start * 100 + self.n)}

    def get_state(self):
        return {"n": self.n}

    def set_state(self, s):
        self.n = s["n"]


def test_owned_shards_partition_in_order():
    blocks = [list(host_shards.owned_shards(8, p, 4)) for p in range(4)]
    assert blocks == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="multiple"):
        host_shards.owned_shards(6, 0, 4)


def test_host_iterator_concatenates_and_restores():
    it = host_shards.HostIterator([Counter(1), Counter(2)])
    first = next(it)
    assert first["x"][:, 0].tolist() == [101, 101, 201, 201]
    state = it.get_state()
    second = next(it)
    fresh = host_shards.HostIterator([Counter(1), Counter(2)])
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["x"], second["x"])
    assert it.dropped == {"text": 3}
    with pytest.raises(ValueError, match="num_shards"):
        host_shards.HostIterator([Counter(1)]).set_state(state)
