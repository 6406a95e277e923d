"""Full-size SD 1.5 / 2.1 UNets and VAE: every PyTorch key maps to exactly one of our params.

The reference models are built on torch's ``meta`` device (keys and shapes, no memory); ours are
traced with ``jax.eval_shape``. ``plan_conversion`` raises on any missing, unexpected, duplicate
or mis-shaped key, so a passing plan covers both directions.
"""

import math

import jax
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict

from parrot_jax import architectures
from parrot_jax.convert import plan_conversion
from parrot_jax.hub import clip_tower_key_fn
from parrot_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig

# unet/config.json of stable-diffusion-v1-5 (as the planner ships it) and of
# stable-diffusion-2-1 (768, v-prediction).
SD15_UNET = architectures.SD15["unet"]
SD21_UNET = dict(
    SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
    sample_size=96, use_linear_projection=True, upcast_attention=True,
)
SD_VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=768,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)


def _torch_shapes(cls, config):
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _our_shapes(module):
    tree = jax.eval_shape(module.init_params, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}


@pytest.mark.parametrize("name,config,n_params", [("sd15", SD15_UNET, 859_520_964),
                                                   ("sd21", SD21_UNET, 865_910_724)])
def test_unet_keys_cover_full_size(name, config, n_params):
    ref = _torch_shapes(TorchUNet, config)
    ours = _our_shapes(UNet2DConditionModel(UNetConfig.from_diffusers(config)))
    plan = plan_conversion(ref, ours, source=name)
    assert len(plan) == len(ref) == len(ours)
    assert {p for p, _ in plan.values()} == set(ours)
    # Spot-check the names and layouts other code (LoRA / trainable regexes) relies on.
    attn2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert plan[attn2] == (("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2",
                            "key", "kernel"), "transpose")
    assert plan["conv_in.weight"] == (("conv_in", "kernel"), "conv")
    proj = "mid_block.attentions.0.proj_in.weight"
    assert plan[proj][1] == ("transpose" if config.get("use_linear_projection") else "conv")
    assert sum(math.prod(s) for s in ours.values()) == n_params  # the published counts


def test_vae_keys_cover_full_size():
    ref = _torch_shapes(TorchVAE, SD_VAE)
    ours = _our_shapes(AutoencoderKL(VAEConfig.from_diffusers(SD_VAE)))
    plan = plan_conversion(ref, ours, source="sd-vae")
    assert len(plan) == len(ref) == len(ours)
    assert plan["encoder.mid_block.attentions.0.to_q.weight"][0] == (
        "encoder", "mid_block", "attentions_0", "query", "kernel")
    assert sum(math.prod(s) for s in ours.values()) == 83_653_863


# CLIP towers of the reward backbones and SD's text encoders (transformers config values).
def _clip(text, vision, dim):
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    t = dict(zip(keys, text[:4]), hidden_act=text[4], max_position_embeddings=77)
    v = dict(zip(keys, vision[:4]), hidden_act=vision[4], patch_size=vision[5], image_size=224)
    return {"model_type": "clip", "text_config": t, "vision_config": v, "projection_dim": dim}


VIT_L14 = _clip((768, 3072, 12, 12, "quick_gelu"), (1024, 4096, 24, 16, "quick_gelu", 14), 768)
VIT_H14 = _clip((1024, 4096, 24, 16, "gelu"), (1280, 5120, 32, 16, "gelu", 14), 1024)
VIT_B32 = _clip((512, 2048, 12, 8, "quick_gelu"), (768, 3072, 12, 12, "quick_gelu", 32), 512)


@pytest.mark.parametrize("name,config,n_params", [
    ("clip-vit-large-patch14", VIT_L14, 427_616_513),
    ("CLIP-ViT-H-14 / PickScore", VIT_H14, 986_109_441),
    ("clip-vit-base-patch32", VIT_B32, 151_277_313),
])
def test_clip_keys_cover_full_size(name, config, n_params):
    import transformers

    ref_config = transformers.CLIPConfig(text_config=config["text_config"],
                                         vision_config=config["vision_config"],
                                         projection_dim=config["projection_dim"])
    with torch.device("meta"):
        ref = transformers.CLIPModel(ref_config)
    ref = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = _our_shapes(CLIPModel(CLIPConfig.from_transformers(config, name)))
    plan = plan_conversion(ref, ours, source=name)
    assert len(plan) == len(ref) == len(ours)
    assert sum(math.prod(s) for s in ours.values()) == n_params
    assert plan["vision_model.embeddings.patch_embedding.weight"][1] == "conv"
    assert plan["logit_scale"] == (("logit_scale",), "identity")


@pytest.mark.parametrize("name,text,n_params", [
    ("SD 1.5 text encoder", dict(VIT_L14["text_config"], projection_dim=768), 123_060_480),
    # SD 2.x: OpenCLIP ViT-H's text tower less its last layer.
    ("SD 2.1 text encoder", dict(VIT_H14["text_config"], num_hidden_layers=23,
                                 projection_dim=512), 340_387_840),
])
def test_sd_text_encoder_keys_cover_full_size(name, text, n_params):
    """SD's ``text_encoder`` is a bare CLIPTextModel: transformers 5 names it without the
    ``text_model.`` prefix, older files with it; both map through ``clip_tower_key_fn``."""
    import transformers

    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    ref = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = _our_shapes(CLIPTextModel(CLIPTextConfig.from_transformers(text, name)))
    key_fn = clip_tower_key_fn("text_model")
    plan = plan_conversion(ref, ours, source=name, key_fn=key_fn)
    prefixed = {f"text_model.{k}": s for k, s in ref.items()}
    assert plan_conversion(prefixed, ours, source=name, key_fn=key_fn).keys() == prefixed.keys()
    assert len(plan) == len(ref) == len(ours)
    assert sum(math.prod(s) for s in ours.values()) == n_params
