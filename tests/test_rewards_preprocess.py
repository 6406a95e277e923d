"""CLIP preprocessing in JAX against transformers' CLIPImageProcessor (its PIL backend).

The reference works on uint8 images and rounds to 8 bits after each of PIL's two resize passes;
ours works in float and does not. On ``uint8 / 255`` inputs the difference is bounded by about
one 8-bit level: <= 0.5 level from the final rounding plus <= 0.5 level from the intermediate
one carried through the second pass (kernel weights sum to 1 with small negative lobes), which
we hold to 1.1 levels (measured max 0.99), with a mean under 0.4 levels (measured ~0.3).
"""

import json

import jax
import numpy as np
import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from parrot_jax.models.config import ConfigError
from parrot_jax.rewards import ImageProcessorConfig, preprocess

MAX_LEVELS, MEAN_LEVELS = 1.1, 0.4


def smooth_image(h, w, seed):
    """A natural-looking image: smooth gradients plus a sharp-edged rectangle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(2, 8, 3)
    img = np.stack([0.5 + 0.4 * np.sin(f[0] * xx + 1), 0.5 + 0.4 * np.cos(f[1] * yy),
                    0.5 + 0.3 * np.sin(f[2] * (xx + yy))], -1)
    img[h // 3:h // 2, w // 4:w // 2] = rng.uniform(0, 1, 3)
    return img


def reference(u8, processor):
    out = processor(images=list(u8), return_tensors="np")["pixel_values"]
    return np.transpose(out, (0, 2, 3, 1))  # NCHW -> NHWC


@pytest.fixture(scope="module")
def processor_and_config(tmp_path_factory):
    """A processor written by save_pretrained and read back by our config reader."""
    folder = tmp_path_factory.mktemp("processor")
    CLIPImageProcessorPil(size={"shortest_edge": 24},
                          crop_size={"height": 24, "width": 24}).save_pretrained(folder)
    return (CLIPImageProcessorPil.from_pretrained(folder),
            ImageProcessorConfig.from_file(folder / "preprocessor_config.json"))


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (100, 60), (20, 20), (17, 29)])
def test_matches_clip_image_processor(processor_and_config, shape):
    """Shrinking (square, wide, tall) and enlarging (20 -> 24, odd sizes), noise and smooth."""
    processor, config = processor_and_config
    h, w = shape
    rng = np.random.default_rng(h * w)
    images = np.stack([rng.random((h, w, 3)), smooth_image(h, w, 1), smooth_image(h, w, 2)])
    u8 = np.round(images * 255).astype(np.uint8)
    ref = reference(u8, processor)
    ours = np.asarray(jax.jit(preprocess, static_argnums=1)(u8.astype(np.float32) / 255, config))
    assert ours.shape == ref.shape == (3, 24, 24, 3)
    levels = np.abs(ours - ref) * np.asarray(config.std) * 255  # back to 8-bit levels
    assert levels.max() <= MAX_LEVELS, levels.max()
    assert levels.mean() <= MEAN_LEVELS, levels.mean()


def test_exact_without_resize(processor_and_config):
    """Short side already 24: only the centre crop (transformers' rounding) and normalisation."""
    processor, config = processor_and_config
    u8 = np.random.default_rng(0).integers(0, 256, (2, 24, 31, 3)).astype(np.uint8)
    ours = np.asarray(preprocess(u8.astype(np.float32) / 255, config))
    np.testing.assert_allclose(ours, reference(u8, processor), atol=2e-6, rtol=0)


def test_clips_out_of_range_inputs(processor_and_config):
    _, config = processor_and_config
    x = np.random.default_rng(0).random((1, 24, 24, 3)).astype(np.float32)
    wild = x * 3 - 1
    np.testing.assert_array_equal(np.asarray(preprocess(wild, config)),
                                  np.asarray(preprocess(np.clip(wild, 0, 1), config)))


def test_config_reading_and_errors(tmp_path):
    config = ImageProcessorConfig.from_dict(
        {"size": 224, "crop_size": 224, "image_processor_type": "CLIPImageProcessor"}, "p")
    assert config == ImageProcessorConfig()
    assert config.output_size(512, 768) == (224, 224) and config.resized_size(512, 768) == \
        (224, 336)
    exact = ImageProcessorConfig.from_dict({"size": {"height": 32, "width": 32},
                                            "do_center_crop": False}, "p")
    assert exact.output_size(50, 70) == (32, 32)
    with pytest.raises(ConfigError, match=r"p: resample=0 \(unsupported"):
        ImageProcessorConfig.from_dict({"resample": 0}, "p")
    with pytest.raises(ConfigError, match="size=.*expected an int"):
        ImageProcessorConfig.from_dict({"size": {"longest_edge": 3}}, "p")
    with pytest.raises(ConfigError, match="image_std=.*three positive numbers"):
        ImageProcessorConfig.from_dict({"image_std": [0.2, 0.0, 0.3]}, "p")
    bad = tmp_path / "preprocessor_config.json"
    bad.write_text('{"size": 224,\n "crop_size": }')
    with pytest.raises(ConfigError, match="preprocessor_config.json: invalid JSON at line 2"):
        ImageProcessorConfig.from_file(bad)
    (tmp_path / "ok.json").write_text(json.dumps({"size": {"shortest_edge": 8},
                                                  "crop_size": {"height": 8, "width": 8}}))
    small = ImageProcessorConfig.from_file(tmp_path / "ok.json")
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        preprocess(np.zeros((2, 3, 8, 8), np.float32), small)
    crop_big = ImageProcessorConfig(shortest_edge=None, crop=(8, 8))
    with pytest.raises(ValueError, match="centre crop .* is larger than the resized image"):
        preprocess(np.zeros((1, 6, 6, 3), np.float32), crop_big)
