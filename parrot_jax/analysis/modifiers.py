"""The slope the PEN climbs: ``python -m parrot_jax.analysis.modifiers --workdir W``.

Parrot's PEN update (Algorithm 1's ``∇J_φ``) raises the probability of expansions whose images
score high on the group's reward ``r_k``; the PEN never sees ``k``. Whether that can teach it
anything depends on how much each modifier it writes moves the rewards under the current T2I
model. This tool measures it. It draws the PEN's expansions of RL prompts (one per image,
sampled as training samples them), renders each image with one identifier as training does
("<reward k>, ĉ" with plain CFG), scores the rewards, and reports, for every modifier value the
PEN adds (an attribute the expansion names and the prompt does not; ``captions.parse``), the
mean difference between the images with and without it of

- each reward, z-scored over all images and centred per prompt (so a modifier is not credited
  with the prompts it tends to follow);
- ``own``: the reward of the image's own identifier, the signal Parrot's PEN advantage weighs
  (before Pareto selection);
- ``equal``: the mean of all rewards, the signal of an equal-weight sum.

Each value comes with two standard errors. Effects inside their error bars give REINFORCE
nothing to follow at that sample size. Large effects with opposite signs across rewards are
trade-offs: a PEN that does not see the identifier can only average them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from parrot_jax import cli
from parrot_jax.analysis.as_trained import (
    define_run_flags,
    draw_rl_prompts,
    require_toy_run,
    score_each_identifier,
)
from parrot_jax.policy import RunError, read_config
from parrot_jax.toyworld.captions import OPTIONAL, parse

PROG = "python -m parrot_jax.analysis.modifiers"


@dataclasses.dataclass(frozen=True)
class Effect:
    """One modifier value's effect (with-minus-without means of centred z-scores)."""

    attribute: str
    value: str
    count: int  # images whose expansion adds it
    rewards: np.ndarray  # [K] effect on each reward
    rewards_se: np.ndarray  # [K] standard errors
    own: float  # effect on the reward of each image's identifier
    own_se: float
    equal: float  # effect on the mean of the K rewards
    equal_se: float


def added_modifiers(prompt: str, expansion: str) -> dict[str, str]:
    """Attribute -> value that ``expansion`` names and ``prompt`` does not."""
    named = parse(prompt)
    return {a: v for a, v in parse(expansion).items() if a not in named}


def _difference(x: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``x`` over ``has`` minus over the rest, and its standard error (axis 0)."""
    a, b = x[has], x[~has]
    se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
    return a.mean(axis=0) - b.mean(axis=0), se


def modifier_effects(rewards: np.ndarray, identifiers: np.ndarray, prompt_ids: np.ndarray,
                     modifiers: Sequence[dict[str, str]], *,
                     min_count: int = 8) -> list[Effect]:
    """Each modifier value's effect (module docstring).

    rewards ``[n, K]``; identifiers ``[n]`` (0-based reward columns); prompt_ids ``[n]`` (images
    of one prompt share an id); modifiers: ``n`` dicts (``added_modifiers``). Only values present
    in, and absent from, at least ``min_count`` images are measured; the result follows
    ``captions.OPTIONAL``'s attribute order, then the value.
    """
    rewards = np.asarray(rewards, np.float64)
    identifiers, prompt_ids = np.asarray(identifiers), np.asarray(prompt_ids)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [n, K], got shape {rewards.shape}")
    n, k = rewards.shape
    lengths = {"identifiers": len(identifiers), "prompt_ids": len(prompt_ids),
               "modifiers": len(modifiers)}
    if any(v != n for v in lengths.values()):
        raise ValueError(f"{n} reward rows but {lengths}")
    if min_count < 2:
        raise ValueError(f"min_count={min_count}: a standard error needs at least 2 images")
    if np.any((identifiers < 0) | (identifiers >= k)):
        raise ValueError(f"identifiers must lie in [0, {k}), got {sorted(set(identifiers))}")
    bad = np.flatnonzero(~np.all(np.isfinite(rewards), axis=1))
    if len(bad):
        raise ValueError(f"non-finite rewards in rows {bad[:8].tolist()}")
    std = rewards.std(axis=0)
    if np.any(std == 0):
        raise ValueError(f"reward columns {np.flatnonzero(std == 0).tolist()} are constant")
    z = (rewards - rewards.mean(axis=0)) / std
    for p in np.unique(prompt_ids):
        z[prompt_ids == p] -= z[prompt_ids == p].mean(axis=0)
    own, equal = z[np.arange(n), identifiers], z.mean(axis=1)
    order = {a: i for i, a in enumerate(OPTIONAL)}
    values = sorted({(a, v) for m in modifiers for a, v in m.items()},
                    key=lambda av: (order.get(av[0], len(order)), av))
    effects = []
    for a, v in values:
        has = np.array([m.get(a) == v for m in modifiers])
        if min(has.sum(), n - has.sum()) < min_count:
            continue
        (d, se), (o, o_se), (e, e_se) = (_difference(x, has) for x in (z, own, equal))
        effects.append(Effect(a, v, int(has.sum()), d, se, float(o), float(o_se), float(e),
                              float(e_se)))
    return effects


@dataclasses.dataclass(frozen=True)
class Landscape:
    """Scored samples: ``rewards [n, K]`` and, per image, its identifier, prompt and the
    modifiers its expansion added (``modifier_effects``' arguments)."""

    names: list[str]
    rewards: np.ndarray
    identifiers: np.ndarray
    prompt_ids: np.ndarray
    modifiers: list[dict[str, str]]

    def effects(self, min_count: int = 8) -> list[Effect]:
        """``modifier_effects`` of these samples."""
        return modifier_effects(self.rewards, self.identifiers, self.prompt_ids,
                                self.modifiers, min_count=min_count)


def landscape(workdir: str | Path, *, trained: bool = False, num_prompts: int = 32,
              repeats: int = 4, seed: int = 0, batch_prompts: int = 64) -> Landscape:
    """Sample and score ``num_prompts`` RL prompts x ``repeats`` expansions x K identifiers
    (one image each) with the run's untrained models, or with its latest checkpoint when
    ``trained``."""
    config = read_config(workdir)
    require_toy_run(config, workdir, "the modifier grammar (toy world only)")
    if num_prompts <= 0 or repeats <= 0:
        raise RunError(f"--num_prompts {num_prompts} and --repeats {repeats} must be positive")
    chosen, prompts = draw_rl_prompts(config, num_prompts, seed)
    rows = [p for p in prompts for _ in range(repeats)]
    expansions: list[str] = []
    names, scores = score_each_identifier(
        workdir, rows, trained=trained, num_images=1, seed=seed, batch_prompts=batch_prompts,
        on_samples=lambda s: expansions.extend(s.expansions))
    return Landscape(
        names=names, rewards=scores.reshape(-1, len(names)),
        identifiers=np.repeat(np.arange(len(names)), len(rows)),
        prompt_ids=np.tile(np.repeat(chosen, repeats), len(names)),
        modifiers=[added_modifiers(p, e) for p, e in zip(rows * len(names), expansions)])


def markdown(names: Sequence[str], effects: Sequence[Effect], images: int) -> str:
    """A row per modifier value: its share of the images and each effect ± 2 standard errors."""
    cell = lambda d, se: f"{d:+.2f} ± {2 * se:.2f}"  # noqa: E731
    lines = ["| modifier | share | " + " | ".join(names) + " | own | equal |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for e in effects:
        lines.append(f"| {e.attribute}={e.value} | {e.count / images:.2f} | "
                     + " | ".join(cell(d, s) for d, s in zip(e.rewards, e.rewards_se))
                     + f" | {cell(e.own, e.own_se)} | {cell(e.equal, e.equal_se)} |")
    return "\n".join(lines) + "\n"


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    define_run_flags(values)
    flags.DEFINE_integer("repeats", 4, "expansions per prompt and identifier (one image each)",
                         flag_values=values)
    flags.DEFINE_integer("min_count", 8, "images a value must be in, and be absent from, to be "
                         "measured", flag_values=values)


def main(argv: Sequence[str] | None = None) -> list[Effect]:
    """Parse ``argv`` (without the program name), measure, print the markdown table."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    if args.min_count < 2:
        cli.fail(PROG, "--min_count must be at least 2")
    try:
        scored = landscape(args.workdir, trained=args.trained, num_prompts=args.num_prompts,
                           repeats=args.repeats, seed=args.seed)
    except RunError as e:
        cli.fail(PROG, str(e))
    effects = scored.effects(args.min_count)
    images = len(scored.rewards)
    print(f"{images} images ({'trained' if args.trained else 'untrained'} models); effects in "
          "per-prompt-centred z-scores, with minus without, ± 2 standard errors")
    print(markdown(scored.names, effects, images), end="")
    if not effects:
        print(f"no modifier value was in, and absent from, at least {args.min_count} images",
              file=sys.stderr)
    return effects


if __name__ == "__main__":
    cli.entry_point(main)
