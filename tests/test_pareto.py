"""Non-dominated masks against a brute-force double loop and moocore; grouped masks; Pareto ranks;
hypervolume against moocore; 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import moocore
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parrot_jax.parallel import make_mesh
from parrot_jax.rl.pareto import (
    grouped_non_dominated_mask,
    hypervolume,
    non_dominated_mask,
    pareto_ranks,
)

mask_jit = jax.jit(non_dominated_mask, static_argnames="block_size")


def brute_force(r: np.ndarray) -> np.ndarray:
    """Parrot's NDSet as written: i survives unless a valid (all finite) j dominates it."""
    ok = np.isfinite(r).all(axis=1)
    out = np.zeros(len(r), bool)
    for i in np.flatnonzero(ok):
        out[i] = not any(ok[j] and np.all(r[j] >= r[i]) and np.any(r[j] > r[i])
                         for j in range(len(r)))
    return out


def moocore_mask(r: np.ndarray) -> np.ndarray:
    ok = np.isfinite(r).all(axis=1)
    out = np.zeros(len(r), bool)
    out[ok] = moocore.is_nondominated(r[ok], maximise=True, keep_weakly=True)
    return out


def _rewards(rng, n, k, kind):
    if kind == "continuous":
        r = rng.standard_normal((n, k))
    elif kind == "tied":  # few levels: many ties and many exact duplicates
        r = rng.integers(0, 3, (n, k)).astype(float)
    else:  # duplicated rows plus NaNs and +/-infs (invalid: +inf would dominate everything)
        r = rng.standard_normal(((n + 1) // 2, k))
        r = np.concatenate([r, r[rng.integers(0, len(r), n - len(r))]])
        bad = rng.random(n) < 0.15
        r[bad, rng.integers(0, k)] = rng.choice([np.nan, np.inf, -np.inf], bad.sum())
    return r.astype(np.float32)


@pytest.mark.parametrize("kind", ["continuous", "tied", "duplicated_nan"])
@pytest.mark.parametrize("n,k", [(1, 2), (7, 1), (64, 4), (200, 6)])
def test_mask_equals_brute_force(kind, n, k):
    r = _rewards(np.random.default_rng(n * 10 + k), n, k, kind)
    expected = brute_force(r.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(mask_jit(r)), expected)
    np.testing.assert_array_equal(np.asarray(mask_jit(r, block_size=16)), expected)


@pytest.mark.parametrize("kind", ["continuous", "tied", "duplicated_nan"])
@pytest.mark.parametrize("n,k", [(4096, 4), (1024, 6), (2048, 2)])
def test_mask_equals_moocore_large(kind, n, k):
    r = _rewards(np.random.default_rng(n + k), n, k, kind)
    got = np.asarray(mask_jit(r, block_size=1024))
    np.testing.assert_array_equal(got, moocore_mask(r))
    assert 0 < got.sum() < n


def test_edge_cases():
    r = np.array([[1, 1], [1, 1], [0, 2], [0, 1], [np.nan, 9], [2, np.nan], [np.inf, 5],
                  [-np.inf, 9]], np.float32)
    # identical rows both kept; [0, 1] dominated by [1, 1] and by [0, 2]; NaN and inf rows never
    # kept and never dominate ([nan, 9], [inf, 5] would otherwise dominate [0, 2], [1, 1])
    np.testing.assert_array_equal(mask_jit(r), [True, True, True, False, False, False, False,
                                                False])
    valid = np.array([False, True, True, True, True, True, True, True])
    np.testing.assert_array_equal(non_dominated_mask(r, valid), [False, True, True, False,
                                                                 False, False, False, False])
    assert not np.asarray(non_dominated_mask(np.full((3, 2), np.nan, np.float32))).any()


def test_grouped_masks():
    rng = np.random.default_rng(3)
    r = _rewards(rng, 96, 3, "tied")
    by_block = np.concatenate([brute_force(r[i:i + 32].astype(np.float64))
                               for i in range(0, 96, 32)])
    np.testing.assert_array_equal(grouped_non_dominated_mask(r.reshape(3, 32, 3)),
                                  by_block.reshape(3, 32))
    # Arbitrary (interleaved, non-contiguous) group ids give the same per-group answer.
    groups = rng.permutation(np.repeat(np.array([7, 2, 5]), 32))
    expected = np.zeros(96, bool)
    for g in (7, 2, 5):
        expected[groups == g] = brute_force(r[groups == g].astype(np.float64))
    np.testing.assert_array_equal(grouped_non_dominated_mask(r, groups), expected)
    np.testing.assert_array_equal(grouped_non_dominated_mask(r, groups, block_size=40), expected)
    with pytest.raises(ValueError, match=r"\[G, N, K\]"):
        grouped_non_dominated_mask(r)


def test_pareto_ranks_peel_fronts():
    rng = np.random.default_rng(4)
    r = _rewards(rng, 150, 3, "duplicated_nan")
    ranks = np.asarray(jax.jit(pareto_ranks)(r))
    ok = np.isfinite(r).all(axis=1)
    assert np.all(ranks[~ok] == -1) and np.all(ranks[ok] >= 0)
    remaining = ok.copy()
    for front in range(ranks.max() + 1):  # each front = non-dominated set of what is left
        idx = np.flatnonzero(remaining)
        top = idx[brute_force(r[idx].astype(np.float64))]
        np.testing.assert_array_equal(np.flatnonzero(ranks == front), top)
        remaining[top] = False
    assert not remaining.any()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_hypervolume_equals_moocore(k):
    rng = np.random.default_rng(k)
    pts = rng.random((40, k))
    ref = np.full(k, 0.1)
    expected = moocore.hypervolume(pts, ref=ref, maximise=True)
    np.testing.assert_allclose(hypervolume(pts, ref), expected, rtol=1e-12)
    # NaN and inf rows are ignored; points below the reference add nothing.
    extra = np.concatenate([pts, [[np.nan] * k], [[np.inf] * k], [[0.05] * k]])
    np.testing.assert_allclose(hypervolume(extra, ref), expected, rtol=1e-12)


def test_hypervolume_analytic():
    assert hypervolume(np.array([[2.0, 3.0]]), np.zeros(2)) == 6.0
    # two boxes [0,2]x[0,1] and [0,1]x[0,2]: union 3
    assert hypervolume(np.array([[2.0, 1.0], [1.0, 2.0]]), np.zeros(2)) == 3.0
    assert hypervolume(np.zeros((0, 3)), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="reference"):
        hypervolume(np.ones((2, 3)), np.zeros(2))


def test_one_vs_eight_devices():
    mesh = make_mesh({"data": -1})
    r = _rewards(np.random.default_rng(8), 256, 4, "duplicated_nan")
    sharded = jax.device_put(r, NamedSharding(mesh, P("data")))
    grouped = jax.jit(lambda x: grouped_non_dominated_mask(x.reshape(4, 64, 4)).reshape(-1))
    np.testing.assert_array_equal(mask_jit(sharded), mask_jit(jnp.asarray(r)))
    np.testing.assert_array_equal(mask_jit(sharded), moocore_mask(r))
    np.testing.assert_array_equal(grouped(sharded), grouped(jnp.asarray(r)))
