"""Images of a run conditioned as training conditions them, for the diagnostics ``conflict``,
``transfer`` and ``modifiers``.

Training renders each group from "<reward k>, ĉ" with ``ĉ`` sampled from the PEN, under plain
CFG at ``sample.guidance_scale``. ``score_each_identifier`` does the same for every identifier
in turn, on RL prompts drawn by ``draw_rl_prompts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from parrot_jax import policy, scoring
from parrot_jax.data.prompts import load_prompts


def define_run_flags(values: flags.FlagValues) -> None:
    """The flags the diagnostics share: ``--workdir``, ``--trained``, ``--num_prompts``,
    ``--seed``."""
    flags.DEFINE_string("workdir", None, "a training workdir (train.py's --workdir)",
                        flag_values=values, required=True)
    flags.DEFINE_bool("trained", False, "the latest checkpoint instead of the untrained models",
                      flag_values=values)
    flags.DEFINE_integer("num_prompts", 32, "RL prompts drawn", flag_values=values)
    flags.DEFINE_integer("seed", 0, "prompt draw, PEN and noise seed", flag_values=values)


def require_toy_run(config: Any, workdir: str | Path, what: str) -> None:
    """Raise ``RunError`` unless the run scored toy-world rewards (``model.rewards`` 'toy' or
    'toy:<folder>'); ``what`` says what needs the toy world."""
    if not str(config.model.rewards).startswith("toy"):
        raise policy.RunError(f"{what}: {workdir} has model.rewards={config.model.rewards!r}; "
                              "this needs a toy-world run")


def draw_rl_prompts(config: Any, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``(indices, prompts)``: ``count`` distinct RL prompts of the run (all, if it has fewer),
    drawn with ``seed``."""
    prompts = load_prompts(config.data.prompts)
    chosen = np.random.default_rng(seed).choice(len(prompts), min(count, len(prompts)),
                                                replace=False)
    return chosen, [prompts[i] for i in chosen]


def score_each_identifier(workdir: str | Path, prompts: Sequence[str], *, trained: bool,
                          num_images: int, seed: int, batch_prompts: int = 8,
                          on_samples: Callable[[Any], Any] | None = None
                          ) -> tuple[list[str], np.ndarray]:
    """``(reward names, rewards [K, len(prompts) * num_images, K])``: row block ``k`` holds the
    images of identifier ``k`` alone (rows prompt-major, ``num_images`` per prompt, one sampled
    expansion per prompt), from the run's untrained models or (``trained``) its latest
    checkpoint. ``on_samples`` receives each chunk's ``policy.Samples``, identifier by
    identifier."""
    (loaded,) = policy.load(workdir, base=not trained, trained=trained)
    names = list(loaded.models.rewards.names)
    scores = []
    try:
        for k in range(len(names)):
            scores.append(scoring.score(
                loaded, prompts, identifiers=[k], w1=0.0,
                w2=float(loaded.config.sample.guidance_scale), expand_prompt=True,
                greedy=False, num_images=num_images, seed=seed * len(names) + k,
                batch_prompts=batch_prompts, on_samples=on_samples))
    finally:
        loaded.models.rewards.close()
    return names, np.stack(scores)
