"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny diffusers configs in the shape of the real ones (kwargs of the torch constructors).
SD1_LIKE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)
# SD 2.x traits: linear projections, per-block head counts, upcast attention; plus a deeper
# transformer, a mid block with three levels and a non-default freq_shift.
SD2_LIKE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=[2, 4, 8], use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8, transformer_layers_per_block=[1, 2, 1],
    flip_sin_to_cos=False, freq_shift=1,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=16,
)


def perturbed(model, seed: int = 0):
    """Random non-zero weights everywhere (diffusers zero-initialises some output convs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _saved(tmp_path_factory, name: str, cls_name: str, config: dict):
    import diffusers

    model = perturbed(getattr(diffusers, cls_name)(**config))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def sd1_unet(tmp_path_factory):
    """(torch model, folder written by save_pretrained) for an SD-1-like tiny UNet."""
    return _saved(tmp_path_factory, "sd1_unet", "UNet2DConditionModel", SD1_LIKE_UNET)


@pytest.fixture(scope="session")
def sd2_unet(tmp_path_factory):
    return _saved(tmp_path_factory, "sd2_unet", "UNet2DConditionModel", SD2_LIKE_UNET)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return _saved(tmp_path_factory, "vae", "AutoencoderKL", TINY_VAE)


def nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))
