"""The Parrot run's config schema: every field's default, meaning and check, in one place.

A run's config is an ``ml_collections.ConfigDict`` (``configs/*.py`` build one with
``defaults()`` and change what they need; ``--config.a.b=value`` overrides a field). ``FIELDS``
lists every field: its dotted name, its default (the paper's setting where the paper gives
one, else DDPO's or ours), a one-line meaning, a check, whether it may change when a workdir
resumes, and, for fields added after workdirs were first written, the value an older
``config.json`` without it stands for. ``check`` refuses unknown fields and bad values, naming
the field; ``checkpoint.check_workdir`` and the inference tools read compatibility from here;
``python -m parrot_jax.config --markdown`` prints the table ``docs/method.md`` carries.
Batch sizes are GLOBAL (all devices of all hosts).

Presets (``PRESETS``) are the paper's comparisons, shared by every config file:
``weighted_sum``, ``single``, ``t2i_only``, ``pen_only``, ``no_pareto``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

# Where a value is not acceptable, a check returns what is (shown after the field and value).
Check = Callable[[Any], "str | None"]
_NEVER_ABSENT = object()  # a field every saved config.json has


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v > 0 else "a positive integer"


def non_negative_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "a non-negative integer"


def positive(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else "a positive number"


def non_negative(v: Any) -> str | None:
    return None if _is_number(v) and v >= 0 else "a non-negative number"


def number(v: Any) -> str | None:
    return None if _is_number(v) else "a number"


def fraction(v: Any) -> str | None:
    return None if _is_number(v) and 0 < v <= 1 else "a number in (0, 1]"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def source(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a folder, a hub id or 'tiny'"


def one_of(*values: Any) -> Check:
    return lambda v: None if v in values else f"one of {values}"


def optional_positive(v: Any) -> str | None:
    return None if v is None or positive(v) is None else "a positive number or None"


def numbers(v: Any) -> str | None:
    ok = isinstance(v, Sequence) and not isinstance(v, str) and all(map(_is_number, v))
    return None if ok and len(v) else "a non-empty tuple of numbers"


def prompts(v: Any) -> str | None:
    ok = (isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
          and all(isinstance(p, str) and p.strip() for p in v))
    return None if ok else "a non-empty tuple of non-empty prompts"


def mesh_shape(v: Any) -> str | None:
    axes = ("data", "fsdp", "tensor")
    ok = (isinstance(v, dict) and v and set(v) <= set(axes)
          and all(_is_int(s) and (s > 0 or s == -1) for s in v.values())
          and sum(s == -1 for s in v.values()) <= 1)
    return None if ok else f"axis sizes of {axes}, positive or one -1"


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field. ``name`` is dotted; a name ending in ``.`` is a free-form subtree (a
    dict of settings passed on as they are, e.g. a diffusers config)."""

    name: str
    default: Any
    doc: str
    check: Check | None = None
    resumable: bool = False  # may differ between runs in one workdir (shapes, semantics kept)
    absent: Any = _NEVER_ABSENT  # what a saved config without the field means (added later)

    @property
    def subtree(self) -> bool:
        return self.name.endswith(".")

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.rstrip(".").split("."))


# A DDPM noise schedule in SD 1.x's form (diffusers scheduler config keys).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon", clip_sample=False,
)
# Shapes of the random models that model.* = 'tiny' builds (diffusers / transformers kwargs).
TINY_MODELS = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    vae=dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
             norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, patch_size=4),
    projection_dim=24,  # reward CLIP embedding width
    context_length=16,  # CLIP context in tokens (SD: 77)
    latent_size=8,  # latent side; images are 2x larger (one VAE downsampling)
    t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    t5_vocab_size=256,  # T5 BPE pieces to train (incl. 3 special)
)
# The PEN's default LoRA targets: attention q / v of both T5 stacks.
PEN_LORA_TARGETS = r"(SelfAttention|EncDecAttention)/(q|v)/kernel$"
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

FIELDS: tuple[Field, ...] = (
    # --- the run -----------------------------------------------------------------------------
    Field("seed", 0, "PRNG seed: tiny-model and LoRA init, prompt draws, sampling noise",
          non_negative_int),
    Field("distributed", False, "call jax.distributed.initialize() first (every worker of a "
          "pod slice runs train.py)", boolean, resumable=True),
    Field("mesh.", {"data": -1, "fsdp": 1}, "device mesh axis sizes (data, fsdp, tensor); one "
          "may be -1: the devices left over", mesh_shape, resumable=True),
    Field("param_sharding", "replicate", "T2I state placement: 'replicate', or 'fsdp' (large "
          "tensors split over the fsdp axis)", one_of("replicate", "fsdp"), resumable=True),
    Field("matmul_precision", "highest", "precision of float32 matmuls and convolutions on "
          "accelerators: 'highest' keeps the update's recomputed log-probs equal to the "
          "rollout's inside the 1e-4 ratio clip (docs/method.md, numerics)",
          one_of(*MATMUL_PRECISIONS), resumable=True, absent="default"),
    # --- models ------------------------------------------------------------------------------
    Field("model.pretrained", "stable-diffusion-v1-5/stable-diffusion-v1-5", "the T2I model: "
          "a diffusers SD pipeline folder or hub id (unet, vae, text_encoder, tokenizer, "
          "scheduler), or 'tiny': random models of model.tiny's shapes", source),
    Field("model.pen", "google/flan-t5-base", "the PEN: a (supervised fine-tuned) transformers "
          "T5 folder or hub id, or 'tiny': a random T5", source),
    Field("model.pen_tokenizer", "", "the PEN's tokenizer folder or hub id; '' = model.pen's",
          text),
    Field("model.rewards", "parrot", "the reward set: 'parrot' (the paper's four heads), "
          "'tiny' (random heads on the tiny models), or another registered reward set, as "
          "'<name>' or '<name>:<argument>' (the toy world's: 'toy')", source),
    Field("model.dtype", "float32", "activation dtype of every model (parameters stay float32)",
          one_of("float32", "bfloat16")),
    Field("model.frozen_dtype", "auto", "dtype the frozen weights are kept in on the devices "
          "during training: the UNet's untrained part, the text encoder, the VAE and the "
          "reward models. 'auto': model.dtype (bfloat16 activations use their matmul and "
          "convolution weights in bfloat16 anyway; SD 1.5 with the paper's rewards then holds "
          "4.8 GiB less per chip); 'float32' or 'bfloat16'. Trained weights, AdamW state and "
          "the PEN stay float32", one_of("auto", "float32", "bfloat16"), resumable=True,
          absent="float32"),
    Field("model.attention", "auto", "self-attention of the UNet and VAE: 'xla' (XLA's fused "
          "softmax), 'flash' (the Pallas TPU kernel: no score matrix, sequences that are "
          "multiples of 128), 'cudnn' (fused, bfloat16 on NVIDIA GPUs), or 'auto': flash on "
          "TPU, cudnn on GPU, xla on CPU (docs/method.md, numerics)",
          one_of("auto", "xla", "flash", "cudnn"), resumable=True, absent="xla"),
    Field("model.random_weights", False, "build model.pretrained, model.pen and model.rewards "
          "('parrot') at their real architectures (parrot_jax.architectures, or a folder's "
          "config.json files) with random weights from seed, and stand-in tokenizers built "
          "from the prompts, padded to their vocabulary sizes, at their context lengths: a "
          "full-size run with nothing downloaded (configs/sd15.py:random)", boolean,
          absent=False),
    Field("model.resolution", 0, "image side in pixels (a multiple of the VAE's downsampling "
          "times 8); 0: the UNet's sample_size times the VAE's downsampling (512 for SD 1.5)",
          non_negative_int, absent=0),
    Field("model.tiny.", TINY_MODELS, "shapes of the random models 'tiny' builds (UNet, VAE, "
          "CLIP towers, T5: diffusers / transformers kwargs)"),
    # --- data --------------------------------------------------------------------------------
    Field("data.prompts", "builtin", "RL prompts: 'builtin', a text file with one prompt per "
          "line, or 'tfds:<data_dir>[:<split>]' (the user prompts of a prepared "
          "promptist_pairs dataset)", source),
    Field("data.max_prompt_length", 128, "PEN input tokens of a templated prompt (longer is an "
          "error)", positive_int),
    # --- batch -------------------------------------------------------------------------------
    Field("num_groups", 4, "G: prompts per iteration, each with one expansion and one "
          "identifier", positive_int),
    Field("images_per_group", 64, "N: images per group; G x N per iteration (paper: 256)",
          positive_int),
    Field("num_minibatches", 4, "T2I optimiser steps per iteration; each takes G x N / "
          "num_minibatches images, a multiple of the device count", positive_int),
    Field("num_iterations", 2000, "Parrot iterations in all (a resumed run continues to this)",
          positive_int, resumable=True),
    # --- sampling ----------------------------------------------------------------------------
    Field("sample.num_steps", 50, "DDIM steps S", positive_int),
    Field("sample.guidance_scale", 5.0, "CFG weight w against the null prompt, in training "
          "rollouts and updates", number),
    Field("sample.eta", 1.0, "DDIM eta (1: the stochastic policy DDPO trains; must be > 0)",
          positive),
    Field("sample.microbatch", 0, "images per device the training rollout processes at "
          "once: its DDIM chain and VAE decoding run in chunks of this many, in turn (same "
          "images, activation memory of one chunk); 0, or more than a device holds: all "
          "G x N / devices at once",
          non_negative_int, resumable=True, absent=0),
    Field("sample.scheduler.", SD_SCHEDULER, "the DDPM schedule of the 'tiny' models "
          "(diffusers scheduler config); a pipeline brings its own"),
    # --- the PEN -----------------------------------------------------------------------------
    Field("pen.train", True, "update the PEN's LoRA by REINFORCE (False: frozen PEN)",
          boolean),
    Field("pen.max_new_tokens", 77, "expansion tokens including EOS (paper: 77)",
          positive_int),
    Field("pen.temperature", 1.0, "sampling temperature of expansions", positive),
    Field("pen.top_k", 0, "top-k filter of expansions; 0 = off", non_negative_int),
    Field("pen.top_p", 1.0, "nucleus mass of expansions; 1 = off", fraction),
    Field("pen.rl_preset", "paper", "'paper': plain REINFORCE; 'regularised': a batch-mean "
          "baseline over groups and KL 0.05 to the SFT PEN (not in the paper)",
          one_of("paper", "regularised")),
    Field("pen.advantage", "raw", "each group's PEN weight: 'raw', the mean selected r_k "
          "(paper), or 'normalized', the same after z-scoring each reward over the batch",
          one_of("raw", "normalized")),
    Field("pen.learning_rate", 1e-4, "AdamW rate of the PEN's LoRA (not given by the paper)",
          positive),
    Field("pen.lora_rank", 16, "PEN LoRA rank (not given by the paper)", positive_int),
    Field("pen.lora_alpha", 16.0, "PEN LoRA scale numerator: delta = alpha / rank * A @ B",
          positive),
    Field("pen.lora_targets", PEN_LORA_TARGETS, "regex over '/'-joined kernel paths of the "
          "PEN given LoRA factors", text, absent=PEN_LORA_TARGETS),
    Field("pen.expansions_per_prompt", 1, "E: consecutive groups sharing one drawn prompt and "
          "identifier, each with its own expansion; E > 1 makes the 'regularised' baseline "
          "per prompt (not in the paper); divides num_groups", positive_int, absent=1),
    Field("identifiers", "cycle", "reward identifier of each group: 'cycle' over the K "
          "rewards, or 'random'", one_of("cycle", "random")),
    # --- advantages --------------------------------------------------------------------------
    Field("advantage.mode", "paper", "'paper' (Eq. 4: r_k of the selected samples over |P|), "
          "'normalized' (r_k z-scored, then the dominated zeroed), 'weighted_sum', 'single'",
          one_of("paper", "normalized", "weighted_sum", "single")),
    Field("advantage.pareto", True, "zero the dominated samples (False: the no-Pareto "
          "ablation)", boolean),
    Field("advantage.selection", "group", "non-dominated set within each 'group' or over the "
          "'batch'", one_of("group", "batch")),
    Field("advantage.stats", "group", "'normalized' statistics per 'group', 'batch' or "
          "per-prompt 'tracker'", one_of("group", "batch", "tracker")),
    Field("advantage.weights", (0.25, 0.25, 0.25, 0.25), "'weighted_sum': one weight per "
          "reward", numbers),
    Field("advantage.reward_index", 0, "'single': the reward column every sample maximises",
          non_negative_int),
    Field("advantage.adv_clip", 5.0, "clip advantages to +-adv_clip (None: off)",
          optional_positive),
    Field("advantage.tracker_capacity", 1024, "'tracker': slots (prompt x identifier keys)",
          positive_int),
    Field("advantage.tracker_buffer", 32, "'tracker': rewards kept per key", positive_int),
    Field("advantage.tracker_min_count", 16, "'tracker': rewards a key needs before its own "
          "statistics are used", positive_int),
    # --- the T2I update ----------------------------------------------------------------------
    Field("t2i.train", True, "update the UNet (False: frozen T2I model)", boolean),
    Field("t2i.trainable", "cross_attention", "trained UNet parameters: 'cross_attention' "
          "(paper), 'all' or 'lora'", one_of("cross_attention", "all", "lora")),
    Field("t2i.learning_rate", 1e-5, "AdamW rate (paper)", positive),
    Field("t2i.warmup_steps", 0, "optimiser steps of linear warm-up of the rate from 0 (0: "
          "constant, as the paper and DDPO)", non_negative_int, absent=0),
    Field("t2i.weight_decay", 1e-4, "AdamW decoupled weight decay (DDPO)", non_negative),
    Field("t2i.max_grad_norm", 1.0, "global-norm gradient clip (None: off)", optional_positive),
    Field("t2i.clip_range", 1e-4, "PPO ratio clip epsilon (paper's 'gradient clip 1e-4')",
          positive),
    Field("t2i.timestep_fraction", 1.0, "share of each sample's S steps trained per update "
          "(paper: all)", fraction),
    Field("t2i.scan_unroll", 1, "trained timesteps per iteration of the update's scan loop "
          "(more: faster on some backends, longer compiles)", positive_int),
    Field("t2i.rescore", "auto", "re-score each minibatch's stored transitions with the "
          "update's own forward pass before the first optimiser step, so the PPO ratio starts "
          "at 1: 'auto' (on when model.dtype is not float32; docs/method.md, numerics), 'on' "
          "or 'off'. Costs one UNet forward per trained transition (with t2i.remat off, two)",
          one_of("auto", "on", "off"), resumable=True, absent="off"),
    Field("t2i.microbatch", 0, "images per device the update processes at once: each "
          "per-device minibatch runs in chunks of this many inside the jitted step, "
          "accumulated like the timesteps (same result, activation memory of one chunk); 0, "
          "or more than a device holds: the whole per-device minibatch", non_negative_int,
          resumable=True, absent=0),
    Field("t2i.remat", True, "recompute each UNet block's activations in the update's "
          "backward pass instead of keeping them: less memory (SD at 512 px needs it), a "
          "third more UNet compute", boolean, absent=True),
    # --- logging, checkpoints, pictures ------------------------------------------------------
    Field("hypervolume_reference", "batch_min", "the point the logged batch hypervolume is "
          "measured from: 'batch_min' (each reward's batch minimum) or K comma-separated "
          "numbers", text),
    Field("log_every", 1, "iterations between metrics.jsonl records (one is also written at "
          "every checkpoint, so a resume logs nothing twice)", positive_int,
          resumable=True),
    Field("checkpoint_every", 50, "iterations between checkpoints (also at the end and on "
          "SIGTERM)", positive_int, resumable=True),
    Field("max_to_keep", 3, "checkpoints kept", positive_int, resumable=True),
    Field("eval_every", 50, "iterations between workdir/eval pictures (image grid, reward "
          "scatter)", positive_int, resumable=True),
    Field("eval_prompts", ("a cat", "a lighthouse by the sea", "a portrait of an old man",
                           "a bowl of fruit on a table"),
          "the image grid's rows: 1 to num_groups prompts", prompts, resumable=True),
    # --- the closing evaluation --------------------------------------------------------------
    Field("final_eval.prompts", "", "held-out prompt file (one per line) scored by the base and "
          "the trained models at the end (final_eval.json); '' = none", text, resumable=True),
    Field("final_eval.num_images", 4, "images per prompt and model", positive_int,
          resumable=True),
    Field("final_eval.identifiers", "all", "reward identifiers at inference: 'all', 'none' or "
          "1-based columns '1,3'", text, resumable=True),
    Field("final_eval.w1", 5.0, "prompt-centred guidance weight of the original prompt "
          "(Eq. 5)", number, resumable=True),
    Field("final_eval.w2", 5.0, "... and of the identified expansion", number, resumable=True),
    Field("final_eval.seed", 0, "sampling seed (both models draw the same noise)",
          non_negative_int, resumable=True),
    Field("final_eval.batch_prompts", 8, "prompts per compiled sampling call", positive_int,
          resumable=True),
    Field("final_eval.image_metrics", "", "registered image metrics measured beside the "
          "rewards, comma-separated (the toy world's pixel oracle: 'toy_oracle')", text,
          resumable=True, absent=""),
)
BY_NAME = {f.name: f for f in FIELDS}
# Fields added after workdirs were first written -> the value a saved config without one means.
ADDED = {f.name: f.absent for f in FIELDS if f.absent is not _NEVER_ABSENT}

PRESETS: dict[str, dict[str, Any]] = {  # the paper's comparisons: field overrides
    "weighted_sum": {"advantage.mode": "weighted_sum"},  # DPOK-style scalarised reward
    "single": {"advantage.mode": "single"},  # one reward for every sample
    "t2i_only": {"pen.train": False},  # the PEN expands but is frozen
    "pen_only": {"t2i.train": False},  # the T2I model is frozen
    "no_pareto": {"advantage.pareto": False},  # every valid sample is used
}


class ConfigError(ValueError):
    """A config that cannot run (the message names the field)."""


def _set(tree: ml_collections.ConfigDict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        if key not in tree:
            tree[key] = ml_collections.ConfigDict()
        tree = tree[key]
    tree[path[-1]] = value


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _has(tree: Any, path: Sequence[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict | ml_collections.ConfigDict) or key not in tree:
            return False
        tree = tree[key]
    return True


def defaults() -> ml_collections.ConfigDict:
    """A config holding every field's default."""
    config = ml_collections.ConfigDict()
    for f in FIELDS:
        value = json.loads(json.dumps(f.default)) if f.subtree else f.default
        _set(config, f.path, ml_collections.ConfigDict(value) if f.subtree else value)
    return config


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Set ``{'a.b': value}`` fields of ``config`` (each must be a field of the schema)."""
    for name, value in overrides.items():
        if name not in BY_NAME:
            raise ConfigError(f"config.{name}: not a config field")
        _set(config, BY_NAME[name].path, value)


def variants(arg: str | None, allowed: Sequence[str], config_file: str) -> list[str]:
    """The comma-separated variants of ``--config FILE:arg``; an unknown one is an error naming
    the file and the choices."""
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ConfigError(f"unknown {config_file} variant(s) {unknown}; choose from "
                          f"{tuple(allowed)} (comma-separated)")
    return parts


def apply_presets(config: ml_collections.ConfigDict, parts: Sequence[str]) -> None:
    """Apply the ``PRESETS`` among ``parts`` in order."""
    for part in parts:
        if part in PRESETS:
            apply(config, PRESETS[part])


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b': leaf}`` of a nested dict / ConfigDict."""
    if isinstance(tree, dict | ml_collections.ConfigDict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def field_of(name: str) -> Field | None:
    """The field a flat leaf name belongs to (a subtree field for names below it)."""
    if name in BY_NAME:
        return BY_NAME[name]
    return next((f for f in FIELDS if f.subtree and name.startswith(f.name)), None)


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuse unknown and missing fields, values their check rejects, and batch arithmetic
    that cannot work, naming the field. Returns ``config``. (Checks that need the devices or
    the number of rewards are in ``training.settings``.)"""
    leaves = flat(config)
    unknown = sorted(k for k in leaves if field_of(k) is None)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}: no Parrot run reads them (a "
                          "typo? python -m parrot_jax.config lists the fields)")
    for f in FIELDS:
        if not _has(config, f.path):
            raise ConfigError(f"config.{f.name.rstrip('.')} is missing")
        value = _get(config, f.path)
        if f.subtree:
            value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        problem = f.check(value) if f.check else None
        if problem:
            raise ConfigError(f"config.{f.name.rstrip('.')}={value!r}: {problem} ({f.doc})")
    c = config
    batch = c.num_groups * c.images_per_group
    if batch % c.num_minibatches:
        raise ConfigError(f"config.num_minibatches={c.num_minibatches} must divide the {batch} "
                          f"images per iteration (num_groups={c.num_groups} x "
                          f"images_per_group={c.images_per_group})")
    if c.num_groups % c.pen.expansions_per_prompt:
        raise ConfigError(f"config.pen.expansions_per_prompt={c.pen.expansions_per_prompt} "
                          f"must divide num_groups={c.num_groups}")
    if len(c.eval_prompts) > c.num_groups:
        raise ConfigError(f"config.eval_prompts: {len(c.eval_prompts)} prompts for "
                          f"num_groups={c.num_groups} rows (at most one per group)")
    return config


# --- workdir compatibility -------------------------------------------------------------------

def resumable(name: str) -> bool:
    """Whether flat field ``name`` may differ when a workdir resumes."""
    f = field_of(name)
    return f is not None and f.resumable


def implied(saved: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{name: value}`` of the fields a saved (flat) config lacks because they were added
    after it was written, with the value their absence stands for."""
    return {name: value for name, value in ADDED.items() if name not in saved}


# Fields an older config.json may hold that are gone: name -> (the new field, the new value as a
# function of the old one).
RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "final_eval.oracle": ("final_eval.image_metrics", lambda v: "toy_oracle" if v else ""),
}


def upgrade(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A saved ``config.json`` (as loaded JSON) as a config of today's schema: fields added
    since take the value their absence stood for, renamed ones their new name; lists become
    tuples where the default is a tuple. Then ``check``."""
    leaves = flat(saved)
    for old, (new, convert) in RENAMED.items():
        if old in leaves:
            leaves[new] = convert(leaves.pop(old))
    leaves.update(implied(leaves))
    config = ml_collections.ConfigDict()
    for name, value in leaves.items():
        f = field_of(name)
        if f is not None and not f.subtree and isinstance(f.default, tuple):
            value = tuple(value)
        _set(config, name.split("."), value)
    return check(config)


def markdown() -> str:
    """The fields as a markdown table: name, default, meaning (``docs/method.md``)."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        default = repr(f.default)
        default = default if len(default) <= 60 else "(see parrot_jax/config.py)"
        default = default.replace("|", "\\|")
        extra = "; may change on resume" if f.resumable else ""
        doc = f.doc.replace("|", "\\|")
        lines.append(f"| `{f.name.rstrip('.')}` | `{default}` | {doc}{extra} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m parrot_jax.config``: every field and its meaning; ``--markdown``: the table
    docs/method.md carries."""
    from absl import flags

    from parrot_jax import cli

    def define(values: flags.FlagValues, argv: list[str]) -> None:
        flags.DEFINE_bool("markdown", False, "print the markdown table of docs/method.md",
                          flag_values=values)

    args = cli.parse(define, argv, prog="python -m parrot_jax.config", doc=__doc__)
    text = markdown() if args.markdown else "".join(
        f"{f.name.rstrip('.'):<30} {f.doc}\n" for f in FIELDS)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
