"""Advantage modes against hand-computed values; the stat tracker against DDPO's dict-of-deques
semantics; 1 vs 8 devices."""

import collections
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parrot_jax.parallel import make_mesh
from parrot_jax.rl.advantages import AdvantageConfig, compute_advantages, group_advantages
from parrot_jax.rl.stat_tracker import init_stat_tracker, update_and_lookup

# One group of 4 samples, K = 2 rewards, identifier k = 1 (the second column).
R = np.array([[1.0, 4.0],   # non-dominated
              [2.0, 2.0],   # non-dominated
              [0.5, 1.0],   # dominated by rows 0 and 1
              [3.0, 0.0]],  # non-dominated
             np.float32)
K1 = np.array([1, 1, 1, 1])
SELECTED = np.array([True, True, False, True])


def _adv(config, rewards=R, ids=K1, group_size=4, **kw):
    adv, tracker = compute_advantages(rewards, ids, config, group_size=group_size, **kw)
    return np.asarray(adv.advantages), adv, tracker


def test_paper_mode_is_eq4():
    a, adv, _ = _adv(AdvantageConfig(mode="paper", adv_clip=None))
    # A = r_k * n / |P| on P: mean over the n samples of the group = (1/|P|) sum_P r_k
    np.testing.assert_allclose(a, [4.0 * 4 / 3, 2.0 * 4 / 3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(adv.selected, SELECTED)
    np.testing.assert_allclose(a.mean(), (4.0 + 2.0 + 0.0) / 3, rtol=1e-6)
    clipped, _, _ = _adv(AdvantageConfig(mode="paper", adv_clip=2.0))
    np.testing.assert_allclose(clipped, [2.0, 2.0, 0.0, 0.0])


def test_normalized_mode_normalises_then_zeroes():
    a, _, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None))
    r = R[:, 1]
    z = (r - r.mean()) / (r.std() + 1e-6)  # over all 4, dominated included
    np.testing.assert_allclose(a, np.where(SELECTED, z, 0.0), rtol=1e-5)
    assert a[3] < 0  # selected but below the group mean: pushed down, not up
    # zero-then-normalise would give the dominated row a non-zero advantage; we never do
    assert a[2] == 0.0


def test_identifier_picks_the_column_and_groups_are_independent():
    rewards = np.concatenate([R, R[:, ::-1]])  # group 2: columns swapped, identifier k = 0
    ids = np.array([1] * 4 + [0] * 4)
    a, adv, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None), rewards, ids)
    np.testing.assert_allclose(a[:4], a[4:], rtol=1e-6)
    np.testing.assert_array_equal(adv.selected, np.tile(SELECTED, 2))
    # Whole-batch selection: the same rows survive here (the groups are mirror images).
    a_b, adv_b, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None, selection="batch",
                                         stats="batch"), rewards, ids)
    v = np.concatenate([R[:, 1], R[:, 1]])
    z = (v - v.mean()) / (v.std() + 1e-6)
    sel = np.asarray(adv_b.selected)
    np.testing.assert_allclose(a_b, np.where(sel, z, 0.0), rtol=1e-5)


def test_baselines_and_no_pareto():
    ws, adv, _ = _adv(AdvantageConfig(mode="weighted_sum", weights=(0.7, 0.3), adv_clip=None))
    s = R @ np.array([0.7, 0.3])
    np.testing.assert_allclose(ws, (s - s.mean()) / (s.std() + 1e-6), rtol=1e-5)
    assert adv.selected.all()  # no Pareto filter
    single, _, _ = _adv(AdvantageConfig(mode="single", reward_index=0, adv_clip=None), ids=None)
    r = R[:, 0]
    np.testing.assert_allclose(single, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5)
    no_pareto, _, _ = _adv(AdvantageConfig(mode="normalized", pareto=False, adv_clip=None))
    r = R[:, 1]
    np.testing.assert_allclose(no_pareto, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5)
    clipped, _, _ = _adv(AdvantageConfig(mode="normalized", pareto=False, adv_clip=0.5))
    np.testing.assert_allclose(clipped, np.clip(no_pareto, -0.5, 0.5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_excluded(bad):
    """NaN, +inf and -inf alike: out of the selection, every statistic and the PEN's weights,
    in every mode; every advantage stays finite."""
    rewards = R.copy()
    rewards[0, 1] = bad  # the row that would dominate (+inf) or be dominated (-inf)
    for config in (AdvantageConfig(mode="paper"), AdvantageConfig(mode="normalized"),
                   AdvantageConfig(mode="weighted_sum", weights=(0.5, 0.5))):
        a, adv, _ = _adv(config, rewards)
        assert np.isfinite(a).all() and a[0] == 0.0, config
        np.testing.assert_array_equal(adv.valid, [False, True, True, True])
        assert not adv.selected[0]
        for mode in ("raw", "normalized"):
            pen = group_advantages(rewards, K1, adv.selected, config, group_size=4, mode=mode)
            assert np.isfinite(np.asarray(pen)).all(), (config, mode)
    # normalized: statistics over the valid rows 1-3 only (column 1: 2, 1, 0); row 2 stays
    # dominated by row 1, rows 1 and 3 are selected.
    a, _, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None), rewards)
    z = (R[1:, 1] - R[1:, 1].mean()) / (R[1:, 1].std() + 1e-6)
    np.testing.assert_allclose(a, [0.0, z[0], 0.0, z[2]], rtol=1e-5)


def test_nan_rows_are_excluded():
    rewards = R.copy()
    rewards[2, 0] = np.nan  # the dominated row; the others' statistics must ignore it
    a, adv, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None), rewards)
    r = R[[0, 1, 3], 1]
    z = (r - r.mean()) / (r.std() + 1e-6)
    np.testing.assert_allclose(a, [z[0], z[1], 0.0, z[2]], rtol=1e-5)
    np.testing.assert_array_equal(adv.valid, [True, True, False, True])
    rewards[0, 1] = np.nan  # a NaN in the non-dominated row: never selected, never dominating
    _, adv, _ = _adv(AdvantageConfig(mode="paper"), rewards)
    np.testing.assert_array_equal(adv.selected, [False, True, False, True])


def test_group_advantages_raw_and_normalized():
    """The PEN's per-group weight against a loop over groups: the mean of r_k over the group's
    selected, valid rows; 'normalized' z-scores each column over the batch's valid rows first."""
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(12, 3)).astype(np.float32) * [1.0, 10.0, 0.1] + [0.0, 15.0, 0.3]
    rewards[4] = np.nan  # an invalid row: out of every statistic and every mean
    ids = np.repeat([0, 1, 2], 4)
    selected = rng.random(12) < 0.6
    selected[8:12] = False  # a group with nothing selected gets 0
    config = AdvantageConfig(mode="paper")
    ok = ~np.isnan(rewards).any(axis=1)
    z = (rewards - rewards[ok].mean(0)) / (rewards[ok].std(0) + config.eps)
    for mode, table in (("raw", rewards), ("normalized", z)):
        want = []
        for g in range(3):
            rows = [i for i in range(4 * g, 4 * g + 4) if selected[i] and ok[i]]
            want.append(np.mean([table[i, ids[i]] for i in rows]) if rows else 0.0)
        got = group_advantages(rewards, ids, selected, config, group_size=4, mode=mode)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # scale-free: multiplying a reward column by 100 changes raw weights, not normalized ones
    scaled = rewards * [1.0, 100.0, 1.0]
    for mode, same in (("raw", False), ("normalized", True)):
        a = group_advantages(rewards, ids, selected, config, group_size=4, mode=mode)
        b = group_advantages(scaled, ids, selected, config, group_size=4, mode=mode)
        assert np.allclose(a, b, rtol=1e-4) == same, mode
    ws = AdvantageConfig(mode="weighted_sum", weights=(0.5, 0.25, 0.25))
    got = group_advantages(rewards, None, np.ones(12, bool), ws, group_size=4, mode="normalized")
    want = [np.mean([z[i] @ [0.5, 0.25, 0.25] for i in range(4 * g, 4 * g + 4) if ok[i]])
            for g in range(3)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="PEN advantage mode 'z'"):
        group_advantages(rewards, ids, selected, config, group_size=4, mode="z")


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        AdvantageConfig(mode="ppo")
    with pytest.raises(ValueError, match="weights"):
        _adv(AdvantageConfig(mode="weighted_sum", weights=(1.0,)))
    with pytest.raises(ValueError, match="groups of 3"):
        _adv(AdvantageConfig(), group_size=3)
    with pytest.raises(ValueError, match="tracker"):
        _adv(AdvantageConfig(stats="tracker"))


class DequeTracker:
    """DDPO's per-prompt statistics: push this batch, then mean / std of the last B rewards."""

    def __init__(self, buffer_size):
        self.stats = collections.defaultdict(lambda: collections.deque(maxlen=buffer_size))

    def update(self, keys, rewards):
        for key, r in zip(keys, rewards):
            self.stats[key].append(r)
        return [(np.mean(self.stats[k]), np.std(self.stats[k]), len(self.stats[k]))
                for k in keys]


def test_tracker_matches_deques():
    rng = np.random.default_rng(0)
    tracker, reference = init_stat_tracker(capacity=64, buffer_size=5), DequeTracker(5)
    update = jax.jit(update_and_lookup)
    for _ in range(6):  # batches with repeated keys, some keys more than buffer_size times
        keys = rng.integers(0, 20, 12)
        rewards = rng.standard_normal(12).astype(np.float32)
        tracker, mean, std, count = update(tracker, keys, rewards, np.ones(12, bool))
        expected = np.array(reference.update(keys, rewards))
        np.testing.assert_allclose(mean, expected[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, expected[:, 1], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(count, expected[:, 2])


def test_tracker_collisions_and_invalid_rows():
    tracker = init_stat_tracker(capacity=4, buffer_size=3)
    # keys 1 and 5 share slot 1: in one batch the larger key wins; the other is not served
    tracker, mean, _, count = update_and_lookup(tracker, np.array([1, 5, 5, 2]),
                                                np.array([9.0, 1.0, 3.0, 4.0], np.float32),
                                                np.array([True, True, True, False]))
    np.testing.assert_array_equal(count, [0, 2, 2, 0])
    np.testing.assert_allclose(mean[1:3], [2.0, 2.0])
    # key 1 later evicts key 5: its history starts afresh
    tracker, mean, _, count = update_and_lookup(tracker, np.array([1]),
                                                np.array([7.0], np.float32), np.array([True]))
    np.testing.assert_array_equal(count, [1])
    np.testing.assert_allclose(mean, [7.0])


def test_tracker_mode_uses_prompt_stats_after_min_count():
    config = AdvantageConfig(mode="normalized", stats="tracker", min_count=6, adv_clip=None)
    tracker = init_stat_tracker(capacity=16, buffer_size=8)
    prompts = np.array([3, 3, 3, 3])
    first, _, tracker = _adv(config, 2 * R + 1, tracker=tracker, prompt_ids=prompts)
    group, _, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None), 2 * R + 1)
    np.testing.assert_allclose(first, group, rtol=1e-6)  # 4 stored < min_count: group stats
    a, _, tracker = _adv(config, tracker=tracker, prompt_ids=prompts)  # 8 stored: prompt stats
    history = np.concatenate([2 * R[:, 1] + 1, R[:, 1]])
    z = (R[:, 1] - history.mean()) / (history.std() + 1e-6)
    np.testing.assert_allclose(a, np.where(SELECTED, z, 0.0), rtol=1e-5)
    # the same prompt under another identifier is a different key: back to group statistics
    a_k0, _, _ = _adv(config, ids=np.zeros(4, int), tracker=tracker, prompt_ids=prompts)
    a_group, _, _ = _adv(AdvantageConfig(mode="normalized", adv_clip=None), ids=np.zeros(4, int))
    np.testing.assert_allclose(a_k0, a_group, rtol=1e-6)


@pytest.mark.parametrize("mode,stats", [("paper", "group"), ("normalized", "group"),
                                        ("normalized", "tracker"), ("weighted_sum", "batch")])
def test_one_vs_eight_devices(mode, stats):
    mesh = make_mesh({"data": -1})
    rng = np.random.default_rng(1)
    rewards = rng.standard_normal((64, 4)).astype(np.float32)
    rewards[5, 2] = np.nan
    ids = np.repeat(np.arange(8) % 4, 8)
    prompts = np.repeat(np.arange(8) // 2, 8)
    config = AdvantageConfig(mode=mode, stats=stats, min_count=4)
    fn = jax.jit(functools.partial(compute_advantages, config=config, group_size=8))
    tracker = init_stat_tracker(capacity=32, buffer_size=16)
    one, t_one = fn(rewards, ids, tracker=tracker, prompt_ids=prompts)
    data = NamedSharding(mesh, P("data"))
    put = functools.partial(jax.device_put, device=data)
    eight, t_eight = fn(put(rewards), put(ids), tracker=tracker, prompt_ids=put(prompts))
    for x, y in zip(jax.tree.leaves((one, t_one)), jax.tree.leaves((eight, t_eight))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert np.asarray(one.selected).sum() > 0
