"""Parrot in the toy world: the default of ``train.py``, a few minutes on a laptop CPU.

Every model is the toy world's own, shipped in ``parrot_jax/toyworld/assets`` and loaded through
the same code as real checkpoints: a latent-diffusion UNet on 8x8x4 VAE latents of 32x32
images, conditioned on a toy CLIP's text tower; a T5 prompt expansion network fine-tuned on a
"prompt engineer's" expansions; four rewards that conflict by design (aesthetics, human
preference, alignment with the original prompt, sentiment; see
``parrot_jax/toyworld/labels.py``). The RL prompts are the user prompts of ``prompts.txt``; the
run ends by scoring the base and trained models on ``heldout_prompts.txt`` (rewards,
hypervolume and the renderer-independent pixel oracle) and writing ``final_eval.json``.

Variants (``--config configs/toy.py:ARG``, comma-separated): ``smoke`` (the CI size: 2
iterations, 2 groups x 8 images, 4 DDIM steps) and the paper's comparisons of
``configs/tiny.py`` (``weighted_sum``, ``single``, ``t2i_only``, ``pen_only``, ``no_pareto``).
Batch sizes are GLOBAL.
"""

from pathlib import Path

import ml_collections

from parrot_jax import config_files
from parrot_jax.toyworld import assets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_files.load_module(Path(__file__).with_name("tiny.py"))
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in tiny.PRESETS + tiny.SIZES]
    if unknown:
        raise ValueError(f"unknown configs/toy.py variant(s) {unknown}; choose from "
                         f"{tiny.SIZES + tiny.PRESETS} (comma-separated)")
    # configs/tiny.py's fields (their comments are there) with the toy world's models.
    c = tiny.get_config(",".join(p for p in parts if p in tiny.PRESETS))
    root = assets.ASSETS
    c.model.pretrained = str(root / assets.PIPELINE)  # the toy diffusers pipeline folder
    c.model.pen = str(root / assets.PEN)  # the toy PEN (transformers T5 folder + tokenizer)
    c.model.pen_tokenizer = ""  # '' = model.pen's own tokenizer
    c.model.rewards = "toy"  # the toy reward heads of assets/rewards
    c.data.prompts = str(root / assets.PROMPTS)  # RL prompts (held-out ones excluded)
    c.data.max_prompt_length = 32  # PEN input tokens of a templated toy prompt
    c.num_groups = 8  # G prompts per iteration
    c.images_per_group = 8  # N images per prompt: 64 per iteration
    c.num_minibatches = 2  # T2I optimiser steps per iteration (32 images each)
    c.num_iterations = 30  # iterations in all
    c.sample.num_steps = 20  # DDIM steps
    c.sample.guidance_scale = 5.0  # CFG weight during training rollouts
    c.pen.max_new_tokens = 24  # expansion tokens incl. EOS
    c.pen.rl_preset = "regularised"  # batch-mean baseline over groups + KL 0.05 to the SFT PEN
    c.pen.advantage = "normalized"  # rewards z-scored over the batch before the group means:
    # the toy preference logit (~15) would otherwise outweigh sentiment (~0.3) 50-fold
    c.pen.learning_rate = 3e-3  # AdamW rate of the PEN's LoRA (one step per iteration)
    c.pen.lora_rank = 4  # PEN LoRA rank
    c.pen.lora_alpha = 4.0  # PEN LoRA scale numerator
    # pen.lora_targets stays attention q / v, which barely moves the toy T5 in 20 steps even on
    # a clean reward; PEN experiments should add the LM head (README: "The PEN does not learn")
    c.t2i.learning_rate = 3e-4  # cross-attention AdamW rate (the small model moves slowly at 1e-5)
    c.t2i.clip_range = 1e-4  # PPO ratio clip (paper)
    c.t2i.scan_unroll = 1  # trained timesteps per scan iteration
    c.t2i.timestep_fraction = 0.5  # half of each sample's 20 steps per update: half the cost
    if c.advantage.mode == "paper":  # Parrot itself (not a weighted_sum / single variant):
        c.advantage.mode = "normalized"  # METHOD.md §4.6 (b): r_k z-scored within the group,
        # then the dominated samples zeroed; Eq. 4's raw r_k only ever pushes samples up
    c.checkpoint_every = 10  # iterations between checkpoints
    c.eval_every = 10  # iterations between image grids and Pareto plots
    c.eval_prompts = ("a blue square", "a green triangle on a white background")  # grid rows
    c.final_eval.prompts = str(root / assets.HELDOUT)  # base vs trained at the end
    c.final_eval.num_images = 8  # images per held-out prompt and model
    c.final_eval.identifiers = "all"  # the paper's inference: every identifier
    c.final_eval.batch_prompts = 8  # prompts per compiled sampling call
    c.final_eval.oracle = True  # pixel oracle metrics beside the learned rewards
    if "smoke" in parts:
        c.num_groups = 2
        c.images_per_group = 8
        c.num_iterations = 2
        c.sample.num_steps = 4
        c.checkpoint_every = 2
        c.eval_every = 2
        c.final_eval.num_images = 2
        c.final_eval.batch_prompts = 4
    return c
