"""Parrot in the toy world: the default of ``train.py``, a few minutes on a laptop CPU.

Every model is the toy world's own, shipped in ``parrot_jax/toyworld/assets`` and loaded through
the same code as real checkpoints: a latent-diffusion UNet on 8x8x4 VAE latents of 32x32
images, conditioned on a toy CLIP's text tower; a T5 prompt expansion network fine-tuned on a
"prompt engineer's" expansions; four rewards that conflict by design (aesthetics, human
preference, alignment with the original prompt, sentiment; docs/toyworld.md). The RL prompts
are the user prompts of ``prompts.txt``; the run ends by scoring the base and trained models on
``heldout_prompts.txt`` (rewards, hypervolume and the renderer-independent pixel oracle) and
writing ``final_eval.json``. Every field is defined in ``parrot_jax/config.py``.

Variants (``--config configs/toy.py:ARG``, comma-separated): ``smoke`` (the CI size: 2
iterations, 2 groups x 8 images, 4 DDIM steps) and the paper's comparisons (``weighted_sum``,
``single``, ``t2i_only``, ``pen_only``, ``no_pareto``).
"""

import ml_collections

from parrot_jax import config as schema
from parrot_jax.toyworld import assets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = schema.variants(arg, ("smoke", *schema.PRESETS), "configs/toy.py")
    c = schema.defaults()
    root = assets.ASSETS
    c.model.pretrained = str(root / assets.PIPELINE)  # the toy diffusers pipeline folder
    c.model.pen = str(root / assets.PEN)  # the toy PEN (transformers T5 folder + tokenizer)
    c.model.rewards = "toy"  # the toy reward heads of assets/rewards
    c.data.prompts = str(root / assets.PROMPTS)  # RL prompts (held-out ones excluded)
    c.data.max_prompt_length = 32  # PEN input tokens of a templated toy prompt
    c.num_groups = 4  # G prompts per iteration, one per identifier
    c.images_per_group = 8  # N images per prompt: 32 per iteration
    c.num_minibatches = 2  # T2I optimiser steps per iteration (16 images each)
    c.num_iterations = 30
    c.sample.num_steps = 20  # DDIM steps
    c.pen.max_new_tokens = 24  # expansion tokens incl. EOS
    c.pen.rl_preset = "regularised"  # batch-mean baseline over groups + KL 0.05 to the SFT PEN
    c.pen.advantage = "normalized"  # rewards z-scored over the batch before the group means:
    # the toy preference logit (~15) would otherwise outweigh sentiment (~0.3) 50-fold
    c.pen.learning_rate = 3e-3  # one step per iteration
    c.pen.lora_rank = 4
    c.pen.lora_alpha = 4.0
    # pen.lora_targets stays attention q / v, which barely moves the toy T5 in 20 steps even on
    # a clean reward; PEN experiments should add the LM head (docs/toyworld.md)
    c.advantage.mode = "normalized"  # r_k z-scored within each group, then the dominated
    # samples zeroed (DDPO-style): Eq. 4's raw r_k ('paper') only ever pushes samples up. The
    # weighted_sum and single presets below replace it.
    c.t2i.learning_rate = 3e-4  # cross-attention rate: the small model moves slowly at 1e-5
    c.t2i.timestep_fraction = 0.5  # half of each sample's 20 steps per update: half the cost
    c.t2i.remat = False  # the toy UNet's activations fit: no recomputation in the backward
    c.checkpoint_every = 10
    c.max_to_keep = 2
    c.eval_every = 10  # iterations between image grids and Pareto plots
    c.eval_prompts = ("a blue square", "a green triangle on a white background")  # grid rows
    c.final_eval.prompts = str(root / assets.HELDOUT)  # base vs trained at the end
    c.final_eval.num_images = 8  # images per held-out prompt and model
    c.final_eval.image_metrics = "toy_oracle"  # pixel oracle metrics beside the rewards
    if "smoke" in parts:
        c.num_groups = 2
        c.images_per_group = 8
        c.num_iterations = 2
        c.sample.num_steps = 4
        c.checkpoint_every = 2
        c.eval_every = 2
        c.final_eval.num_images = 2
        c.final_eval.batch_prompts = 4
    schema.apply_presets(c, parts)
    return c
