"""Parrot at paper scale: SD 1.5 at 512 px, a FLAN-T5 PEN with LoRA, the four reward heads.

Every field is defined in ``parrot_jax/config.py``, whose defaults are this config: the paper's
settings where it gives them (256 images per iteration, DDIM 50 steps, CFG 5, cross-attention-
only AdamW at 1e-5, ratio clip 1e-4, identifiers cycling over the 4 rewards) and DDPO's or ours
where it does not (eta 1, 4 groups of 64 images with Pareto sets within a group, 4 minibatch
updates, the PEN's LoRA and rate, the number of iterations; docs/method.md lists each choice).
Parrot guidance (w1 = w2 = 5) is an inference setting, used by sampling and evaluation.

Everything is downloaded from the hub on the user's machine (or read from local folders:
override ``--config.model.pretrained`` / ``--config.model.pen``). ``model.pen`` should be a
supervised-fine-tuned PEN (``configs/pen_sft.py``, then ``python -m parrot_jax.export_pen``);
the plain FLAN-T5 default is a placeholder that at least speaks English. Set
``--config.data.prompts`` to Promptist's RL prompt file. Batch sizes are GLOBAL; each T2I
minibatch (64 images) must divide by the device count.
Variants, comma-separated: the paper's comparisons (``weighted_sum``, ``single``,
``t2i_only``, ``pen_only``, ``no_pareto``), and
  random   every model at its real size (SD 1.5, FLAN-T5-base, the reward CLIPs ViT-L/14,
           ViT-H/14, ViT-B/32) with random weights and stand-in tokenizers: nothing downloaded.
  cpu      the same models, little work: 128-px images, 4 DDIM steps, 2 groups x 2 images, 1
           minibatch, 2 iterations, a final evaluation of 2 prompts, float32 activations (on a
           CPU bfloat16 costs memory). ``random,cpu`` runs on a laptop CPU (one device: do not
           force several).
"""

from pathlib import Path

import ml_collections

from parrot_jax import config as schema

HELDOUT_CPU = Path(__file__).resolve().parent / "heldout_cpu.txt"  # 2 prompts for :cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = schema.variants(arg, ("random", "cpu", *schema.PRESETS), "configs/sd15.py")
    c = schema.defaults()
    c.model.dtype = "bfloat16"  # activations (params stay float32; frozen ones bfloat16)
    # Images per chip at once: on a v5e-8 the rollout then peaks at 55% of HBM, the update at
    # 57% (python -m parrot_jax.plan; docs/tpu_plan.md). Same results as all at once.
    c.sample.microbatch = 8
    c.t2i.microbatch = 2
    if "random" in parts:
        c.model.random_weights = True
    if "cpu" in parts:
        # float32 activations: XLA:CPU computes bfloat16 by converting operands to float32, so
        # bfloat16 there costs memory, not saves it (measured with the planner on the CPU: the
        # SD 1.5 update's temporaries 9.4 GiB in bfloat16 against 1.4 GiB in float32, the
        # reward models' 5.1 against 0.1). bfloat16 runs on the tiny models and the TPU plans.
        c.model.dtype = "float32"
        c.model.resolution = 128  # 16 x 16 latents
        c.sample.num_steps = 4
        c.num_groups = 2
        c.images_per_group = 2
        c.num_minibatches = 1
        c.num_iterations = 2
        c.checkpoint_every = 1
        c.eval_every = 2
        c.eval_prompts = ("a cat", "a lighthouse by the sea")
        c.final_eval.prompts = str(HELDOUT_CPU)
        c.final_eval.num_images = 2
    schema.apply_presets(c, parts)
    return c
