"""Reward heads and the reward set that evaluates them in one jitted call (docs/method.md)."""

from parrot_jax.rewards.aesthetic import (
    LAION_AESTHETIC_DIMS,
    Aesthetic,
    aesthetic_mlp,
    mlp_from_state_dict,
)
from parrot_jax.rewards.backbone import ClipBackbone, Tokens
from parrot_jax.rewards.base import Features, HostReward, Reward, RewardInputs
from parrot_jax.rewards.clip_heads import (
    SENTIMENT_CLASSES,
    SENTIMENT_DESCRIPTIONS,
    ClipScore,
    PickScore,
    Sentiment,
)
from parrot_jax.rewards.configs import ParrotRewardsConfig, build_parrot_rewards
from parrot_jax.rewards.jpeg import JpegCompressibility, jpeg_sizes_kb
from parrot_jax.rewards.preprocess import ImageProcessorConfig, preprocess
from parrot_jax.rewards.pth import load_state_dict
from parrot_jax.rewards.reward_set import PendingRewards, RewardSet

__all__ = [
    "LAION_AESTHETIC_DIMS", "SENTIMENT_CLASSES", "SENTIMENT_DESCRIPTIONS", "Aesthetic",
    "ClipBackbone", "ClipScore", "Features", "HostReward", "ImageProcessorConfig",
    "JpegCompressibility", "ParrotRewardsConfig", "PendingRewards", "PickScore", "Reward",
    "RewardInputs", "RewardSet", "Sentiment", "Tokens", "aesthetic_mlp", "build_parrot_rewards",
    "jpeg_sizes_kb", "load_state_dict", "mlp_from_state_dict", "preprocess",
]
