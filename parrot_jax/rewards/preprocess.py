"""CLIP image preprocessing in JAX: what transformers' ``CLIPImageProcessor`` does, on device.

The reference (``CLIPImageProcessor``'s PIL backend, what CLIP / PickScore were trained with)
resizes the shortest side with PIL bicubic (antialiased when shrinking), centre-crops, rescales
and normalises with CLIP's mean / std. Here the resize is ``jax.image.resize`` (Keys cubic,
a = -0.5, the kernel PIL uses, widened when shrinking), done as PIL does it: the width first,
then the height, clipping to the valid range after each pass. PIL works on ``uint8`` images
and rounds after each pass; we do not round, so on images given as ``uint8 / 255`` the two
differ by at most about one 8-bit level per pixel (measured: <= 0.99 levels, mean ~0.3
levels, over smooth and noise images, shrinking and enlarging; tests/test_rewards_preprocess.py
holds it to <= 1.1 levels). In normalised units that is <= 1.1 / (255 * min(std)) ~ 0.017.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp

from parrot_jax.models.config import ConfigError, ConfigReader, is_positive_int

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes we implement -> jax.image.resize methods (same kernels, antialiased).
RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of a ``preprocessor_config.json`` that change pixels (CLIP's defaults)."""

    shortest_edge: int | None = 224  # resize so the short side has this many pixels (None: no)
    resize_to: tuple[int, int] | None = None  # or resize to exactly (height, width)
    crop: tuple[int, int] | None = (224, 224)  # centre crop (height, width); None: no crop
    resample: int = 3  # PIL code: 3 bicubic (CLIP), 2 bilinear
    # Applied to pixels in [0, 255]: x * rescale_factor (1/255: back to [0, 1]); None: no rescale.
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # per channel; None: no normalisation
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    @classmethod
    def square(cls, size: int) -> ImageProcessorConfig:
        """CLIP's recipe for a backbone of ``size`` pixels: short side -> size, centre crop."""
        return cls(shortest_edge=size, crop=(size, size))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str) -> ImageProcessorConfig:
        """A transformers ``preprocessor_config.json`` dict; unsupported settings raise."""
        r = ConfigReader(config, source)
        r.get("image_processor_type", "CLIPImageProcessor",
              lambda v: isinstance(v, str) and v.startswith("CLIPImageProcessor"),
              "only CLIPImageProcessor is implemented")
        do_resize = r.get("do_resize", True, lambda v: isinstance(v, bool), "a bool")
        size = r.get("size", {"shortest_edge": 224})
        shortest, exact = None, None
        if do_resize:
            if is_positive_int(size):  # legacy: an int means the shortest edge
                shortest = size
            elif isinstance(size, dict) and set(size) == {"shortest_edge"} \
                    and is_positive_int(size["shortest_edge"]):
                shortest = size["shortest_edge"]
            elif isinstance(size, dict) and set(size) == {"height", "width"} \
                    and all(is_positive_int(v) for v in size.values()):
                exact = (size["height"], size["width"])
            else:
                r.problems.append(f"size={size!r} (expected an int, {{'shortest_edge': n}} or "
                                  "{'height': h, 'width': w})")
        do_crop = r.get("do_center_crop", True, lambda v: isinstance(v, bool), "a bool")
        crop = r.get("crop_size", {"height": 224, "width": 224})
        if do_crop:
            if is_positive_int(crop):
                crop = (crop, crop)
            elif isinstance(crop, dict) and set(crop) == {"height", "width"} \
                    and all(is_positive_int(v) for v in crop.values()):
                crop = (crop["height"], crop["width"])
            else:
                r.problems.append(f"crop_size={crop!r} (expected an int or height/width)")
                crop = None
        else:
            crop = None
        resample = r.require("resample", tuple(RESAMPLE), default=3)
        do_rescale = r.get("do_rescale", True, lambda v: isinstance(v, bool), "a bool")
        factor = r.get("rescale_factor", 1 / 255,
                       lambda v: isinstance(v, (int, float)) and v > 0, "positive")
        do_norm = r.get("do_normalize", True, lambda v: isinstance(v, bool), "a bool")
        mean = r.get("image_mean", list(OPENAI_CLIP_MEAN), _three_floats, "three numbers")
        std = r.get("image_std", list(OPENAI_CLIP_STD),
                    lambda v: _three_floats(v) and all(x > 0 for x in v), "three positive numbers")
        r.get("do_convert_rgb", True)  # our images are RGB already
        r.finish(allow_unknown=True)  # processor_class, feature_extractor_type ... change nothing
        return cls(shortest_edge=shortest, resize_to=exact, crop=crop, resample=resample,
                   rescale_factor=factor if do_rescale else None,
                   mean=tuple(mean) if do_norm else None, std=tuple(std) if do_norm else None)

    @classmethod
    def from_file(cls, path: Any) -> ImageProcessorConfig:
        """Read a ``preprocessor_config.json`` (JSON errors name the file and line)."""
        try:
            config = json.loads(open(path).read())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}") from e
        return cls.from_dict(config, str(path))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) ``preprocess`` returns for an input of this size."""
        h, w = self.resized_size(height, width)
        return self.crop if self.crop is not None else (h, w)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' rule: the short side becomes ``shortest_edge``, the long side
        ``int(shortest_edge * long / short)`` (truncated)."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        s = self.shortest_edge
        if height <= width:
            return s, int(s * width / height)
        return int(s * height / width), s


def _three_floats(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 3 \
        and all(isinstance(x, (int, float)) for x in v)


def preprocess(images: jax.Array, config: ImageProcessorConfig) -> jax.Array:
    """images ``[B, H, W, 3]`` in [0, 1] (clipped to it) -> ``pixel_values [B, h, w, 3]``
    float32, resized, centre-cropped and normalised as ``config`` says (NHWC)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (NHWC, RGB); got {images.shape}")
    b, height, width, c = images.shape
    x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
    new_h, new_w = config.resized_size(height, width)
    method = RESAMPLE[config.resample]
    if new_w != width:  # PIL: the horizontal pass first, clipped to the pixel range
        x = jnp.clip(jax.image.resize(x, (b, height, new_w, c), method, antialias=True), 0, 1)
    if new_h != height:
        x = jnp.clip(jax.image.resize(x, (b, new_h, new_w, c), method, antialias=True), 0, 1)
    if config.crop is not None:
        ch, cw = config.crop
        if ch > new_h or cw > new_w:
            raise ValueError(f"centre crop {config.crop} is larger than the resized image "
                             f"{(new_h, new_w)} (input {(height, width)}); padding is not "
                             "implemented")
        top, left = (new_h - ch) // 2, (new_w - cw) // 2  # transformers' rounding
        x = x[:, top:top + ch, left:left + cw]
    x = x * 255.0 * (config.rescale_factor if config.rescale_factor is not None else 1.0)
    if config.mean is not None:
        x = (x - jnp.asarray(config.mean, jnp.float32)) / jnp.asarray(config.std, jnp.float32)
    return x
