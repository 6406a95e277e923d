"""The Parrot loop's typed view of a checked config: what each part of an iteration reads.

``Settings.of(config, devices, num_rewards)`` turns a config that ``parrot_jax.config.check``
accepted into frozen dataclasses (the T2I update's, the advantages', the PEN's sampling and
REINFORCE settings, the batch sizes), adding the checks that need the device count or the
number of rewards. The iteration reads these, never the ConfigDict. ``check_prompt_files``
adds the checks that need the loaded tokenizers: every prompt list fits where it is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from parrot_jax.config import ConfigError
from parrot_jax.data.promptist import read_prompts
from parrot_jax.data.prompts import (
    PromptList,
    check_prompt_lengths,
    config_prompt_list,
    inference_limits,
    pen_limit,
    read_prompt_list,
)
from parrot_jax.expansion import PENRLConfig, SamplingConfig, parse_identifiers
from parrot_jax.rl import AdvantageConfig
from parrot_jax.training.metrics import parse_reference
from parrot_jax.training.step import T2IUpdateConfig


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Derived batch sizes (all global)."""

    groups: int  # G
    group_size: int  # N
    batch: int  # G * N images per iteration
    minibatches: int
    minibatch: int  # images per T2I optimiser step
    devices: int

    def describe(self) -> str:
        return (f"{self.groups} groups x {self.group_size} images = {self.batch} images per "
                f"iteration; {self.minibatches} T2I minibatches of {self.minibatch} "
                f"({self.minibatch // self.devices} per device on {self.devices} devices)")


@dataclasses.dataclass(frozen=True)
class FinalEval:
    """``config.final_eval``: base vs trained on held-out prompts at the end of training."""

    prompts: str  # the held-out prompt file
    num_images: int
    identifiers: tuple[int, ...]  # 0-based reward columns
    w1: float
    w2: float
    seed: int
    batch_prompts: int
    image_metrics: str  # registered image metrics, comma-separated


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a Parrot iteration and the loop around it read (hashable)."""

    seed: int
    sizes: Sizes
    num_iterations: int
    log_every: int
    checkpoint_every: int
    max_to_keep: int
    eval_every: int
    eval_prompts: tuple[str, ...]
    identifiers: str  # 'cycle' | 'random'
    expansions_per_prompt: int  # E groups share one drawn prompt
    max_prompt_length: int  # PEN input tokens
    guidance_scale: float  # CFG weight of training rollouts and updates
    eta: float  # DDIM eta
    rollout_chunks: int  # the training rollout runs G x N / devices images in this many chunks
    pen_train: bool
    pen_sampling: SamplingConfig
    pen_rl: PENRLConfig
    pen_advantage: str  # 'raw' | 'normalized'
    t2i_train: bool
    t2i: T2IUpdateConfig
    advantage: AdvantageConfig
    tracker_capacity: int
    tracker_buffer: int
    param_sharding: str  # 'replicate' | 'fsdp'
    hypervolume_reference: tuple[float, ...] | None  # None: each reward's batch minimum
    final_eval: FinalEval | None  # None: no closing evaluation

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, devices: int,
           num_rewards: int) -> Settings:
        """The typed settings of a checked ``config`` for a run on ``devices`` devices with
        ``num_rewards`` rewards; errors name the field to change."""
        c = config
        sizes = Sizes(c.num_groups, c.images_per_group, c.num_groups * c.images_per_group,
                      c.num_minibatches, c.num_groups * c.images_per_group // c.num_minibatches,
                      devices)
        if sizes.minibatch % devices:
            raise ConfigError(f"each T2I minibatch holds {sizes.minibatch} images (num_groups x "
                              f"images_per_group / num_minibatches), not a multiple of the "
                              f"{devices} devices: change images_per_group or num_minibatches")
        a, p = c.advantage, c.pen
        if a.mode == "weighted_sum" and len(a.weights) != num_rewards:
            raise ConfigError(f"config.advantage.weights has {len(a.weights)} entries for "
                              f"{num_rewards} rewards")
        if a.mode == "single" and a.reward_index >= num_rewards:
            raise ConfigError(f"config.advantage.reward_index={a.reward_index} for "
                              f"{num_rewards} rewards")
        try:
            reference = parse_reference(c.hypervolume_reference, num_rewards)
            pen_rl = PENRLConfig.preset(p.rl_preset, learning_rate=p.learning_rate,
                                        lora_rank=p.lora_rank, lora_alpha=p.lora_alpha,
                                        lora_targets=p.lora_targets,
                                        expansions_per_prompt=p.expansions_per_prompt)
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("config.") else f"config.pen: {e}") from e
        return cls(
            seed=c.seed, sizes=sizes, num_iterations=c.num_iterations, log_every=c.log_every,
            checkpoint_every=c.checkpoint_every, max_to_keep=c.max_to_keep,
            eval_every=c.eval_every, eval_prompts=tuple(c.eval_prompts),
            identifiers=c.identifiers, expansions_per_prompt=p.expansions_per_prompt,
            max_prompt_length=c.data.max_prompt_length,
            guidance_scale=float(c.sample.guidance_scale), eta=float(c.sample.eta),
            rollout_chunks=rollout_chunks(c, devices),
            pen_train=p.train,
            pen_sampling=SamplingConfig(max_new_tokens=p.max_new_tokens,
                                        temperature=p.temperature, top_k=p.top_k,
                                        top_p=p.top_p),
            pen_rl=pen_rl, pen_advantage=p.advantage, t2i_train=c.t2i.train,
            t2i=t2i_update(c, devices),
            advantage=AdvantageConfig(mode=a.mode, pareto=a.pareto, selection=a.selection,
                                      stats=a.stats, weights=tuple(a.weights),
                                      reward_index=a.reward_index, adv_clip=a.adv_clip,
                                      min_count=a.tracker_min_count),
            tracker_capacity=a.tracker_capacity, tracker_buffer=a.tracker_buffer,
            param_sharding=c.param_sharding,
            hypervolume_reference=None if reference is None else tuple(reference.tolist()),
            final_eval=final_eval(c.final_eval, num_rewards))


def rollout_chunks(config: ml_collections.ConfigDict, devices: int = 1) -> int:
    """How many chunks the training rollout runs its G x N images in (``sample.microbatch``)."""
    return _chunks(config.num_groups * config.images_per_group // devices,
                   config.sample.microbatch, "sample.microbatch", "a rollout")


def _chunks(per_device: int, micro: int, field: str, what: str) -> int:
    """``per_device`` images in chunks of ``micro`` (0, or at least ``per_device``: one)."""
    if not micro or micro >= per_device:
        return 1
    if per_device % micro:
        raise ConfigError(f"config.{field}={micro} does not divide the {per_device} images "
                          f"of {what} per device")
    return per_device // micro


def t2i_update(config: ml_collections.ConfigDict, devices: int = 1) -> T2IUpdateConfig:
    """``config.t2i`` (and the DDIM eta it re-scores with) as the T2I update's settings, for
    minibatches split over ``devices``."""
    t = config.t2i
    per_device = config.num_groups * config.images_per_group // config.num_minibatches // devices
    return T2IUpdateConfig(trainable=t.trainable, learning_rate=t.learning_rate,
                           warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                           max_grad_norm=t.max_grad_norm, clip_range=t.clip_range,
                           timestep_fraction=t.timestep_fraction, scan_unroll=t.scan_unroll,
                           remat_policy="nothing_saveable" if t.remat else None,
                           eta=config.sample.eta, adv_clip=None,
                           microbatches=_chunks(per_device, t.microbatch, "t2i.microbatch",
                                                "a minibatch"),
                           rescore=t.rescore == "on" or (t.rescore == "auto"
                                                         and config.model.dtype != "float32"))


def final_eval(fe: ml_collections.ConfigDict, num_rewards: int) -> FinalEval | None:
    """``config.final_eval``, checked before training rather than after it: the prompt file
    reads, the identifiers parse. None when no prompt file is set."""
    if not fe.prompts:
        return None
    read_prompts(fe.prompts)
    try:
        ids = [] if fe.identifiers == "none" else parse_identifiers(fe.identifiers, num_rewards)
    except ValueError as e:
        raise ConfigError(f"config.final_eval.identifiers: {e}") from e
    return FinalEval(prompts=fe.prompts, num_images=fe.num_images, identifiers=tuple(ids),
                     w1=float(fe.w1), w2=float(fe.w2), seed=fe.seed,
                     batch_prompts=fe.batch_prompts, image_metrics=fe.image_metrics)


def check_prompt_files(config: ml_collections.ConfigDict, prompts: PromptList,
                       models: Any) -> None:
    """Every prompt list of a run, each whole and at set-up, against the limits of where it is
    used, so that a prompt that would stop the run at its draw (on every resume: draws are a
    pure function of seed and position), at an evaluation grid or at the closing evaluation
    stops it before the first iteration instead, naming its ``file:line``: the RL prompts
    (``prompts``, ``config.data.prompts``) and ``config.eval_prompts`` go through the PEN
    (``data.max_prompt_length``); the held-out ``final_eval.prompts`` are sampled as inference
    does (``inference_limits``: also the text encoder's context). ``models``: the run's
    ``ParrotModels``. Raises ``DatasetError``."""
    pen = pen_limit(models.pen_tokenizer, config.data.max_prompt_length)
    check_prompt_lengths(prompts, [pen])
    check_prompt_lengths(config_prompt_list(config.eval_prompts, "eval_prompts"), [pen])
    if config.final_eval.prompts:
        check_prompt_lengths(read_prompt_list(config.final_eval.prompts),
                             inference_limits(models, config.data.max_prompt_length))
