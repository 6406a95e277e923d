"""Scoring a policy on prompts: rewards per image, their summary, and two hypervolumes.

``score`` samples each prompt's images as the paper infers (``Policy.sample``) and scores them
with every reward of the run; text-reading rewards (alignment) read the ORIGINAL prompt. Two
policies scored with the same seed see the same noise (paired). The hypervolume of a model is
that of all its images' reward vectors, measured from a reference shared by the models compared
(each reward's minimum over all of their images); ``hypervolume_per_prompt`` is the mean over
prompts of the hypervolume of each prompt's images, from that prompt's own shared minimum.
Used by ``parrot_jax.evaluate``, the closing evaluation of training and the diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parrot_jax.policy import Policy, RunError, Samples
from parrot_jax.rl.pareto import front_hypervolume


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt chunk ``index`` under ``seed``."""
    return int(np.random.default_rng([seed, index]).integers(2**31 - 1))


def score(policy: Policy, prompts: Sequence[str], *, identifiers: Sequence[int], w1: float,
          w2: float, expand_prompt: bool, greedy: bool, num_images: int, seed: int,
          batch_prompts: int, on_samples: Callable[[Samples], Any] | None = None
          ) -> np.ndarray:
    """Rewards ``[len(prompts) * num_images, K]`` (rows prompt-major, columns in
    ``rewards.names`` order). Prompts go ``batch_prompts`` at a time; chunk ``i`` samples with
    ``chunk_seed(seed, i)``, so two policies see the same noise. A last, shorter chunk is
    padded with its last prompt to ``batch_prompts`` (and the padding dropped), so every chunk
    runs one compiled program. ``on_samples`` receives each chunk's ``Samples`` (images
    ``[n, H, W, 3]`` in [0, 1], expansions, conditioning texts), in row order."""
    out = []
    size = min(batch_prompts, len(prompts))
    per_image = lambda xs: [x for x in xs for _ in range(num_images)]  # noqa: E731
    for i, start in enumerate(range(0, len(prompts), size)):
        chunk = list(prompts[start:start + size])
        n, padded = len(chunk), chunk + chunk[-1:] * (size - len(chunk))
        samples = policy.sample(padded, identifiers=identifiers, w1=w1, w2=w2,
                                expand_prompt=expand_prompt, greedy=greedy,
                                num_images=num_images, seed=chunk_seed(seed, i))
        rewards = policy.score(samples.images, per_image(padded), per_image(samples.conditions))
        out.append(rewards[:n * num_images])
        if on_samples is not None:
            on_samples(Samples(samples.images[:n * num_images], samples.expansions[:n],
                               samples.conditions[:n]))
    return np.concatenate(out)


def summary(values: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{reward: {'mean', 'std'}}`` over the rows of ``values`` ``[B, K]`` (population std)."""
    if not np.all(np.isfinite(values)):
        bad = [names[k] for k in np.flatnonzero(~np.all(np.isfinite(values), axis=0))]
        raise RunError(f"non-finite rewards from {bad}")
    return {name: {"mean": float(values[:, k].mean()), "std": float(values[:, k].std())}
            for k, name in enumerate(names)}


def per_prompt_hypervolumes(values: dict[str, np.ndarray], num_images: int
                            ) -> dict[str, float]:
    """Per model (``values``: label -> rewards ``[P * num_images, K]``, rows prompt-major): the
    mean over the ``P`` prompts of the hypervolume of that prompt's images, each prompt measured
    from its own reference shared by the models (each reward's minimum over every model's
    images of the prompt).

    The pooled hypervolume (``with_hypervolumes``) is set by the few prompts whose images reach
    furthest (in the toy world, three of the twenty held-out prompts each hold up to 6.7 of
    about 53; every other prompt at most 1.3); this one weighs every prompt, and asks what
    Parrot's per-prompt Pareto selection asks: how far out the images of one prompt reach."""
    shaped = {}
    for label, v in values.items():
        if v.ndim != 2 or len(v) % num_images:
            raise ValueError(f"{label}: {v.shape[0]} reward rows do not split into prompts of "
                             f"{num_images} images")
        shaped[label] = v.reshape(-1, num_images, v.shape[-1])
    counts = {s.shape[0] for s in shaped.values()}
    if len(counts) != 1:
        raise ValueError(f"models scored different numbers of prompts: {sorted(counts)}")
    references = np.min(np.concatenate(list(shaped.values()), axis=1), axis=1)  # [P, K]
    return {label: float(np.mean([front_hypervolume(s[p], references[p])
                                  for p in range(len(s))]))
            for label, s in shaped.items()}


def with_hypervolumes(values: dict[str, np.ndarray], names: Sequence[str], *,
                      num_images: int | None = None,
                      ) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Per model (``values``: label -> rewards ``[B, K]``): ``summary`` plus ``hypervolume``,
    all measured from the shared reference (each reward's minimum over every model's rows),
    which is returned too. With ``num_images`` (rows prompt-major), also
    ``hypervolume_per_prompt`` (``per_prompt_hypervolumes``)."""
    reference = np.min(np.concatenate(list(values.values())), axis=0)
    per_prompt = None if num_images is None else per_prompt_hypervolumes(values, num_images)
    results = {}
    for label, v in values.items():
        results[label] = summary(v, names)
        results[label]["hypervolume"] = front_hypervolume(v, reference)
        if per_prompt is not None:
            results[label]["hypervolume_per_prompt"] = per_prompt[label]
    return results, [float(x) for x in reference]


def markdown(results: dict[str, dict[str, Any]], names: Sequence[str]) -> str:
    """One row per model, one ``mean ± std`` column per reward, then the hypervolumes (pooled,
    and per prompt where measured)."""
    volumes = [k for k in ("hypervolume", "hypervolume_per_prompt")
               if all(k in stats for stats in results.values())]
    lines = ["| model | " + " | ".join([*names, *volumes]) + " |",
             "|---|" + "---|" * (len(names) + len(volumes))]
    for model, stats in results.items():
        lines.append(f"| {model} | " + " | ".join(
            [f"{stats[n]['mean']:.4f} ± {stats[n]['std']:.4f}" for n in names]
            + [f"{stats[k]:.4g}" for k in volumes]) + " |")
    return "\n".join(lines) + "\n"
