"""The toy world's shipped models: where they live, how they load, and their manifest.

``python -m parrot_jax.toyworld.build`` writes, under ``ASSETS`` (or ``--out``)::

    pipeline/                  a diffusers Stable Diffusion folder (unet, vae, text_encoder,
                               tokenizer, scheduler): config.model.pretrained
    pen/                       a transformers T5 folder + tokenizer: config.model.pen
    rewards/clip/              the toy CLIP (transformers CLIPModel) + its tokenizer
    rewards/preference/        its PickScore-style fine-tuned copy (CLIPModel)
    rewards/aesthetic.safetensors   the aesthetic MLP (LAION layout: layers.<i>.weight / bias)
    rewards/sentiment.safetensors   the sentiment probe (weight [3, P], bias [3])
    prompts.txt                the RL training prompts (user prompts)
    heldout_prompts.txt        prompts never used in RL: the final evaluation's
    manifest.json              the build config and its hash, each model's metrics at build
                               time, every file's SHA-256

Every model is one of the package's own module classes, loaded through the same hub loaders as
the real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
MANIFEST = "manifest.json"
PIPELINE, PEN, REWARDS = "pipeline", "pen", "rewards"
PROMPTS, HELDOUT = "prompts.txt", "heldout_prompts.txt"


class AssetError(ValueError):
    """Missing, altered or unreadable toy-world assets (the message names the file)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(build_config: dict[str, Any]) -> str:
    """SHA-256 of the build config's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(build_config, sort_keys=True).encode()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` but the manifest."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(root: str | Path = ASSETS) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise AssetError(f"{path}: missing; build the toy world with "
                         "`python -m parrot_jax.toyworld.build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def verify(root: str | Path = ASSETS) -> dict[str, Any]:
    """The manifest, after checking it against the files: the config hash, and every file's
    presence and SHA-256 (and no unlisted file). Raises ``AssetError`` listing the problems."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    if config_hash(manifest["build_config"]) != manifest["config_hash"]:
        problems.append("the build config does not match its recorded hash")
    found = file_hashes(root)
    for name, digest in manifest["files"].items():
        if name not in found:
            problems.append(f"{name}: missing")
        elif found[name] != digest:
            problems.append(f"{name}: contents differ from the manifest (SHA-256 {found[name]})")
    problems += [f"{name}: not in the manifest" for name in found if name not in
                 manifest["files"]]
    if problems:
        raise AssetError(f"{root / MANIFEST}: " + "; ".join(problems))
    return manifest


def load_rewards(root: str | Path = ASSETS, *, sharding: Any = None,
                 dtype: Any = "float32") -> Any:
    """The toy ``RewardSet`` (aesthetics, human_preference, alignment, sentiment) from
    ``root/rewards``: every head on the toy CLIP, human preference on its fine-tuned copy."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from parrot_jax import hub
    from parrot_jax.rewards import Sentiment
    from parrot_jax.rewards.aesthetic import mlp_from_state_dict
    from parrot_jax.toyworld.heads_train import build_reward_set

    folder = Path(root) / REWARDS
    for part in ("clip", "preference", "aesthetic.safetensors", "sentiment.safetensors"):
        if not (folder / part).exists():
            raise AssetError(f"{folder / part}: missing (toy reward assets)")
    clip, params = hub.load_clip(folder / "clip", dtype=jnp.dtype(dtype))
    _, pick = hub.load_clip(folder / "preference", dtype=jnp.dtype(dtype))
    tokenizer = hub.load_tokenizer(folder / "clip")
    path = folder / "aesthetic.safetensors"
    aesthetic = mlp_from_state_dict(load_file(str(path)), str(path), dims=None)
    probe = Sentiment.read_probe(folder / "sentiment.safetensors", clip.config.projection_dim,
                                 "toy_clip")
    return build_reward_set(clip, params, tokenizer, aesthetic=aesthetic, sentiment=probe,
                            pickscore_params=pick, sharding=sharding)


def reward_set(argument: str, *, sharding: Any = None, dtype: Any = "float32") -> Any:
    """``config.model.rewards = 'toy'`` (the shipped assets) or ``'toy:<assets folder>'``:
    ``load_rewards`` as the ``parrot_jax.reward_sets`` entry point ``toy``."""
    return load_rewards(argument or ASSETS, sharding=sharding, dtype=dtype)


def read_prompt_file(root: str | Path, name: str) -> list[str]:
    from parrot_jax.data.promptist import read_prompts

    path = Path(root) / name
    if not path.is_file():
        raise AssetError(f"{path}: missing (toy prompts)")
    return read_prompts(path)
