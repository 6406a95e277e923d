"""Where the rewards conflict: ``python -m parrot_jax.analysis.conflict --workdir W``.

Parrot's T2I update compares the images of one group: one prompt, one expansion and one
identifier, so only the diffusion noise differs. It weighs them by the group-normalised
``r_k`` and zeroes the dominated ones. That differs from a weighted sum only where the rewards
disagree *within* groups. Rewards that disagree only *between* prompts (a prompt that names a
cold colour scores low on sentiment whatever the noise) give those comparisons nothing to
trade. This tool samples groups as training does: a sampled expansion, one identifier, plain
CFG, with every identifier in turn. It reports

- each reward's share of its variance that lies within groups (the rest lies between them);
- the rewards' correlations within groups (centred per group) and between groups (group means);
- the mean share of non-dominated images in a group (Parrot's selection);
- with ``--oracle`` (toy-world runs), the same split for each pixel-oracle metric (position,
  size, hue error, ...), and its within-group correlation with each reward: which image
  properties the noise varies, and which of them the rewards respond to.

It works on any run (toy, tiny or real); it reads the run's RL prompts.
"""

from __future__ import annotations

import dataclasses
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
from parrot_jax.rl.pareto import grouped_non_dominated_mask
from parrot_jax.toyworld.oracle import oracle_metrics

PROG = "python -m parrot_jax.analysis.conflict"


@dataclasses.dataclass(frozen=True)
class Conflict:
    """``reward_conflict``'s statistics for K rewards."""

    within_share: np.ndarray  # [K] within-group variance / total variance
    within_corr: np.ndarray  # [K, K] correlations of the per-group-centred rewards
    between_corr: np.ndarray  # [K, K] correlations of the group means
    non_dominated: float  # mean share of each group's images that no other image dominates


def _corr(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    norm = np.sqrt((x ** 2).sum(axis=0))
    return (x.T @ x) / np.outer(norm, norm)


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x [G, N, ...]`` -> (per-group-centred values ``[G * N, ...]``, group means
    ``[G, ...]``)."""
    return (x - x.mean(axis=1, keepdims=True)).reshape(-1, *x.shape[2:]), x.mean(axis=1)


def metric_conflict(metrics: dict[str, np.ndarray], rewards: np.ndarray
                    ) -> dict[str, tuple[float, np.ndarray]]:
    """Per metric ``[G, N]`` measured on the images of rewards ``[G, N, K]``: ``(within-group
    share of its variance, [K] within-group correlations with each reward)``. A metric
    constant within every group has no correlation: NaN (``markdown`` says so)."""
    r = np.asarray(rewards, np.float64)
    centred_r, _ = _split(r)
    out = {}
    for name, values in metrics.items():
        v = np.asarray(values, np.float64)
        if v.shape != r.shape[:2]:
            raise ValueError(f"metric {name!r} has shape {v.shape}, rewards {r.shape[:2]}")
        centred, means = _split(v)
        within, total = centred.var(), centred.var() + means.var()
        share = within / total if total > 0 else float("nan")
        if within == 0:
            out[name] = (share, np.full(r.shape[2], np.nan))
            continue
        corr = _corr(np.concatenate([centred[:, None], centred_r], axis=1))[0, 1:]
        out[name] = (float(share), corr)
    return out


def reward_conflict(rewards: np.ndarray) -> Conflict:
    """Statistics of rewards ``[G, N, K]`` (G groups of N images; module docstring).

    Population variances: with equal groups, total = within + between exactly.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 3 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [G, N, K] with G, N >= 2; got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        bad = np.argwhere(~np.all(np.isfinite(r), axis=2))
        raise ValueError(f"non-finite rewards at (group, image) {bad[:8].tolist()}")
    k = r.shape[2]
    centred, means = _split(r)
    within, between = centred.var(axis=0), means.var(axis=0)
    flat = [j for j in range(k) if within[j] == 0 or between[j] == 0]
    if flat:
        raise ValueError(f"reward columns {flat} do not vary within or between groups, so "
                         "their correlations are undefined")
    mask = np.asarray(grouped_non_dominated_mask(r))
    return Conflict(within_share=within / (within + between), within_corr=_corr(centred),
                    between_corr=_corr(means), non_dominated=float(mask.mean()))


def sample_groups(workdir: str | Path, *, trained: bool = False, num_prompts: int = 32,
                  images: int = 8, seed: int = 0, oracle: bool = False
                  ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray] | None]:
    """``(reward names, rewards [K * P, images, K], oracle)``: ``num_prompts`` RL prompts x
    every identifier, a group of ``images`` each, from the run's untrained models or
    (``trained``) its latest checkpoint; ``oracle`` (toy-world runs): the pixel oracle's
    metrics of the same images, each ``[K * P, images]``, else None."""
    if num_prompts < 2 or images < 2:
        raise RunError(f"--num_prompts {num_prompts} and --num_images {images}: at least 2 "
                       "each")
    config = read_config(workdir)
    if oracle:
        require_toy_run(config, workdir, "--oracle")
    _, prompts = draw_rl_prompts(config, num_prompts, seed)
    pictures: list[np.ndarray] = []
    names, scores = score_each_identifier(
        workdir, prompts, trained=trained, num_images=images, seed=seed,
        on_samples=(lambda s: pictures.append(s.images)) if oracle else None)
    metrics = None
    if oracle:
        per_image = [p for p in prompts for _ in range(images)] * len(names)
        metrics = {k: np.asarray(v).reshape(-1, images)
                   for k, v in oracle_metrics(np.concatenate(pictures), per_image).items()}
    return names, scores.reshape(-1, images, len(names)), metrics


def markdown(names: Sequence[str], c: Conflict) -> str:
    """The variance shares, then one correlation table: within groups above the diagonal,
    between groups below it."""
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    out = head + "| within-group share of variance | " + " | ".join(
        f"{s:.2f}" for s in c.within_share) + " |\n\n"
    out += ("Correlations: within groups above the diagonal, between groups below it.\n\n"
            + head)
    for i, name in enumerate(names):
        cells = ["1" if i == j else f"{(c.within_corr if j > i else c.between_corr)[i, j]:+.2f}"
                 for j in range(len(names))]
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out + f"\nNon-dominated share of a group: {c.non_dominated:.2f}\n"


def metric_markdown(names: Sequence[str], stats: dict[str, tuple[float, np.ndarray]]) -> str:
    """A row per metric: its within-group share of variance and its within-group correlation
    with each reward."""
    out = ("Each metric's within-group share of variance, then its within-group correlation "
           "with each reward.\n\n| metric | within-group share | " + " | ".join(names)
           + " |\n|---|---|" + "---|" * len(names) + "\n")
    for metric, (share, corr) in stats.items():
        cells = ["n/a (constant in every group)" if np.isnan(c) else f"{c:+.2f}" for c in corr]
        out += f"| {metric} | {share:.2f} | " + " | ".join(cells) + " |\n"
    return out


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    define_run_flags(values)
    flags.DEFINE_integer("num_images", 8, "images per group", flag_values=values)
    flags.DEFINE_bool("oracle", False, "also split the toy world's pixel-oracle metrics (toy "
                      "runs only)", flag_values=values)


def main(argv: Sequence[str] | None = None) -> Conflict:
    """Parse ``argv`` (without the program name), sample, print the tables."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    try:
        names, rewards, metrics = sample_groups(
            args.workdir, trained=args.trained, num_prompts=args.num_prompts,
            images=args.num_images, seed=args.seed, oracle=args.oracle)
        c = reward_conflict(rewards)
    except (RunError, ValueError) as e:
        cli.fail(PROG, str(e))
    print(f"{rewards.shape[0]} groups of {rewards.shape[1]} images "
          f"({'trained' if args.trained else 'untrained'} models)\n")
    print(markdown(names, c), end="")
    if metrics is not None:
        print("\nPixel oracle:\n\n" + metric_markdown(names, metric_conflict(metrics, rewards)),
              end="")
    return c


if __name__ == "__main__":
    cli.entry_point(main)
