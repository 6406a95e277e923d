"""Flax linen modules, checkpoint-compatible with diffusers / transformers. No RL here."""

from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "UNet2DConditionModel", "UNetConfig", "VAEConfig"]
