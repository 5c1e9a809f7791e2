"""The sampler's fast paths on a CPU: Gumbel noise bit for bit jax.random.gumbel's (an unrolled threefry), and
the top-p/top-k threshold bisection (row by row on a CPU, all rows at once elsewhere) equal to a brute-force
reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmcxr_jax.infer import sampling as smp
from llmcxr_jax.infer.threefry import gumbel_rows, threefry2x32


@pytest.mark.parametrize("key,counter,want", [
    # Threefry-2x32, 20 rounds: the known-answer vectors of Salmon et al.'s Random123 suite
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_threefry_known_answers(key, counter, want):
    u = lambda v: jnp.asarray(v, jnp.uint32)  # noqa: E731
    got = threefry2x32(u(key[0]), u(key[1]), u(counter[0]), u(counter[1]))
    assert (int(got[0]), int(got[1])) == want


def test_gumbel_rows_are_jax_gumbel_bit_for_bit():
    rows = jax.jit(gumbel_rows, static_argnums=(1, 2, 3))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(3))
    for size in (1, 77, 300):
        whole = np.asarray(jax.vmap(lambda k, n=size: jax.random.gumbel(k, (n,), jnp.float32))(keys))
        np.testing.assert_array_equal(np.asarray(rows(keys, size, 0, size)).view(np.uint32),
                                      whole.view(np.uint32))
        for start, stop in ((0, size // 2), (size // 3, size), (size - 1, size)):
            np.testing.assert_array_equal(np.asarray(rows(keys, size, start, stop)), whole[:, start:stop])
        padded = np.asarray(rows(keys, size, size // 3, size + 40))  # past the row: the caller masks it
        assert padded.shape == (3, size - size // 3 + 40)
        np.testing.assert_array_equal(padded[:, :size - size // 3], whole[:, size // 3:])


def test_other_prng_keys_fall_back_to_jax_gumbel():
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5, impl="rbg"), i))(jnp.arange(2))
    whole = jax.vmap(lambda k: jax.random.gumbel(k, (50,), jnp.float32))(keys)
    got = gumbel_rows(keys, 50, 10, 60)
    np.testing.assert_array_equal(got[:, :40], whole[:, 10:])
    np.testing.assert_array_equal(got[:, 40:], 0.0)
    with pytest.raises(ValueError, match="do not start inside"):
        gumbel_rows(keys, 50, 51, 60)


def _brute_force_threshold(keys: np.ndarray, weights: np.ndarray, budget) -> int:
    """The smallest uint32 t with sum(weights[keys > t]) < budget: the sum only changes at a key, so t is 0
    or one of the keys."""
    for t in sorted({0, *map(int, keys)}):
        if weights[keys > t].sum() < budget:
            return t
    raise AssertionError("the largest key always passes")


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("form", [smp._smallest_passing_cpu, smp._smallest_passing_all_rows], ids=["cpu", "all_rows"])
def test_threshold_bisection_equals_brute_force(integer, form):
    """Both forms of the bisection (a CPU's, row by row on [vocab / 128, 128] tiles with padding; an
    accelerator's, every row at once), over leading dims, with tied keys; dyadic weights, so every order of
    summation gives the same sums."""
    rng = np.random.default_rng(2)
    keys = rng.integers(1, 2 ** 32 - 1, (2, 3, 301), dtype=np.uint32)
    keys[0, 1, :40] = keys[0, 1, 40]  # ties
    weights = (np.ones(keys.shape, np.int32) if integer
               else rng.integers(0, 64, keys.shape).astype(np.float32) / 1024)
    for budget in ((1, 7, 300) if integer else (0.01, 0.5, 0.92 * float(weights.sum(-1).max()))):
        got = np.asarray(form(jnp.asarray(keys), jnp.asarray(weights), budget))
        assert got.shape == (2, 3, 1)
        for i in np.ndindex(2, 3):
            assert int(got[i][0]) == _brute_force_threshold(keys[i], weights[i], budget), (i, budget)
