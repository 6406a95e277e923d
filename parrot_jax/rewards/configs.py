"""The paper-scale reward set: public checkpoints by hub id, fetched on the user's machine.

Parrot's four rewards (docs/method.md), in the paper's order (aesthetics, human preference,
text-image alignment, sentiment), with public stand-ins where the paper's models are private:

- aesthetics: the LAION improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``, from
  its GitHub repository) on ``openai/clip-vit-large-patch14`` (paper: VILA-R, not public);
- human preference: ``yuvalkirstain/PickScore_v1`` with the processor / tokenizer of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as PickScore's own code loads it);
- alignment: CLIP score against the original prompt with ``openai/clip-vit-base-patch32``;
- sentiment: a 3-way probe on ViT-L/14 image embeddings, zero-shot by default (the paper's
  Serra et al. probe weights are unreleased) or from a safetensors file.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from parrot_jax.convert import CheckpointError
from parrot_jax.rewards.aesthetic import LAION_AESTHETIC_DIMS, Aesthetic
from parrot_jax.rewards.backbone import ClipBackbone
from parrot_jax.rewards.clip_heads import ClipScore, PickScore, Sentiment
from parrot_jax.rewards.jpeg import JpegCompressibility
from parrot_jax.rewards.reward_set import RewardSet

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_VIT_B32 = "openai/clip-vit-base-patch32"
LAION_AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
                       "main/sac%2Blogos%2Bava1-l14-linearMSE.pth")


@dataclasses.dataclass(frozen=True)
class ParrotRewardsConfig:
    """Where each reward's weights come from (folders, hub ids or, for files, URLs)."""

    aesthetic_clip: str = CLIP_VIT_L14  # CLIPModel the aesthetic MLP reads
    aesthetic_weights: str = LAION_AESTHETIC_URL  # the MLP's .pth: a local path or a URL
    aesthetic_dims: tuple[int, ...] | None = LAION_AESTHETIC_DIMS  # expected widths; None: any
    pickscore: str = PICKSCORE  # CLIPModel for human preference
    pickscore_processor: str | None = PICKSCORE_PROCESSOR  # its processor + tokenizer (None: own)
    clip_score: str = CLIP_VIT_B32  # CLIPModel for text-image alignment
    sentiment_clip: str = CLIP_VIT_L14  # CLIPModel the sentiment probe reads (shared if same)
    sentiment_weights: str | None = None  # safetensors probe (weight [3, P], bias [3]); None:
    # zero-shot from the default positive / neutral / negative descriptions
    jpeg: bool = False  # also add DDPO's JPEG compressibility (host side), last
    dtype: str = "float32"  # backbone activation dtype (bfloat16 on TPU); params stay float32


def fetch(path_or_url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file as is; a URL downloaded once into ``cache_dir`` (default
    ``~/.cache/parrot_jax``). Refused when ``HF_HUB_OFFLINE`` is set and it is not cached."""
    if "://" not in path_or_url:
        path = Path(path_or_url).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return path
    cache = Path(cache_dir or Path.home() / ".cache" / "parrot_jax").expanduser()
    target = cache / urllib.request.unquote(path_or_url.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"{path_or_url}: not in {cache} and HF_HUB_OFFLINE is set")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
        try:
            with urllib.request.urlopen(path_or_url) as response:  # noqa: S310 (a fixed URL)
                tmp.write(response.read())
        except OSError as e:
            os.unlink(tmp.name)
            raise CheckpointError(f"{path_or_url}: download failed: {e}") from e
    os.replace(tmp.name, target)
    return target


def build_parrot_rewards(config: ParrotRewardsConfig = ParrotRewardsConfig(), *,
                         sharding: Any = None, cache_dir: str | os.PathLike | None = None
                         ) -> RewardSet:
    """Load every backbone once (shared when two rewards name the same one) and the heads ->
    a ``RewardSet`` with names (aesthetics, human_preference, alignment, sentiment[, jpeg])."""
    dtype = jnp.dtype(config.dtype)
    zero_shot = config.sentiment_weights is None
    # (model, processor) of each reward, and whether a head on it reads text; each distinct
    # pair is loaded once, so rewards naming the same model share one backbone.
    uses = {"aesthetic": ((config.aesthetic_clip, None), False),
            "pick": ((config.pickscore, config.pickscore_processor), True),
            "align": ((config.clip_score, None), True),
            "sentiment": ((config.sentiment_clip, None), zero_shot)}
    wants_text: dict[tuple, bool] = {}
    for key, text in uses.values():
        wants_text[key] = wants_text.get(key, False) or text
    loaded = {key: ClipBackbone.load(_name(*key), key[0], processor=key[1], dtype=dtype,
                                     tokenizer=text) for key, text in wants_text.items()}
    aesthetic_clip, pick, align, sentiment_clip = (loaded[uses[k][0]] for k in
                                                   ("aesthetic", "pick", "align", "sentiment"))
    heads: list[Any] = [
        Aesthetic.from_pth(fetch(config.aesthetic_weights, cache_dir), aesthetic_clip,
                           dims=config.aesthetic_dims),
        PickScore(pick),
        ClipScore(align),
        Sentiment.zero_shot(sentiment_clip) if zero_shot else
        Sentiment.from_file(fetch(config.sentiment_weights, cache_dir), sentiment_clip),
    ]
    if config.jpeg:
        heads.append(JpegCompressibility())
    return RewardSet(heads, sharding=sharding)


def load_parrot_rewards(argument: str, *, sharding: Any = None,
                        dtype: str = "float32") -> RewardSet:
    """``config.model.rewards = 'parrot'``: ``build_parrot_rewards`` with the default checkpoints
    at ``dtype`` (registered in the ``parrot_jax.reward_sets`` entry-point group)."""
    if argument:
        raise ValueError(f"'parrot' takes no argument, got {argument!r}")
    return build_parrot_rewards(ParrotRewardsConfig(dtype=dtype), sharding=sharding)


def _name(path: str, processor: str | None) -> str:
    return path if processor is None else f"{path} (processor {processor})"
