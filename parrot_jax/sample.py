"""Images from a Parrot run: ``python -m parrot_jax.sample --workdir W --prompt "..." --out DIR``.

Inference as the paper does it (METHOD.md §2-3): the PEN expands the prompt (greedy by default),
the chosen reward identifiers are put before the expansion (``"<reward 1>, <reward 3>, " + ĉ``),
and the UNet is guided by original-prompt-centred guidance (Eq. 5) with the null prompt, the
original prompt and the identified expansion; ``--no-expand`` samples with plain CFG on the
prompt alone. DDIM runs as the run's config says (steps, eta). Writes PNGs and ``samples.json``.

The run is rebuilt from ``W/config.json`` by the training loop's own ``setup`` (same models,
tokenizers, shapes); ``--step`` picks a checkpoint (default: the latest), ``--base`` uses the
untrained models. ``load_run`` and ``generate`` are shared with ``parrot_jax.evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from parrot_jax.diffusion import CFG, PromptCentredGuidance, branch_contexts, rollout
from parrot_jax.expansion import (
    SamplingConfig,
    decode,
    identifier_prefix,
    parse_identifiers,
    tokenize_conditioning,
    tokenize_prompts,
)
from parrot_jax.expansion import sample as pen_sample
from parrot_jax.models.lora import merge
from parrot_jax.models.vae import latents_to_images
from parrot_jax.training import checkpoint
from parrot_jax.training.models import ParrotModels
from parrot_jax.training.precision import under_matmul_precision


class RunError(ValueError):
    """A workdir, checkpoint or option that cannot be used (the message says which)."""


@dataclasses.dataclass
class LoadedRun:
    """A run's models with one set of weights: a checkpoint's, or the untrained ones."""

    config: ml_collections.ConfigDict
    models: ParrotModels
    unet_params: Any  # full UNet parameters (trained cross-attention merged in)
    pen_params: Any  # PEN parameters with the trained LoRA merged in
    step: int | None  # the checkpoint's iteration; None for the untrained models
    devices: int  # devices of the run's mesh (reward batches are padded to a multiple)

    @property
    def label(self) -> str:
        return "base" if self.step is None else f"step_{self.step}"


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's ``workdir/config.json`` as a ConfigDict (errors name the path)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise RunError(f"--workdir {workdir}: no such directory")
    path = workdir / checkpoint.CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{path}: missing; {workdir} is not a Parrot training workdir")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: unreadable JSON ({e})") from e


def load_runs(workdir: str | Path, *, step: int | None = None,
              base: bool = False, trained: bool = True) -> list[LoadedRun]:
    """Rebuild the run of ``workdir`` with ``training.loop.setup`` and return the checkpoint's
    weights (``step``, default the latest) when ``trained``, then the untrained ones when
    ``base``; both share one set of loaded models."""
    from parrot_jax.training.loop import setup
    from parrot_jax.training.step import merged_params

    config = read_config(workdir)
    run, state = setup(config, workdir)
    m = run.models
    out = []
    if trained:
        manager = checkpoint.checkpoint_manager(workdir, read_only=True)
        steps = sorted(manager.all_steps())
        if not steps:
            raise RunError(f"{Path(workdir) / 'checkpoints'}: no checkpoint (train first, or "
                           "pass --base alone for the untrained models)")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise RunError(f"--step {step}: no such checkpoint in {workdir}; saved steps are "
                           f"{steps}")
        from orbax import checkpoint as ocp

        restored = manager.restore(chosen, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state))).state
        manager.close()
        out.append(LoadedRun(config, m, merged_params(restored["t2i"]["trainable"], run.frozen),
                             merge(m.pen_params, restored["pen"]["lora"]), chosen,
                             run.mesh.size))
    if base:
        out.append(LoadedRun(config, m, m.unet_params, m.pen_params, None, run.mesh.size))
    return out


@dataclasses.dataclass
class Samples:
    """``generate``'s output for P prompts x N images (rows prompt-major)."""

    images: np.ndarray  # [P*N, H, W, 3] float32 in [0, 1]
    expansions: list[str]  # [P] the PEN's expansions ('' with expand=False)
    conditions: list[str]  # [P] the conditioning texts the UNet saw


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "vae", "num_images",
                                             "latent_shape", "eta", "scaling_factor"))
def _images(unet: Any, text_encoder: Any, vae: Any, num_images: int,
            latent_shape: tuple[int, int, int], eta: float, scaling_factor: float,
            unet_params: Any, text_params: Any, vae_params: Any, schedule: Any, guidance: Any,
            branch_ids: jax.Array, key: jax.Array) -> jax.Array:
    """branch_ids ``[P, G, L]`` (the guidance's G branches per prompt) -> images
    ``[P*num_images, H, W, 3]`` in [0, 1]. The text encoder runs without an attention mask, as
    in training."""
    p, g, length = branch_ids.shape
    hidden = text_encoder.apply({"params": text_params}, branch_ids.reshape(p * g, length))
    hidden = hidden["last_hidden_state"].reshape(p, g, length, -1)
    contexts = branch_contexts(*[jnp.repeat(hidden[:, i], num_images, axis=0)
                                 for i in range(g)])
    x_0, _ = rollout(unet, unet_params, schedule, contexts, guidance, key,
                     latent_shape=latent_shape, eta=eta, with_log_probs=False)
    return latents_to_images(vae, vae_params, x_0, scaling_factor)


def _clip_ids(models: ParrotModels, texts: Sequence[str], what: str) -> np.ndarray:
    """int32 ``[len(texts), L]`` padded to the context; a text that does not fit is an error
    (nothing is cut silently)."""
    length = models.context_length
    enc = models.clip_tokenizer(list(texts), padding="max_length", max_length=length)
    for i, ids in enumerate(enc["input_ids"]):
        if len(ids) > length:
            raise RunError(f"{what} {i} ({texts[i]!r}) takes {len(ids)} tokens; the text "
                           f"encoder's context is {length}")
    return np.asarray(enc["input_ids"], np.int32)


# Sampling and scoring compile under the run's config.matmul_precision, as training and its
# closing evaluation did: on a GPU or TPU the default would use reduced-precision float32
# matmuls and disagree with final_eval.json.
under_run_precision = under_matmul_precision(lambda loaded: loaded.config)


@under_run_precision
def expand(loaded: LoadedRun, prompts: Sequence[str], *, greedy: bool = True,
           key: jax.Array | None = None) -> list[str]:
    """The PEN's expansions of ``prompts`` (greedy, or sampled as the run's ``pen`` config says
    with ``key``)."""
    c, m = loaded.config, loaded.models
    try:
        ids, mask = tokenize_prompts(m.pen_tokenizer, prompts, c.data.max_prompt_length)
    except ValueError as e:
        raise RunError(f"PEN input (config.data.max_prompt_length="
                       f"{c.data.max_prompt_length}): {e}") from e
    config = SamplingConfig(max_new_tokens=c.pen.max_new_tokens, temperature=c.pen.temperature,
                            top_k=c.pen.top_k, top_p=c.pen.top_p, greedy=greedy)
    out = pen_sample(m.pen, loaded.pen_params, ids, mask,
                     jax.random.key(0) if key is None else key, config)
    return decode(m.pen_tokenizer, out.tokens, out.mask)


@under_run_precision
def generate(loaded: LoadedRun, prompts: Sequence[str], *, identifiers: Sequence[int],
             w1: float, w2: float, expand_prompt: bool = True, greedy: bool = True,
             num_images: int = 4, seed: int = 0) -> Samples:
    """``num_images`` images for each of ``prompts`` (see the module docstring). ``identifiers``
    are 0-based reward columns; ``seed`` fixes the PEN's draws (if not greedy) and every
    diffusion noise."""
    m, c = loaded.models, loaded.config
    if num_images <= 0:
        raise RunError(f"--num-images {num_images}: must be positive")
    key_pen, key_images = jax.random.split(jax.random.key(seed))
    null = _clip_ids(m, [""], "null prompt")[0]
    original = _clip_ids(m, prompts, "prompt")
    if expand_prompt:
        expansions = expand(loaded, prompts, greedy=greedy, key=key_pen)
        prefix = identifier_prefix(identifiers)
        try:
            cond = tokenize_conditioning(m.clip_tokenizer, [prefix] * len(prompts), expansions,
                                         m.context_length)
        except ValueError as e:  # the identifiers alone do not fit the context
            raise RunError(f"--identifiers: {e}") from e
        conditions = cond["texts"]
        if w1 == 0:  # Eq. 5 without the original prompt is CFG on the expansion: one UNet
            # branch fewer (the plain-guidance ablation and the as-trained diagnostics)
            branches = np.stack([np.broadcast_to(null, original.shape), cond["input_ids"]],
                                axis=1)
            guidance = CFG(w2)
        else:
            branches = np.stack([np.broadcast_to(null, original.shape), original,
                                 cond["input_ids"]], axis=1)
            guidance = PromptCentredGuidance(w1, w2)
    else:
        expansions = [""] * len(prompts)
        branches = np.stack([np.broadcast_to(null, original.shape), original], axis=1)
        guidance, conditions = CFG(w1), list(prompts)
    images = _images(m.unet, m.text_encoder, m.vae, num_images, m.latent_shape,
                     float(c.sample.eta), m.scaling_factor, loaded.unet_params, m.text_params,
                     m.vae_params, m.schedule, guidance, branches, key_images)
    return Samples(np.asarray(images, np.float32), expansions, conditions)


# --- the command line ------------------------------------------------------------------------

def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``sample`` and ``evaluate``."""
    parser.add_argument("--workdir", required=True, help="a Parrot training workdir")
    parser.add_argument("--out", required=True, help="folder for the outputs (created)")
    parser.add_argument("--base", action="store_true", help="the untrained models")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint iteration (default: the latest)")
    parser.add_argument("--identifiers", default="all",
                        help="reward identifiers, 1-based and comma-separated ('1,3'), 'all' "
                        "(default) or 'none'")
    parser.add_argument("--w1", type=float, default=5.0,
                        help="guidance weight of the original prompt (Eq. 5; CFG weight with "
                        "--no-expand)")
    parser.add_argument("--w2", type=float, default=5.0,
                        help="guidance weight of the expanded prompt (Eq. 5)")
    parser.add_argument("--no-expand", action="store_true",
                        help="no PEN, no identifiers: plain CFG on the prompt")
    parser.add_argument("--pen-sample", action="store_true",
                        help="sample the expansion (the run's pen temperature / top-k / top-p) "
                        "instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of all sampling")


def identifiers_arg(parser: argparse.ArgumentParser, spec: str, num_rewards: int) -> list[int]:
    """``--identifiers`` -> 0-based columns; a bad spec exits with the parser's usage error."""
    if spec.strip().lower() == "none":
        return []
    try:
        return parse_identifiers(spec, num_rewards)
    except ValueError as e:
        parser.error(f"--identifiers: {e}")


def write_png(path: Path, image: np.ndarray) -> None:
    """``image`` ``[H, W, 3]`` in [0, 1] -> an 8-bit PNG."""
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parrot_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="the user's prompt")
    parser.add_argument("--num-images", type=int, default=4, help="images to draw")
    add_generation_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (without the program name), sample, write ``--out``; returns the
    ``samples.json`` record. Bad options and unusable workdirs exit with status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.base and args.step is not None:
        parser.error("--base and --step exclude each other")
    if args.num_images <= 0:
        parser.error(f"--num-images {args.num_images}: must be positive")
    if not args.prompt.strip():
        parser.error("--prompt is empty")
    try:
        (loaded,) = load_runs(args.workdir, step=args.step, base=args.base,
                              trained=not args.base)
    except RunError as e:
        parser.error(str(e))
    try:
        ids = identifiers_arg(parser, args.identifiers, len(loaded.models.rewards.names))
        samples = generate(loaded, [args.prompt], identifiers=ids, w1=args.w1, w2=args.w2,
                           expand_prompt=not args.no_expand, greedy=not args.pen_sample,
                           num_images=args.num_images, seed=args.seed)
    except RunError as e:
        parser.error(str(e))
    finally:
        loaded.models.rewards.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [f"{i:03d}.png" for i in range(args.num_images)]
    for name, image in zip(files, samples.images):
        write_png(out / name, image)
    record = {
        "workdir": str(args.workdir), "model": loaded.label, "prompt": args.prompt,
        "expand": not args.no_expand, "expansion": samples.expansions[0],
        "pen_decoding": "sample" if args.pen_sample else "greedy",
        "identifiers": [i + 1 for i in ids] if not args.no_expand else [],
        "conditioning_text": samples.conditions[0],
        "guidance": ({"w1": args.w1, "w2": args.w2} if not args.no_expand
                     else {"cfg": args.w1}),
        "num_steps": int(loaded.config.sample.num_steps), "eta": float(loaded.config.sample.eta),
        "seed": args.seed, "files": files,
    }
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(files)} images and samples.json to {out}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
