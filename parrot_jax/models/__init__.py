"""Flax linen modules, checkpoint-compatible with diffusers / transformers. No RL here."""

from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from parrot_jax.models.lora import LoRA, init_lora, merge
from parrot_jax.models.t5 import T5Cache, T5Config, T5ForConditionalGeneration, greedy_decode
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "CLIPVisionConfig", "CLIPVisionModel", "LoRA", "T5Cache", "T5Config",
    "T5ForConditionalGeneration", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
    "greedy_decode", "init_lora", "merge",
]
