"""The SFT'd PEN as a transformers T5 folder: ``python -m parrot_jax.export_pen --workdir W
--out DIR [--step N] [--dtype float32|bfloat16|float16]``.

Reads a ``parrot_jax.training.pen_sft`` workdir (its ``config.json`` and checkpoint; a LoRA run
is merged into its base model), and writes ``config.json``, ``model.safetensors`` and the
tokenizer to ``DIR``: the folder ``config.model.pen`` of a Parrot training config names
(``configs/sd15.py``), and one that transformers' ``T5ForConditionalGeneration`` loads too. An
existing non-empty ``DIR`` is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags

from parrot_jax import cli

PROG = "python -m parrot_jax.export_pen"


def export_pen(workdir: str | Path, out: str | Path, *, step: int | None = None,
               dtype: str = "float32") -> tuple[Path, int]:
    """Write the PEN of the SFT run in ``workdir`` (checkpoint ``step``, default the latest) to
    ``out``; returns ``(out, step)``."""
    from parrot_jax import export, storage
    from parrot_jax.training import pen_sft

    workdir, out = storage.path(workdir), Path(out)
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {workdir} is not a PEN SFT workdir")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from e
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists and is not empty; nothing was written")
    module, params, tokenizer, restored = pen_sft.restore(config, workdir, step)
    export.save_t5(out, module, params, dtype=dtype)
    tokenizer.save_pretrained(out)
    return out, restored


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "a PEN SFT workdir", flag_values=values, required=True)
    flags.DEFINE_string("out", None, "the T5 folder to write (new or empty)", flag_values=values,
                        required=True)
    flags.DEFINE_integer("step", None, "checkpoint (default: latest)", flag_values=values)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16", "float16"),
                      "storage dtype of the weights", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    try:
        out, step = export_pen(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (OSError, ValueError) as e:
        cli.fail(PROG, str(e))
    print(f"wrote the PEN of {args.workdir} (step {step}) to {out}", file=sys.stderr)


if __name__ == "__main__":
    cli.entry_point(main)
