"""Score a Parrot run: ``python -m parrot_jax.evaluate --workdir W --prompts FILE --out DIR``.

Each prompt of FILE (one per line) gets ``--num-images`` images sampled as ``parrot_jax.sample``
does (PEN expansion, identifiers, Eq. 5 guidance; same flags), and every reward of the run's
``RewardSet`` scores them; text-reading rewards (alignment) read the ORIGINAL prompt. The
checkpoint is scored, and with ``--base`` also the untrained models, with the same seeds (paired
noise). Writes ``eval.json`` (per model, per reward: mean and std over all images, and the
hypervolume of the model's reward vectors, pooled and per prompt) and ``eval.md`` (the same as
a markdown table).

The hypervolume of a model is that of all its images' reward vectors (one point per image),
measured from one reference shared by the models of the file: each reward's minimum over every
model's images (``hypervolume_reference`` in eval.json). ``hypervolume_per_prompt`` is the mean
over prompts of the hypervolume of each prompt's images, from that prompt's minimum over every
model's images (``per_prompt_hypervolumes``). Both compare models within one file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parrot_jax.data.promptist import DatasetError, read_prompts
from parrot_jax.sample import (
    LoadedRun,
    RunError,
    Samples,
    add_generation_args,
    generate,
    identifiers_arg,
    load_runs,
    under_run_precision,
)
from parrot_jax.training.metrics import front_hypervolume


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt chunk ``index`` under ``--seed seed``."""
    return int(np.random.default_rng([seed, index]).integers(2**31 - 1))


@under_run_precision
def score(loaded: LoadedRun, prompts: Sequence[str], *, identifiers: Sequence[int],
          w1: float, w2: float, expand_prompt: bool, greedy: bool, num_images: int, seed: int,
          batch_prompts: int,
          on_samples: Callable[[Samples], Any] | None = None) -> np.ndarray:
    """Rewards ``[len(prompts) * num_images, K]`` (rows prompt-major, columns in
    ``rewards.names`` order). Prompts go ``batch_prompts`` at a time; chunk ``i`` samples with
    ``chunk_seed(seed, i)``, so two models see the same noise. Reward batches are padded to a
    multiple of the run's devices (the padding rows are dropped). ``on_samples`` receives each
    chunk's ``Samples`` (images ``[n, H, W, 3]`` in [0, 1], expansions, conditioning texts), in
    row order. Compiles under the run's ``matmul_precision``."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_prompts)):
        chunk = list(prompts[start:start + batch_prompts])
        samples = generate(loaded, chunk, identifiers=identifiers, w1=w1, w2=w2,
                           expand_prompt=expand_prompt, greedy=greedy, num_images=num_images,
                           seed=chunk_seed(seed, i))
        if on_samples is not None:
            on_samples(samples)
        per_image = lambda xs: [x for x in xs for _ in range(num_images)]  # noqa: E731
        out.append(score_images(loaded, samples.images, per_image(chunk),
                                per_image(samples.conditions)))
    return np.concatenate(out)


def score_images(loaded: LoadedRun, images: Any, prompts: Sequence[str],
                 conditions: Sequence[str]) -> np.ndarray:
    """The run's rewards ``[n, K]`` of images ``[n, H, W, 3]`` in [0, 1], each with its original
    prompt and conditioning text; the batch is padded to a multiple of the run's devices (the
    padding rows are dropped)."""
    rewards, n = loaded.models.rewards, len(images)
    prompts, conditions = list(prompts), list(conditions)
    pad = -n % loaded.devices
    if pad:
        images = np.concatenate([np.asarray(images), np.repeat(np.asarray(images[-1:]), pad,
                                                               axis=0)])
        prompts = prompts + prompts[-1:] * pad
        conditions = conditions + conditions[-1:] * pad
    r = rewards(rewards.inputs(images, prompts=prompts, conditions=conditions))
    return np.asarray(r)[:n]


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parrot_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--batch-prompts", type=int, default=8,
                        help="prompts sampled per compiled call")
    add_generation_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (without the program name), evaluate, write ``eval.json`` and
    ``eval.md`` under ``--out``; returns the ``eval.json`` record. Bad options, prompt files
    and workdirs exit with status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.base and args.step is not None:
        parser.error("--base and --step exclude each other")
    for name in ("num_images", "batch_prompts"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    try:
        prompts = read_prompts(args.prompts)
    except (DatasetError, OSError) as e:
        parser.error(f"--prompts: {e}")
    try:
        runs = load_runs(args.workdir, step=args.step, base=args.base)
    except RunError as e:
        parser.error(str(e))
    rewards = runs[0].models.rewards
    names = list(rewards.names)
    try:
        ids = identifiers_arg(parser, args.identifiers, len(names))
        values = {}
        for loaded in runs:
            values[loaded.label] = score(
                loaded, prompts, identifiers=ids, w1=args.w1, w2=args.w2,
                expand_prompt=not args.no_expand, greedy=not args.pen_sample,
                num_images=args.num_images, seed=args.seed, batch_prompts=args.batch_prompts)
        results, reference = with_hypervolumes(values, names, num_images=args.num_images)
    except RunError as e:
        parser.error(str(e))
    finally:
        rewards.close()
    record = {
        "workdir": str(args.workdir), "prompts": str(args.prompts), "num_prompts": len(prompts),
        "num_images": args.num_images, "seed": args.seed, "expand": not args.no_expand,
        "identifiers": [i + 1 for i in ids] if not args.no_expand else [],
        "guidance": ({"w1": args.w1, "w2": args.w2} if not args.no_expand
                     else {"cfg": args.w1}),
        "rewards": names, "hypervolume_reference": reference, "models": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "eval.md").write_text(
        f"Rewards on {len(prompts)} prompts of {args.prompts} x {args.num_images} images "
        f"(seed {args.seed}); mean ± std over images.\n\n" + markdown(results, names))
    print(f"wrote eval.json and eval.md to {out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
