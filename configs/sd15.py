"""Parrot at paper scale: SD 1.5 at 512 px, a FLAN-T5 PEN with LoRA, the four reward heads.

Settings from the paper (METHOD.md §6.1) where it gives them: 256 images per iteration, DDIM 50
steps, eta 1, CFG 5, cross-attention-only AdamW at 1e-5, ratio clip 1e-4, identifiers cycling
over the 4 rewards. Where it does not (PEN learning rate, LoRA rank, iterations, group layout,
minibatches) the choices follow DDPO and METHOD.md §1.4: 4 groups of 64 images (one prompt,
expansion and identifier per group, Pareto sets within a group), 4 minibatch updates. Parrot
guidance (w1 = w2 = 5) is an inference setting, used by the sampling CLI, not by training.

Everything is downloaded from the hub on the user's machine (or read from local folders:
override ``--config.model.pretrained`` / ``--config.model.pen``). ``model.pen`` should be a
supervised-fine-tuned PEN (``configs/pen_sft.py``) exported as a transformers T5 folder; the
plain FLAN-T5 below is a placeholder that at least speaks English. Batch sizes are GLOBAL; each
T2I minibatch (64 images) must divide by the device count.
Variants: the same presets as ``configs/tiny.py`` (``weighted_sum``, ``single``, ``t2i_only``,
``pen_only``, ``no_pareto``), comma-separated.
"""

from pathlib import Path

import ml_collections

from parrot_jax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_files.load_module(Path(__file__).with_name("tiny.py"))
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in tiny.PRESETS]
    if unknown:
        raise ValueError(f"unknown configs/sd15.py variant(s) {unknown}; choose from "
                         f"{tiny.PRESETS} (comma-separated)")
    # The tiny config's fields (their comments are there) with paper values; the presets apply
    # alike. model.tiny and sample.scheduler are unused: the pipeline brings its own.
    c = tiny.get_config(arg)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # batch over every chip
    c.param_sharding = "replicate"  # the bf16 UNet fits a chip; 'fsdp' on small-memory chips
    c.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers pipeline
    c.model.pen = "google/flan-t5-base"  # replace with the SFT'd PEN (transformers T5 folder)
    c.model.pen_tokenizer = ""  # '' = model.pen's own tokenizer
    c.model.rewards = "parrot"  # aesthetics, human preference, alignment, sentiment (public)
    c.model.dtype = "bfloat16"  # activations (params stay float32)
    c.data.prompts = "builtin"  # set to Promptist's RL prompt file (one prompt per line)
    c.data.max_prompt_length = 128  # PEN input tokens of a templated prompt
    c.num_groups = 4  # G prompts per iteration (global)
    c.images_per_group = 64  # N images per prompt: 256 images per iteration (paper)
    c.num_minibatches = 4  # DDPO_IS's 4 minibatch updates per iteration (64 images each)
    c.num_iterations = 2000  # not given by the paper (Fig. 4 is in thousands of steps)
    c.sample.num_steps = 50  # DDIM steps (paper)
    c.sample.guidance_scale = 5.0  # CFG (paper)
    c.sample.eta = 1.0  # stochastic DDIM, the policy DDPO trains
    c.pen.max_new_tokens = 77  # paper: 77, the CLIP context
    c.pen.lora_rank = 16  # not given by the paper
    c.pen.lora_alpha = 16.0  # delta W = (alpha / r) A B
    c.pen.learning_rate = 1e-4  # not given by the paper
    c.t2i.trainable = "cross_attention"  # paper: U-Net cross-attention only
    c.t2i.learning_rate = 1e-5  # paper
    c.t2i.clip_range = 1e-4  # paper ("gradient clip 1e-4", read as DDPO's ratio clip)
    c.t2i.timestep_fraction = 1.0  # paper: gradients over all 50 denoising steps
    c.t2i.scan_unroll = 1  # a rolled loop over the 50 timesteps: compile time independent of S
    c.log_every = 1  # iterations between metrics.jsonl records
    c.checkpoint_every = 50  # iterations between checkpoints (and on SIGTERM)
    c.max_to_keep = 3  # checkpoints kept
    c.eval_every = 50  # iterations between workdir/eval PNGs (image grid, reward scatter)
    c.eval_prompts = ("a cat", "a lighthouse by the sea", "a portrait of an old man",
                      "a bowl of fruit on a table")  # the grid's rows (at most num_groups)
    return c
