"""Build every toy-world asset: ``python -m parrot_jax.toyworld.build [--out DIR] [--seed S]``.

Stages, in order (each a trainer of this package, seeded from ``--seed``):

1. tokenizers: the word-level CLIP tokenizer (with ``<reward k>`` tokens) and the PEN's BPE;
2. the toy CLIP dual encoder (contrastive on rendered images and captions);
3. the reward heads on it: aesthetic MLP, sentiment probe, PickScore-style preference copy;
4. the PEN (T5, through the PEN SFT code) on the prompt engineer's (prompt -> expansion) pairs;
5. the VAE (32x32x3 <-> 8x8x4);
6. the UNet, conditioned on the CLIP's text tower (frozen), as SD is;
7. the folders of ``parrot_jax.toyworld.assets`` (diffusers / transformers layouts), the RL and
   held-out prompt files, and ``manifest.json`` (build config, its hash, every model's metrics,
   every file's SHA-256, the seconds each stage took).

The defaults are the shipped build (about an hour on 2 CPU cores); ``--quick`` shrinks every
stage to a few steps (a check of the pipeline, not useful models). The output folder must be
new or empty (``--overwrite`` replaces an earlier build's files).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parrot_jax.toyworld import assets
from parrot_jax.toyworld.clip_train import ClipTrainConfig
from parrot_jax.toyworld.heads_train import HeadsTrainConfig
from parrot_jax.toyworld.pen_train import PenTrainConfig
from parrot_jax.toyworld.unet_train import UNetTrainConfig
from parrot_jax.toyworld.vae_train import VAETrainConfig


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the assets (recorded and hashed in the manifest)."""

    seed: int = 0
    clip: ClipTrainConfig = ClipTrainConfig()
    heads: HeadsTrainConfig = HeadsTrainConfig()
    pen: PenTrainConfig = PenTrainConfig()
    vae: VAETrainConfig = VAETrainConfig()
    unet: UNetTrainConfig = UNetTrainConfig()
    heldout_pairs: int = 10  # (colour, shape) pairs kept out of the RL prompts
    pen_vocab_size: int = 512  # BPE pieces of the PEN tokenizer
    dtype: str = "float32"  # storage dtype of the shipped weights

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        """A few steps per stage: exercises the whole build in a couple of minutes."""
        return cls(
            seed=seed,
            clip=dataclasses.replace(ClipTrainConfig(), steps=3, batch_size=32, warmup_steps=1,
                                     eval_size=32, log_every=0),
            heads=dataclasses.replace(HeadsTrainConfig(), num_images=64, eval_images=32,
                                      embed_batch=32, probe_steps=3, probe_batch=32,
                                      preference_steps=2, preference_batch=8,
                                      preference_warmup=1, eval_pairs=16, log_every=0),
            pen=_quick(PenTrainConfig()),
            vae=_quick(VAETrainConfig()),
            unet=_quick(UNetTrainConfig()))


def _quick(config: Any) -> Any:
    """``config`` with its step and size fields cut to a few (the fields each trainer has)."""
    small = {"steps": 3, "batch_size": 16, "eval_size": 16, "eval_images": 16, "log_every": 0,
             "warmup_steps": 1, "num_pairs": 64, "heldout_pairs": 16, "train_images": 64,
             "eval_captions": 16, "encode_batch_size": 32, "eval_prompts": 2,
             "sample_steps": 2, "eval_batch_size": 16}
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in small.items() if k in fields})


def _plain(value: Any) -> Any:
    """A dataclass tree as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def split_prompts(seed: int, heldout_pairs: int) -> tuple[list[str], list[str]]:
    """(RL prompts, held-out prompts): ``heldout_pairs`` random (colour, shape) pairs are held
    out, each as its plain user prompt and on one random background; every other pair gives
    its plain prompt and one prompt per background to RL."""
    from parrot_jax.toyworld import captions, world

    rng = np.random.default_rng([seed, 99])
    pairs = [(c, s) for c in world.ATTRIBUTES["colour"] for s in world.ATTRIBUTES["shape"]]
    if not 0 < heldout_pairs < len(pairs):
        raise ValueError(f"heldout_pairs={heldout_pairs}: between 1 and {len(pairs) - 1}")
    held = {pairs[i] for i in rng.permutation(len(pairs))[:heldout_pairs]}
    train, heldout = [], []
    for colour, shape in pairs:
        texts = []
        backgrounds = world.ATTRIBUTES["background"]
        if (colour, shape) in held:
            backgrounds = (backgrounds[rng.integers(len(backgrounds))],)
        for background in (None,) + backgrounds:
            fixed = {"colour": colour, "shape": shape, "background": background or "black"}
            scenes = world.sample_scenes(rng, 1, fixed)
            texts += captions.user_prompts(scenes, rng, p_background=float(bool(background)))
        (heldout if (colour, shape) in held else train).extend(texts)
    return train, heldout


def _stage(name: str, seconds: dict[str, float], fn, *args, **kwargs):
    print(f"[build] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = round(time.perf_counter() - start, 1)
    print(f"[build] {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    return out


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.isscalar(v)}


def build(config: BuildConfig, out: str | Path) -> dict[str, Any]:
    """Train every model and write the assets to ``out`` (see the module docstring); returns
    the manifest. Writes into a temporary sibling folder first and moves it into place at the
    end, so a failed build leaves ``out`` as it was."""
    import jax
    from safetensors.numpy import save_file

    from parrot_jax import export
    from parrot_jax.toyworld import (
        clip_train,
        heads_train,
        pen_train,
        tokenizers,
        unet_train,
        vae_train,
    )

    out = Path(out)
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    seed = config.seed
    clip_tok = _stage("tokenizers", seconds, tokenizers.clip_tokenizer)
    pen_tok = tokenizers.pen_tokenizer(config.pen_vocab_size, seed)
    clip, clip_params, metrics["clip"] = _stage("clip", seconds, clip_train.train_clip,
                                                config.clip, clip_tok, seed)
    _, heads, metrics["heads"] = _stage("heads", seconds, heads_train.train_heads,
                                        config.heads, clip, clip_params, clip_tok, seed)
    pen, pen_params, metrics["pen"] = _stage("pen", seconds, pen_train.train_pen, config.pen,
                                             pen_tok, seed)
    vae, vae_params, metrics["vae"] = _stage("vae", seconds, vae_train.train_vae, config.vae,
                                             seed)
    text, text_params = clip_train.text_encoder(clip, clip_params)
    unet, unet_params, metrics["unet"] = _stage(
        "unet", seconds, unet_train.train_unet, config.unet, vae, vae_params, text, text_params,
        clip_tok, seed)
    train_prompts, heldout = split_prompts(seed, config.heldout_pairs)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toyworld-build-", dir=out.parent))
    try:
        dtype = config.dtype
        ids = dict(bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id)
        export.save_pipeline(staging / assets.PIPELINE, unet=unet, unet_params=unet_params,
                             vae=vae, vae_params=vae_params, text_encoder=text,
                             text_params=text_params, tokenizer=clip_tok,
                             scheduler_config=config.unet.scheduler_config, dtype=dtype)
        export.save_t5(staging / assets.PEN, pen, pen_params, dtype=dtype)
        pen_tok.save_pretrained(staging / assets.PEN)
        rewards = staging / assets.REWARDS
        export.save_clip(rewards / "clip", clip, clip_params, dtype=dtype, **ids)
        clip_tok.save_pretrained(rewards / "clip")
        export.save_clip(rewards / "preference", clip, heads["pickscore"], dtype=dtype, **ids)
        save_file({f"layers.{i}.{part}": np.ascontiguousarray(
            np.asarray(layer["kernel"], np.float32).T if part == "weight"
            else np.asarray(layer["bias"], np.float32))
            for i, layer in enumerate(heads["aesthetic"]) for part in ("weight", "bias")},
            str(rewards / "aesthetic.safetensors"))
        save_file({k: np.asarray(v, np.float32) for k, v in heads["sentiment"].items()},
                  str(rewards / "sentiment.safetensors"))
        (staging / assets.PROMPTS).write_text("\n".join(train_prompts) + "\n")
        (staging / assets.HELDOUT).write_text("\n".join(heldout) + "\n")
        build_config = _plain(config)
        manifest = {
            "build_config": build_config,
            "config_hash": assets.config_hash(build_config),
            "metrics": {k: _floats(v) for k, v in metrics.items()},
            "seconds": seconds,
            "environment": {"python": platform.python_version(), "jax": jax.__version__,
                            "backend": jax.default_backend(),
                            "devices": jax.device_count()},
            "files": assets.file_hashes(staging),
        }
        (staging / assets.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


PROG = "python -m parrot_jax.toyworld.build"


def _define(values: Any, argv: list[str]) -> None:
    from absl import flags

    flags.DEFINE_string("out", str(assets.ASSETS), "asset folder to write", flag_values=values)
    flags.DEFINE_integer("seed", 0, "seed of every stage", flag_values=values)
    flags.DEFINE_bool("quick", False, "a few steps per stage", flag_values=values)
    flags.DEFINE_bool("overwrite", False, "replace an existing build in --out",
                      flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from parrot_jax import cli

    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        cli.fail(PROG, f"--out {out}: not empty; pass --overwrite to replace it")
    config = BuildConfig.quick(args.seed) if args.quick else BuildConfig(seed=args.seed)
    start = time.perf_counter()
    manifest = build(config, out)
    print(json.dumps({"metrics": manifest["metrics"], "seconds": manifest["seconds"]},
                     indent=2))
    print(f"[build] wrote {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    from parrot_jax import cli

    cli.entry_point(main)
