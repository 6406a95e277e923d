"""Images from a Parrot run: ``python -m parrot_jax.sample --workdir W --prompt "..." --out DIR``.

Inference as the paper does it: the PEN expands the prompt (greedy by default), the chosen
reward identifiers are put before the expansion (``"<reward 1>, <reward 3>, " + ĉ``), and the
UNet is guided by original-prompt-centred guidance (Eq. 5) with the null prompt, the original
prompt and the identified expansion; ``--noexpand`` samples with plain CFG on the prompt alone.
DDIM runs as the run's config says (steps, eta). Writes PNGs and ``samples.json``.

The run's models come from ``W/config.json``; ``--step`` picks a checkpoint (default: the
latest) and only its trained weights are read; ``--base`` uses the untrained models.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from parrot_jax import cli, policy
from parrot_jax.data.promptist import DatasetError
from parrot_jax.data.prompts import PromptList, check_prompt_lengths, inference_limits
from parrot_jax.expansion import parse_identifiers

PROG = "python -m parrot_jax.sample"


def define_generation_flags(values: flags.FlagValues) -> None:
    """Flags shared by ``sample`` and ``evaluate``: the policy, the conditioning, the seed."""
    cli.define_policy_flags(values)
    flags.DEFINE_string("out", None, "folder for the outputs (created)", flag_values=values,
                        required=True)
    flags.DEFINE_string("identifiers", "all", "reward identifiers, 1-based and comma-separated "
                        "('1,3'), 'all' or 'none'", flag_values=values)
    flags.DEFINE_float("w1", 5.0, "guidance weight of the original prompt (Eq. 5; the CFG "
                       "weight with --noexpand)", flag_values=values)
    flags.DEFINE_float("w2", 5.0, "guidance weight of the identified expansion (Eq. 5)",
                       flag_values=values)
    flags.DEFINE_bool("expand", True, "expand the prompt with the PEN and add the identifiers "
                      "(--noexpand: plain CFG on the prompt)", flag_values=values)
    flags.DEFINE_bool("pen_sample", False, "sample the expansion (the run's pen temperature / "
                      "top-k / top-p) instead of greedy decoding", flag_values=values)
    flags.DEFINE_integer("seed", 0, "PRNG seed of all sampling", flag_values=values)


def load_policies(prog: str, values: flags.FlagValues, *, trained: bool
                  ) -> list[policy.Policy]:
    """The policies ``--workdir``, ``--step`` and ``--base`` name: the checkpoint's when
    ``trained``, then the untrained one with ``--base``; errors exit 2."""
    if values.base and values.step is not None:
        cli.fail(prog, "--base and --step exclude each other")
    try:
        return policy.load(values.workdir, step=values.step, base=values.base, trained=trained)
    except policy.RunError as e:
        cli.fail(prog, str(e))


def identifiers_arg(prog: str, spec: str, num_rewards: int) -> list[int]:
    """``--identifiers`` -> 0-based columns; a bad spec exits 2."""
    if spec.strip().lower() == "none":
        return []
    try:
        return parse_identifiers(spec, num_rewards)
    except ValueError as e:
        cli.fail(prog, f"--identifiers: {e}")


def write_png(path: Path, image: np.ndarray) -> None:
    """``image`` ``[H, W, 3]`` in [0, 1] -> an 8-bit PNG."""
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("prompt", None, "the user's prompt", flag_values=values, required=True)
    flags.DEFINE_integer("num_images", 4, "images to draw", flag_values=values)
    define_generation_flags(values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (without the program name), sample, write ``--out``; returns the
    ``samples.json`` record. Bad flags and unusable workdirs exit with status 2."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    if args.num_images <= 0:
        cli.fail(PROG, f"--num_images {args.num_images}: must be positive")
    if not args.prompt.strip():
        cli.fail(PROG, "--prompt is empty")
    (loaded,) = load_policies(PROG, args, trained=not args.base)
    try:
        try:  # as evaluate checks its prompt file: the same one line, naming --prompt
            check_prompt_lengths(PromptList([args.prompt], ["--prompt"]), inference_limits(
                loaded.models, loaded.config.data.max_prompt_length, expand=args.expand))
        except DatasetError as e:
            cli.fail(PROG, str(e))
        ids = identifiers_arg(PROG, args.identifiers, len(loaded.models.rewards.names))
        samples = loaded.sample([args.prompt], identifiers=ids, w1=args.w1, w2=args.w2,
                                expand_prompt=args.expand, greedy=not args.pen_sample,
                                num_images=args.num_images, seed=args.seed)
    except policy.RunError as e:
        cli.fail(PROG, str(e))
    finally:
        loaded.models.rewards.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [f"{i:03d}.png" for i in range(args.num_images)]
    for name, image in zip(files, samples.images):
        write_png(out / name, image)
    record = {
        "workdir": str(args.workdir), "model": loaded.label, "prompt": args.prompt,
        "expand": args.expand, "expansion": samples.expansions[0],
        "pen_decoding": "sample" if args.pen_sample else "greedy",
        "identifiers": [i + 1 for i in ids] if args.expand else [],
        "conditioning_text": samples.conditions[0],
        "guidance": {"w1": args.w1, "w2": args.w2} if args.expand else {"cfg": args.w1},
        "num_steps": int(loaded.config.sample.num_steps), "eta": float(loaded.config.sample.eta),
        "seed": args.seed, "files": files,
    }
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} images and samples.json to {out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    cli.entry_point(main)
