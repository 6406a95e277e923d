"""Images of a run conditioned as training conditions them, for the diagnostics
``parrot_jax.conflict`` and ``parrot_jax.toyworld.modifiers``.

Training renders each group from "<reward k>, ĉ" with ``ĉ`` sampled from the PEN, under plain
CFG at ``sample.guidance_scale``. ``score_each_identifier`` does the same for every identifier
in turn, on RL prompts drawn by ``draw_rl_prompts``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def add_run_arguments(parser: argparse.ArgumentParser, workdir_help: str) -> None:
    """The options both diagnostics share: the workdir, ``--trained``, ``--prompts``,
    ``--seed``."""
    parser.add_argument("workdir", help=workdir_help)
    parser.add_argument("--trained", action="store_true",
                        help="the latest checkpoint instead of the untrained models")
    parser.add_argument("--prompts", type=int, default=32, help="RL prompts drawn")
    parser.add_argument("--seed", type=int, default=0, help="prompt draw, PEN and noise seed")


def require_toy_run(config: Any, workdir: str | Path, what: str) -> None:
    """Raise ``RunError`` unless the run scored toy-world rewards (``model.rewards`` 'toy' or
    'toy:<folder>'); ``what`` says what needs the toy world."""
    from parrot_jax.sample import RunError

    if not str(config.model.rewards).startswith("toy"):
        raise RunError(f"{what}: {workdir} has model.rewards={config.model.rewards!r}; this "
                       "needs a toy-world run")


def draw_rl_prompts(config: Any, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``(indices, prompts)``: ``count`` distinct RL prompts of the run (all, if it has fewer),
    drawn with ``seed``."""
    from parrot_jax.training.loop import load_prompts

    prompts = load_prompts(config)
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
    checkpoint. ``on_samples`` receives each chunk's ``sample.Samples``, identifier by
    identifier."""
    from parrot_jax import evaluate
    from parrot_jax.sample import load_runs

    (loaded,) = load_runs(workdir, base=not trained, trained=trained)
    names = list(loaded.models.rewards.names)
    scores = []
    try:
        for k in range(len(names)):
            scores.append(evaluate.score(
                loaded, prompts, identifiers=[k], w1=0.0,
                w2=float(loaded.config.sample.guidance_scale), expand_prompt=True,
                greedy=False, num_images=num_images, seed=seed * len(names) + k,
                batch_prompts=batch_prompts, on_samples=on_samples))
    finally:
        loaded.models.rewards.close()
    return names, np.stack(scores)
