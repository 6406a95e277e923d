"""The run's pictures and TensorBoard events: grid placement and scaling, scatter points where
their rewards put them in the colour their selection says, and event files that TensorBoard's
own reader reads back (scalars, PNG images) without TensorFlow."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from parrot_jax import config as schema
from parrot_jax.training.metrics import MetricsWriter, read_metrics
from parrot_jax.training.tensorboard import TensorBoardWriter
from parrot_jax.training.visualize import (
    OTHER,
    SELECTED,
    image_grid,
    panel_origin,
    pareto_scatter,
    png_bytes,
    reward_pairs,
    scatter_position,
)

ROOT = Path(__file__).resolve().parents[1]


def _read_events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_image_grid_places_pads_and_scales():
    images = np.stack([np.full((2, 3, 3), v, np.float32) for v in (0.0, 0.5, 1.0)])
    images[1, 0, 0] = (1.0, 0.0, 0.0)
    grid = image_grid(images, columns=2, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 2 + 1, 2 * 3 + 1, 3)
    np.testing.assert_array_equal(grid[0:2, 0:3], 0)
    np.testing.assert_array_equal(grid[0, 4], (255, 0, 0))  # image 1's corner, after the pad
    np.testing.assert_array_equal(grid[1, 5], 128)
    np.testing.assert_array_equal(grid[3:5, 0:3], 255)  # image 2 starts row 2
    np.testing.assert_array_equal(grid[2, :], 255)  # the pad row
    np.testing.assert_array_equal(grid[3:5, 4:7], 255)  # the empty cell stays white
    big = image_grid(images, columns=3, cell=6, pad=0)  # 2 x 3 -> 4 x 6, nearest neighbour
    assert big.shape == (4, 18, 3)
    np.testing.assert_array_equal(big[0:2, 6:8], [[(255, 0, 0)] * 2] * 2)
    np.testing.assert_array_equal(big[2, 6], 128)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        image_grid(images[..., :1], columns=2)


def _colour_at(picture, x, y):
    return tuple(int(v) for v in picture[y, x])


@pytest.mark.parametrize("num_rewards", [2, 4])
def test_scatter_draws_each_point_where_its_rewards_put_it(num_rewards):
    rng = np.random.default_rng(0)
    rewards = rng.uniform(-1, 3, (12, num_rewards))
    # Two extreme points: the best in every reward (selected) and the worst (not selected).
    rewards[0], rewards[1] = rewards.max(axis=0) + 1, rewards.min(axis=0) - 1
    rewards[2] = np.nan  # left out
    selected = np.zeros(12, bool)
    selected[0] = True
    names = [f"r{k}" for k in range(num_rewards)]
    picture = pareto_scatter(rewards, selected, names, title="t")
    swapped = pareto_scatter(rewards, ~selected, names)
    low, high = np.nanmin(rewards, axis=0), np.nanmax(rewards, axis=0)
    pairs = reward_pairs(num_rewards)
    assert len(pairs) == num_rewards * (num_rewards - 1) // 2
    for index, (i, j) in enumerate(pairs):
        x0, y0 = panel_origin(index, len(pairs))
        for row, colour in ((0, SELECTED), (1, OTHER)):
            x = scatter_position(rewards[row, i], low[i], high[i], x0)
            y = scatter_position(rewards[row, j], low[j], high[j], y0, flip=True)
            assert _colour_at(picture, x, y) == colour
            assert _colour_at(swapped, x, y) == (OTHER if colour == SELECTED else SELECTED)
        # The best point is top right of its panel, the worst bottom left.
        best = (scatter_position(high[i], low[i], high[i], x0),
                scatter_position(high[j], low[j], high[j], y0, flip=True))
        assert best[0] > x0 + 150 and best[1] < y0 + 50
    assert np.sum(np.all(picture == SELECTED, axis=-1)) > 0
    with pytest.raises(ValueError, match="3 reward names for 2"):
        pareto_scatter(rewards[:, :2], selected, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 rewards"):
        pareto_scatter(rewards[:, :1], selected, ["a"])


def test_tensorboard_events_read_back(tmp_path):
    writer = TensorBoardWriter(tmp_path / "tb")
    writer.scalars(1, {"reward/a/mean": 0.25, "t2i/loss": -1.5})
    writer.scalars(3, {"reward/a/mean": 0.75})
    picture = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    writer.image(3, "eval/grid", picture)
    with pytest.raises(TypeError, match="'bad'"):
        writer.scalars(4, {"bad": "x"})
    with pytest.raises(ValueError, match="uint8"):
        writer.image(4, "eval/grid", picture.astype(np.float32))
    writer.close()
    events = _read_events(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("reward/a/mean")] == [(1, 0.25), (3, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("t2i/loss")] == [(1, -1.5)]
    (image,) = events.Images("eval/grid")
    assert (image.step, image.height, image.width) == (3, 5, 7)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                  picture)
    assert png_bytes(picture) == image.encoded_image_string


def test_metrics_writer_mirrors_records_to_tensorboard(tmp_path):
    tensorboard = TensorBoardWriter(tmp_path / "tb")
    writer = MetricsWriter(tmp_path, tensorboard)
    writer.add(1, {"t2i/loss": np.float32(1.0), "reward/a/mean": np.float32(2.0)})
    writer.add(2, {"t2i/loss": np.float32(3.0), "reward/a/mean": np.float32(4.0)})
    writer.flush({"pareto/hypervolume": 0.5})
    tensorboard.close()
    (record,) = read_metrics(tmp_path)
    events = _read_events(tmp_path / "tb")
    assert sorted(events.Tags()["scalars"]) == sorted(k for k in record if k != "step")
    for key, value in record.items():
        if key != "step":
            assert [(e.step, e.value) for e in events.Scalars(key)] == [(2, value)], key
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["t2i/loss"] == 2.0


def test_eval_fields_are_checked():
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    schema.check(config)
    for bad in (("a", "b", "c"), (), ("a", " ")):  # more than num_groups=2, none, a blank one
        config.eval_prompts = bad
        with pytest.raises(ValueError, match=r"config\.eval_prompts"):
            schema.check(config)
    config = module.get_config("smoke")
    config.eval_every = 0
    with pytest.raises(ValueError, match=r"config\.eval_every=0"):
        schema.check(config)
