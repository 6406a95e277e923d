"""Parrot RL on tiny RANDOM models: every part of the loop is real, nothing is downloaded.

The UNet, VAE, CLIP text encoder, reward CLIP, aesthetic MLP and T5 PEN are built in memory from
fixed seeds; a CLIP-style word-level tokenizer and a T5-style BPE are built offline from the
prompts (and saved in the workdir, so a resumed run reads the same vocabulary). The images mean
nothing, but the shapes, the sharding, the checkpoints and the metrics are those of a real run
(``configs/toy.py``, ``train.py``'s default, is the toy world with trained models). Every field
is defined and documented in ``parrot_jax/config.py``; this file sets the ones it changes.

Variants (``--config configs/tiny.py:ARG``, comma-separated):
  (none)        a few minutes on a laptop CPU.
  smoke         the CI size: 2 iterations, 2 groups x 8 images (divisible by 8 devices), 3
                DDIM steps, a one-level UNet and VAE (8 x 8 images) that compile fast.
  weighted_sum, single, t2i_only, pen_only, no_pareto   the paper's comparisons
                (``parrot_jax.config.PRESETS``), e.g. ``smoke,no_pareto``.
"""

import ml_collections

from parrot_jax import config as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = schema.variants(arg, ("smoke", *schema.PRESETS), "configs/tiny.py")
    c = schema.defaults()
    c.model.pretrained = "tiny"  # random UNet, VAE and CLIP text encoder of model.tiny's shapes
    c.model.pen = "tiny"  # a random T5 PEN
    c.model.rewards = "tiny"  # random CLIP reward heads
    c.data.max_prompt_length = 48  # PEN input tokens of a templated built-in prompt
    c.num_groups = 4  # G prompts per iteration
    c.images_per_group = 8  # N images per prompt: 32 per iteration
    c.num_minibatches = 2  # T2I optimiser steps per iteration (16 images each)
    c.num_iterations = 40
    c.sample.num_steps = 8  # DDIM steps
    c.pen.max_new_tokens = 12  # expansion tokens incl. EOS
    c.pen.learning_rate = 3e-4
    c.pen.lora_rank = 4
    c.pen.lora_alpha = 4.0
    c.checkpoint_every = 5
    c.max_to_keep = 2
    c.eval_every = 5
    c.eval_prompts = ("a castle on a hill", "a bowl of fruit on a table")  # grid rows (<= G)
    if "smoke" in parts:  # one resolution level: compiles in half the time
        c.model.tiny.unet.block_out_channels = (32,)
        c.model.tiny.unet.down_block_types = ("CrossAttnDownBlock2D",)
        c.model.tiny.unet.up_block_types = ("CrossAttnUpBlock2D",)
        c.model.tiny.vae.block_out_channels = (16,)  # no downsampling: 8 x 8 images
        c.model.tiny.vae.down_block_types = ("DownEncoderBlock2D",)
        c.model.tiny.vae.up_block_types = ("UpDecoderBlock2D",)
        c.num_groups = 2
        c.images_per_group = 8
        c.num_minibatches = 2
        c.num_iterations = 2
        c.sample.num_steps = 3
        c.checkpoint_every = 2
        c.eval_every = 2
    schema.apply_presets(c, parts)
    return c
