"""Parrot RL on tiny RANDOM models: every part of the loop is real, nothing is downloaded.

The UNet, VAE, CLIP text encoder, reward CLIP, aesthetic MLP and T5 PEN are built in memory from
fixed seeds; a CLIP-style word-level tokenizer and a T5-style BPE are built offline from the
prompts (and saved in the workdir, so a resumed run reads the same vocabulary). The images mean
nothing, but the shapes, the sharding, the checkpoints and the metrics are those of a real run
(``configs/toy.py``, ``train.py``'s default, is the toy world with trained models).

Variants (``--config configs/tiny.py:ARG``):
  (none)        a few minutes on a laptop CPU.
  smoke         the CI size: 2 iterations, 2 groups x 8 images (divisible by 8 devices), 3
                DDIM steps, a one-level UNet and VAE (8 x 8 images) that compile fast.
  weighted_sum  DPOK-style scalarised reward (equal weights), no Pareto selection.
  single        one reward (aesthetics) for every sample, no Pareto selection.
  t2i_only      the PEN expands but is frozen; only the T2I model trains.
  pen_only      the T2I model is frozen; only the PEN's LoRA trains.
  no_pareto     Parrot without the non-dominated filter (every valid sample is used).
Combine with ``smoke`` as ``smoke,no_pareto``. Batch sizes are GLOBAL (all devices, all hosts)
unless a comment says otherwise.
"""

import ml_collections

from parrot_jax.expansion.reinforce import DEFAULT_LORA_TARGETS

PRESETS = ("weighted_sum", "single", "t2i_only", "pen_only", "no_pareto")
SIZES = ("smoke",)

# A DDPM noise schedule in SD 1.x's form (diffusers scheduler config keys).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon", clip_sample=False,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in PRESETS + SIZES]
    if unknown:
        raise ValueError(f"unknown configs/tiny.py variant(s) {unknown}; choose from "
                         f"{SIZES + PRESETS} (comma-separated)")
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed: tiny-model init, LoRA init, prompt draws, sampling noise
    c.distributed = False  # call jax.distributed.initialize() first (every worker of a pod)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # device mesh; -1 = the rest
    c.param_sharding = "replicate"  # T2I state: 'replicate' or 'fsdp' (large tensors over fsdp)
    c.matmul_precision = "highest"  # float32 matmuls / convolutions on accelerators (CPUs are
    # always float32): 'highest' keeps the update's recomputed log-probs equal to the rollout's
    # well inside the 1e-4 ratio clip; JAX's 'default' (one bfloat16 pass on TPU, TF32 on GPU)
    # is faster, but emulated on a CPU it put half (TF32) to 93% (bfloat16) of the ratios
    # outside the clip before any update (README). Float32 operands only: model.dtype=
    # 'bfloat16' activations make bfloat16 matmuls either way.

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = "tiny"  # diffusers SD pipeline folder / hub id (unet, vae, text_encoder,
    # tokenizer, scheduler subfolders), or 'tiny': random models of model.tiny's shapes
    c.model.pen = "tiny"  # PEN: T5 folder / hub id (SFT'd), or 'tiny': a random T5
    c.model.pen_tokenizer = ""  # tokenizer folder / hub id of the PEN; '' = model.pen
    c.model.rewards = "tiny"  # 'tiny': random CLIP reward heads; 'parrot': the paper's four;
    # 'toy': the toy world's trained heads ('toy:<assets folder>' for another build)
    c.model.dtype = "float32"  # activation dtype of every model (params stay float32)
    c.model.tiny = ml_collections.ConfigDict()  # shapes of the random models ('tiny' above)
    c.model.tiny.unet = ml_collections.ConfigDict(dict(  # diffusers UNet2DConditionModel kwargs
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8))
    c.model.tiny.vae = ml_collections.ConfigDict(dict(  # diffusers AutoencoderKL kwargs
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    c.model.tiny.text = ml_collections.ConfigDict(dict(  # CLIP text towers (T2I and rewards)
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    c.model.tiny.vision = ml_collections.ConfigDict(dict(  # the reward CLIP's vision tower
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=4))
    c.model.tiny.projection_dim = 24  # reward CLIP embedding width
    c.model.tiny.context_length = 16  # CLIP context in tokens (SD: 77)
    c.model.tiny.latent_size = 8  # latent side; images are 2x larger (one VAE downsampling)
    c.model.tiny.t5 = ml_collections.ConfigDict(dict(  # the random PEN's T5 shape
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    c.model.tiny.t5_vocab_size = 256  # T5 BPE pieces to train (incl. 3 special)

    c.data = ml_collections.ConfigDict()
    c.data.prompts = "builtin"  # 'builtin' (the list in training/models.py), a text file with
    # one prompt per line (Promptist's RL prompts), or 'tfds:<data_dir>[:<split>]': the user
    # prompts of a prepared promptist_pairs TFDS dataset
    c.data.max_prompt_length = 48  # PEN input tokens of a templated prompt (longer: an error)

    c.num_groups = 4  # G: prompts per iteration (one expansion + one identifier each), global
    c.images_per_group = 8  # N: images per group; G * N images per iteration (paper: 256)
    c.num_minibatches = 2  # T2I optimiser steps per iteration; G*N/num_minibatches per step,
    # which must divide by the device count
    c.num_iterations = 40  # Parrot iterations in total (a resumed run continues to this)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 8  # DDIM steps S (paper: 50)
    c.sample.guidance_scale = 5.0  # CFG weight w with the null prompt (paper: 5)
    c.sample.eta = 1.0  # DDIM eta (1: the stochastic policy DDPO trains)
    c.sample.scheduler = ml_collections.ConfigDict(SD_SCHEDULER)  # used when model.pretrained
    # is 'tiny'; a pipeline's own scheduler/ config otherwise

    c.pen = ml_collections.ConfigDict()
    c.pen.train = True  # update the PEN's LoRA by REINFORCE (False: frozen PEN)
    c.pen.max_new_tokens = 12  # expansion tokens incl. EOS (paper: 77)
    c.pen.temperature = 1.0  # sampling temperature
    c.pen.top_k = 0  # top-k filter; 0 = off
    c.pen.top_p = 1.0  # nucleus mass; 1 = off
    c.pen.rl_preset = "paper"  # PENRLConfig preset: 'paper' (plain) or 'regularised'
    # (batch-mean baseline over groups + KL 0.05 to the SFT model; not in the paper)
    c.pen.advantage = "raw"  # each group's weight: 'raw' = mean selected r_k (the paper), or
    # 'normalized' = the same after z-scoring each reward over the batch (rl.group_advantages)
    c.pen.learning_rate = 3e-4  # AdamW rate of the PEN's LoRA factors
    c.pen.lora_rank = 4  # PEN LoRA rank
    c.pen.lora_alpha = 4.0  # PEN LoRA scale numerator
    c.pen.lora_targets = DEFAULT_LORA_TARGETS  # regex over '/'-joined kernel paths given
    # LoRA factors (default: attention q / v of both stacks; workdirs without it used that)
    c.pen.expansions_per_prompt = 1  # E: groups sharing one drawn prompt (and its identifier),
    # each with its own expansion; E > 1 makes the 'regularised' baseline the mean over a
    # prompt's E expansions instead of over the batch (not in the paper); must divide num_groups

    c.identifiers = "cycle"  # reward identifier per group: 'cycle' over K, or 'random'

    c.advantage = ml_collections.ConfigDict()
    c.advantage.mode = "paper"  # 'paper' (Eq. 4), 'normalized', 'weighted_sum', 'single'
    c.advantage.pareto = True  # zero the dominated samples (False: the no-Pareto ablation)
    c.advantage.selection = "group"  # non-dominated set within each group or over the batch
    c.advantage.stats = "group"  # normalized: statistics per 'group', 'batch' or 'tracker'
    c.advantage.weights = (0.25, 0.25, 0.25, 0.25)  # weighted_sum: one weight per reward
    c.advantage.reward_index = 0  # single: the reward column every sample maximises
    c.advantage.adv_clip = 5.0  # clip advantages to +-adv_clip
    c.advantage.tracker_capacity = 1024  # tracker: slots (prompt x identifier keys)
    c.advantage.tracker_buffer = 32  # tracker: rewards kept per key
    c.advantage.tracker_min_count = 16  # tracker: rewards a key needs before its own stats

    c.t2i = ml_collections.ConfigDict()
    c.t2i.train = True  # update the UNet (False: frozen T2I model)
    c.t2i.trainable = "cross_attention"  # 'cross_attention' (paper), 'all' or 'lora'
    c.t2i.learning_rate = 1e-5  # AdamW rate (paper: 1e-5)
    c.t2i.warmup_steps = 0  # optimiser steps (num_minibatches per iteration) of linear warm-up
    # of the rate from 0; 0: constant (paper, DDPO)
    c.t2i.weight_decay = 1e-4  # AdamW decoupled weight decay
    c.t2i.max_grad_norm = 1.0  # global-norm gradient clip
    c.t2i.clip_range = 1e-4  # PPO ratio clip (paper: 1e-4)
    c.t2i.timestep_fraction = 1.0  # share of each sample's S steps trained per update
    c.t2i.scan_unroll = 1  # trained timesteps per scan-loop iteration (XLA:CPU runs the UNet
    # ~2x faster unrolled, benchmarks/train_step.py; costs compile time per unrolled step)

    c.hypervolume_reference = "batch_min"  # 'batch_min' (each reward's batch minimum) or K
    # comma-separated floats, the point the logged hypervolume is measured from
    c.log_every = 1  # iterations between metrics.jsonl records (metrics stay on device between)
    c.checkpoint_every = 5  # iterations between orbax checkpoints (also at the end / SIGTERM)
    c.max_to_keep = 2  # checkpoints kept
    c.eval_every = 5  # iterations between workdir/eval PNGs (image grid, reward scatter)
    c.eval_prompts = ("a castle on a hill", "a bowl of fruit on a table")  # grid rows (<= G)

    c.final_eval = ml_collections.ConfigDict()  # base vs trained at the end (final_eval.json)
    c.final_eval.prompts = ""  # held-out prompt file, one per line; '' = no final evaluation
    c.final_eval.num_images = 4  # images per prompt and model
    c.final_eval.identifiers = "all"  # reward identifiers at inference: 'all', '1,3', 'none'
    c.final_eval.w1 = 5.0  # prompt-centred guidance weight of the original prompt (Eq. 5)
    c.final_eval.w2 = 5.0  # ... and of the identified expansion
    c.final_eval.seed = 0  # sampling seed (both models draw the same noise)
    c.final_eval.batch_prompts = 8  # prompts per compiled sampling call
    c.final_eval.oracle = False  # also the toy world's pixel oracle metrics (toy prompts only)

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
    if "weighted_sum" in parts:
        c.advantage.mode = "weighted_sum"
    if "single" in parts:
        c.advantage.mode = "single"
    if "t2i_only" in parts:
        c.pen.train = False
    if "pen_only" in parts:
        c.t2i.train = False
    if "no_pareto" in parts:
        c.advantage.pareto = False
    return c
