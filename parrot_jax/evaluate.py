"""Score a Parrot run: ``python -m parrot_jax.evaluate --workdir W --prompts FILE --out DIR``.

Each prompt of FILE (one per line) gets ``--num_images`` images sampled as ``parrot_jax.sample``
does (PEN expansion, identifiers, Eq. 5 guidance; same flags), and every reward of the run's
``RewardSet`` scores them; text-reading rewards (alignment) read the ORIGINAL prompt. The
checkpoint is scored, and with ``--base`` also the untrained models, with the same seeds (paired
noise). Writes ``eval.json`` (per model, per reward: mean and std over all images, and the
hypervolume of the model's reward vectors, pooled and per prompt) and ``eval.md`` (the same as
a markdown table). The whole file is checked against the text encoder's context and, with
``--expand``, the PEN's ``config.data.max_prompt_length`` before anything is sampled: a prompt
that does not fit exits 2 naming its ``file:line``.

The hypervolume of a model is that of all its images' reward vectors (one point per image),
measured from one reference shared by the models of the file: each reward's minimum over every
model's images (``hypervolume_reference`` in eval.json). ``hypervolume_per_prompt`` is the mean
over prompts of the hypervolume of each prompt's images, from that prompt's minimum over every
model's images. Both compare models within one file (``parrot_jax.scoring``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from parrot_jax import cli, policy, scoring
from parrot_jax.data.promptist import DatasetError
from parrot_jax.data.prompts import check_prompt_lengths, inference_limits, read_prompt_list
from parrot_jax.sample import define_generation_flags, identifiers_arg, load_policies

PROG = "python -m parrot_jax.evaluate"


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("prompts", None, "text file, one prompt per line", flag_values=values,
                        required=True)
    flags.DEFINE_integer("num_images", 4, "images per prompt", flag_values=values)
    flags.DEFINE_integer("batch_prompts", 8, "prompts sampled per compiled call",
                         flag_values=values)
    define_generation_flags(values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (without the program name), evaluate, write ``eval.json`` and
    ``eval.md`` under ``--out``; returns the ``eval.json`` record. Bad flags, prompt files
    and workdirs exit with status 2."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    for name in ("num_images", "batch_prompts"):
        if getattr(args, name) <= 0:
            cli.fail(PROG, f"--{name} {getattr(args, name)}: must be positive")
    try:
        prompts = read_prompt_list(args.prompts)
    except (DatasetError, OSError) as e:
        cli.fail(PROG, f"--prompts: {e}")
    policies = load_policies(PROG, args, trained=True)
    rewards = policies[0].models.rewards
    names = list(rewards.names)
    try:
        try:  # the whole file, before any image: one line naming the first prompt too long
            check_prompt_lengths(prompts, inference_limits(
                policies[0].models, policies[0].config.data.max_prompt_length,
                expand=args.expand))
        except DatasetError as e:
            cli.fail(PROG, f"--prompts: {e}")
        ids = identifiers_arg(PROG, args.identifiers, len(names))
        values = {}
        for p in policies:
            values[p.label] = scoring.score(
                p, prompts, identifiers=ids, w1=args.w1, w2=args.w2, expand_prompt=args.expand,
                greedy=not args.pen_sample, num_images=args.num_images, seed=args.seed,
                batch_prompts=args.batch_prompts)
        results, reference = scoring.with_hypervolumes(values, names,
                                                       num_images=args.num_images)
    except policy.RunError as e:
        cli.fail(PROG, str(e))
    finally:
        rewards.close()
    record = {
        "workdir": str(args.workdir), "prompts": str(args.prompts), "num_prompts": len(prompts),
        "num_images": args.num_images, "seed": args.seed, "expand": args.expand,
        "identifiers": [i + 1 for i in ids] if args.expand else [],
        "guidance": {"w1": args.w1, "w2": args.w2} if args.expand else {"cfg": args.w1},
        "rewards": names, "hypervolume_reference": reference, "models": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "eval.md").write_text(
        f"Rewards on {len(prompts)} prompts of {args.prompts} x {args.num_images} images "
        f"(seed {args.seed}); mean ± std over images.\n\n" + scoring.markdown(results, names))
    print(f"wrote eval.json and eval.md to {out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    cli.entry_point(main)
