"""Parrot's T2I update teaches the shipped toy UNet what a reward identifier asks for.

Two synthetic rewards that conflict exactly, r1 = mean brightness and r2 = -r1, replace the
toy heads in the real training loop (``setup`` + ``parrot_iteration``; PEN frozen): groups
conditioned on "<reward 1>, ..." are pushed toward bright images, groups on "<reward 2>, ..."
toward dark ones, and every sample is non-dominated. After 24 iterations (4 groups x 8 images,
10 DDIM steps, T2I lr 3e-3), the same prompts and noise give brighter images under
"<reward 1>" than under "<reward 2>"; with the rewards swapped, darker. This checks the whole
identifier path: the prefix reaches the UNet's context, each group's advantage uses its own
identifier's reward, and the cross-attention update can make the two identifiers differ.

Measured when written: the mean brightness (in [0, 1]) under <reward 1> minus under
<reward 2> moves from +0.002 by +0.102, and by -0.164 with the rewards swapped. Both runs also
drift in overall brightness, alike under both identifiers, which is why the test compares the
identifiers rather than each one's own change. With the identifier prefix left out of the
training text, the same training moves the difference by only +0.030 / -0.019 (the update
still changes how the UNet responds to the unseen identifier tokens, in the reward's
direction, to first order); with every group scored by <reward 1>'s reward, by -0.047 /
+0.044. The threshold, 0.06, lies between.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax.analysis import table
from parrot_jax.expansion.identifiers import identifier_prefix, tokenize_conditioning
from parrot_jax.rewards import HostReward, RewardSet
from parrot_jax.training import loop

ITERATIONS = 24
PROBES = 16  # RL prompts the identifiers are compared on, 8 images each


class Brightness(HostReward):
    """``sign`` x the mean brightness of each image (a host reward of the real ``RewardSet``)."""

    def __init__(self, name: str, sign: float):
        super().__init__(workers=1)
        self.name, self.sign = name, sign

    def compute(self, images: np.ndarray) -> np.ndarray:
        return self.sign * images.mean(axis=(1, 2, 3))


def _config(seed: int = 0):
    c = table.toy_config("")
    c.seed = seed
    c.num_iterations = ITERATIONS
    c.num_groups = 4
    c.sample.num_steps = 10
    c.t2i.learning_rate = 3e-3
    c.pen.train = False
    c.advantage.weights = (0.5, 0.5)  # one weight per reward (two here; unused by Parrot)
    return c


def _brightness(run, state, probes) -> np.ndarray:
    """``[2]`` mean brightness under "<reward 1>, p" and "<reward 2>, p": same prompts, noise."""
    means = []
    for k in (0, 1):
        cond = tokenize_conditioning(run.models.clip_tokenizer,
                                     [identifier_prefix([k])] * len(probes), probes,
                                     run.models.context_length)
        images, _, _ = run.rollout(state, cond["input_ids"], jax.random.key(7))
        means.append(float(jnp.mean(images)))
    return np.asarray(means)


def _train(tmp_path, sign: float) -> tuple[np.ndarray, np.ndarray]:
    run, state = loop.setup(_config(), tmp_path)
    run.models.rewards.close()
    run.models.rewards = RewardSet([Brightness("bright", sign), Brightness("dark", -sign)])
    rng = np.random.default_rng(123)
    probes = [run.prompts[i] for i in rng.choice(len(run.prompts), PROBES, replace=False)]
    before = _brightness(run, state, probes)
    try:
        for _ in range(ITERATIONS):
            state, _, _, selected = loop.parrot_iteration(run, state)
            # The two rewards are exact opposites, so no sample dominates another.
            assert bool(np.all(np.asarray(selected)))
    finally:
        run.models.rewards.close()
    return before, _brightness(run, state, probes)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["bright_first", "swapped"])
def test_identifiers_learn_opposite_rewards(tmp_path, sign):
    before, after = _train(tmp_path, sign)
    assert abs(before[0] - before[1]) < 0.015, before  # the untrained UNet barely tells them apart
    contrast = (after[0] - after[1]) - (before[0] - before[1])
    assert sign * contrast > 0.06, (before, after)
