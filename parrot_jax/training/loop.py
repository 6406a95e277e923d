"""The Parrot training loop (the paper's Algorithm 1, DESIGN.md §4), resumable and logged.

One iteration over G groups x N images (``parrot_iteration``):

1. draw G prompts c_g (deterministic in the seed and the data position, so a resume is exact);
   with ``pen.expansions_per_prompt = E`` only G / E are drawn, each filling E groups;
2. the PEN samples one expansion ĉ_g per group, recording its log-probs;
3. each group gets a reward identifier k_g (one per prompt) and the text
   ``"<reward k_g>, " + ĉ_g``, fitted to the CLIP context (the expansion is cut, never the
   identifier);
4. the CLIP text encoder embeds it and the null prompt; N images per group are rolled out
   (CFG, DDIM, eta 1) by the jitted scan sampler, keeping the latent chain and log-probs;
5. the VAE decodes ``x_0 / scaling_factor`` to images in [0, 1]; the ``RewardSet`` scores all
   K rewards at once -> R ``[G*N, K]``;
6. non-dominated masks and advantages as ``config.advantage`` says (``rl.compute_advantages``);
7. the T2I update: ``num_minibatches`` optimiser steps of the DDPO clipped objective over a
   random split of the batch;
8. the PEN update: REINFORCE on its LoRA with the group's advantage = the mean, over the group's
   selected (non-dominated, valid) images, of the reward the group maximised (r_{k_g}; the
   scalarised reward for 'weighted_sum' / 'single'). This is Algorithm 1's
   ``∇J_φ += -r_k ∇log p_φ(ĉ|c)`` summed over P, divided by |P| so that groups with large fronts
   do not dominate; ``config.pen.advantage='normalized'`` z-scores each reward over the batch
   first (``rl.group_advantages``).

Everything after the prompts' text handling runs on device, with the batch sharded over
``('data', 'fsdp')``; metrics are fetched only at log steps (``metrics.jsonl``, and TensorBoard
scalars in ``workdir/tensorboard`` from process 0). Every ``eval_every`` iterations
``write_pictures`` saves ``workdir/eval/grid_<step>.png`` (the current policy's images for the
fixed ``eval_prompts``, from a fixed key outside the training stream) and ``pareto_<step>.png``
(the batch's rewards, selected samples highlighted), also as TensorBoard images. On several
hosts every process draws the same G prompts and runs the (small, replicated) PEN and
tokenisation identically; the image batch is what is split across hosts. The whole state (T2I
trainable parameters and optimiser, PEN LoRA and optimiser, step, PRNG key, advantage tracker, data
position) is checkpointed with orbax; SIGTERM saves and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from parrot_jax import parallel
from parrot_jax.data.promptist import read_prompts
from parrot_jax.diffusion import CFG, branch_contexts, rollout
from parrot_jax.expansion import (
    InstructionTemplate,
    PENRLConfig,
    SamplingConfig,
    assign_identifiers,
    decode,
    identifier_prefix,
    init_pen_lora,
    parse_identifiers,
    pen_rl_optimizer,
    pen_rl_step,
    tokenize_conditioning,
    tokenize_prompts,
)
from parrot_jax.expansion import sample as pen_sample
from parrot_jax.models.lora import LoRA, merge
from parrot_jax.models.vae import latents_to_images
from parrot_jax.rl import (
    PEN_MODES,
    AdvantageConfig,
    compute_advantages,
    group_advantages,
    init_stat_tracker,
)
from parrot_jax.training import checkpoint
from parrot_jax.training.metrics import MetricsWriter, front_hypervolume, parse_reference
from parrot_jax.training.models import BUILTIN_PROMPTS, ParrotModels, load_models
from parrot_jax.training.precision import check_matmul_precision, under_matmul_precision
from parrot_jax.training.step import (
    T2IBatch,
    T2ITrainState,
    T2IUpdateConfig,
    batch_shardings,
    init_train_state,
    make_train_step,
    merged_params,
    state_shardings,
)
from parrot_jax.training.tensorboard import TENSORBOARD_DIR, TensorBoardWriter
from parrot_jax.training.visualize import image_grid, pareto_scatter, png_bytes

# Every config field the loop reads; anything else in a config is a mistake (a typo, a field of
# another trainer) and is refused. Entries ending in '.' admit any field below them.
KNOWN_FIELDS = (
    "seed", "distributed", "mesh.", "param_sharding", "model.pretrained", "model.pen",
    "model.pen_tokenizer", "model.rewards", "model.dtype", "model.tiny.", "data.prompts",
    "data.max_prompt_length", "num_groups", "images_per_group", "num_minibatches",
    "num_iterations", "sample.num_steps", "sample.guidance_scale", "sample.eta",
    "sample.scheduler.", "pen.train", "pen.max_new_tokens", "pen.temperature", "pen.top_k",
    "pen.top_p", "pen.rl_preset", "pen.advantage", "pen.learning_rate", "pen.lora_rank",
    "pen.lora_alpha", "pen.lora_targets", "pen.expansions_per_prompt", "pen.per_image",
    "identifiers", "advantage.mode", "advantage.pareto", "advantage.selection",
    "advantage.stats", "advantage.weights", "advantage.reward_index", "advantage.adv_clip",
    "advantage.tracker_capacity", "advantage.tracker_buffer", "advantage.tracker_min_count",
    "t2i.train", "t2i.trainable", "t2i.learning_rate", "t2i.warmup_steps", "t2i.weight_decay",
    "t2i.max_grad_norm", "t2i.clip_range", "t2i.timestep_fraction", "t2i.scan_unroll",
    "hypervolume_reference", "matmul_precision",
    "log_every", "checkpoint_every", "max_to_keep", "eval_every", "eval_prompts",
    "final_eval.",
)
PARAM_RULES = {"replicate": parallel.REPLICATE_ALL, "fsdp": parallel.FSDP_ALL}
PROGRESS_WIDTH = 20  # characters of the progress bar in each logged line


# --- configuration ---------------------------------------------------------------------------

def check_fields(config: ml_collections.ConfigDict) -> None:
    """Refuse config fields the loop does not read (naming them)."""
    leaves = checkpoint._flat(checkpoint.config_dict(config))
    unknown = sorted(k for k in leaves if not any(
        k == f or (f.endswith(".") and k.startswith(f)) for f in KNOWN_FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}: the Parrot loop does not read "
                         "them (a typo?)")


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


def derived_sizes(config: ml_collections.ConfigDict, devices: int) -> Sizes:
    """Check the batch arithmetic; errors say which field to change."""
    g, n, m = config.num_groups, config.images_per_group, config.num_minibatches
    for name in ("num_groups", "images_per_group", "num_minibatches", "num_iterations",
                 "log_every", "checkpoint_every", "max_to_keep", "eval_every"):
        if not isinstance(config[name], int) or config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]!r} must be a positive int")
    b = g * n
    if b % m:
        raise ValueError(f"config.num_minibatches={m} must divide the {b} images per iteration "
                         f"(num_groups={g} x images_per_group={n})")
    if (b // m) % devices:
        raise ValueError(f"each T2I minibatch holds {b // m} images (num_groups x "
                         f"images_per_group / num_minibatches), not a multiple of the {devices} "
                         "devices: change images_per_group or num_minibatches")
    return Sizes(g, n, b, m, b // m, devices)


def t2i_update_config(config: ml_collections.ConfigDict) -> T2IUpdateConfig:
    t = config.t2i
    warmup = t.get("warmup_steps", checkpoint.ADDED_FIELDS["t2i.warmup_steps"])
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"config.t2i.warmup_steps={warmup!r}: a non-negative integer "
                         "(optimiser steps; 0: no warm-up)")
    return T2IUpdateConfig(trainable=t.trainable, learning_rate=t.learning_rate,
                           warmup_steps=warmup,
                           weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                           clip_range=t.clip_range, timestep_fraction=t.timestep_fraction,
                           scan_unroll=t.scan_unroll, eta=config.sample.eta,
                           adv_clip=None)


def advantage_config(config: ml_collections.ConfigDict) -> AdvantageConfig:
    a = config.advantage
    return AdvantageConfig(mode=a.mode, pareto=a.pareto, selection=a.selection, stats=a.stats,
                           weights=tuple(a.weights), reward_index=a.reward_index,
                           adv_clip=a.adv_clip, min_count=a.tracker_min_count)


def pen_configs(config: ml_collections.ConfigDict) -> tuple[SamplingConfig, PENRLConfig]:
    """``config.pen`` as the PEN's sampling and REINFORCE settings (a field missing from an
    older workdir's config means its ``checkpoint.ADDED_FIELDS`` value)."""
    p = config.pen
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p)
    per_prompt = expansions_per_prompt(config)
    try:
        rl = PENRLConfig.preset(p.rl_preset, learning_rate=p.learning_rate,
                                lora_rank=p.lora_rank, lora_alpha=p.lora_alpha,
                                lora_targets=p.get("lora_targets",
                                                   checkpoint.ADDED_FIELDS["pen.lora_targets"]),
                                expansions_per_prompt=per_prompt)
    except ValueError as e:
        raise ValueError(f"config.pen: {e}") from e
    return sampling, rl


def expansions_per_prompt(config: ml_collections.ConfigDict) -> int:
    """``config.pen.expansions_per_prompt``, checked to divide ``num_groups``. Workdirs written
    before the field existed expanded every prompt once, which is what 1 means."""
    e = config.pen.get("expansions_per_prompt",
                       checkpoint.ADDED_FIELDS["pen.expansions_per_prompt"])
    if not isinstance(e, int) or e <= 0 or config.num_groups % e:
        raise ValueError(f"config.pen.expansions_per_prompt={e!r} must be a positive int that "
                         f"divides num_groups={config.num_groups}")
    return e


TFDS_PREFIX = "tfds:"


def tfds_prompts(spec: str) -> list[str]:
    """``'tfds:<data_dir>[:<split>]'`` (split ``train`` by default): the distinct user prompts
    of a prepared ``promptist_pairs`` TFDS dataset (the PEN SFT data), in record order."""
    from parrot_jax.data.pipeline import as_pair
    from parrot_jax.data.promptist import DatasetError
    from parrot_jax.data.tfds_promptist import data_source

    data_dir, _, split = spec[len(TFDS_PREFIX):].rpartition(":")
    if not data_dir:  # no split given
        data_dir, split = spec[len(TFDS_PREFIX):], "train"
    source = data_source(data_dir, split)
    prompts = list(dict.fromkeys(as_pair(source[i]).prompt for i in range(len(source))))
    if not prompts:
        raise DatasetError(f"config.data.prompts={spec!r}: the split holds no prompts")
    return prompts


def load_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """``data.prompts``: 'builtin', a text file with one prompt per line, or a prepared TFDS
    dataset ``'tfds:<data_dir>[:<split>]'`` (``tfds_prompts``). Every host reads the whole
    list: the draw of each iteration's prompts is a pure function of (seed, position), so all
    hosts agree on the global batch without communicating."""
    source = config.data.prompts
    if source == "builtin":
        return list(BUILTIN_PROMPTS)
    if source.startswith(TFDS_PREFIX):
        return tfds_prompts(source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"config.data.prompts={source!r}: no such file (or 'builtin')")
    return read_prompts(source)


def draw_prompts(prompts: Sequence[str], seed: int, position: int,
                 count: int) -> np.ndarray:
    """int ``[count]``: the prompt indices of draw number ``position`` (a pure function of the
    seed and the position, so resuming at a position repeats nothing and skips nothing)."""
    rng = np.random.default_rng([seed, position])
    return rng.choice(len(prompts), count, replace=len(prompts) < count)


def group_prompts(prompts: Sequence[str], config: ml_collections.ConfigDict, position: int,
                  step: int, num_rewards: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_ids [G], identifiers [G])`` of one iteration: ``G / E`` prompts drawn at
    ``position`` (``draw_prompts``), each given to ``E = pen.expansions_per_prompt``
    consecutive groups that share its identifier, so that the PEN's baseline over a prompt's
    expansions compares texts scored by the same reward."""
    e = expansions_per_prompt(config)
    n = config.num_groups // e
    ids = draw_prompts(prompts, config.seed, position, n)
    k = assign_identifiers(n, num_rewards, config.identifiers, start=step * n, key=key)
    return np.repeat(ids, e), np.repeat(k, e)


# --- jitted pieces ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("module", "config"))
def _expand(module: Any, config: SamplingConfig, params: Any, lora: LoRA, ids: jax.Array,
            mask: jax.Array, key: jax.Array):
    """PEN expansions of ``ids [G, S]`` under the current LoRA (``PENSample`` fields
    ``[G, max_new_tokens]``)."""
    return pen_sample(module, merge(params, lora), ids, mask, key, config)


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "vae", "group_size",
                                             "latent_shape", "eta", "scaling_factor",
                                             "sharding"))
def _rollout_and_decode(unet: Any, text_encoder: Any, vae: Any, group_size: int,
                        latent_shape: tuple[int, int, int], eta: float, scaling_factor: float,
                        sharding: NamedSharding, unet_params: Any, text_params: Any,
                        vae_params: Any, schedule: Any, guidance: CFG, cond_ids: jax.Array,
                        null_ids: jax.Array, key: jax.Array):
    """cond_ids ``[G, L]``, null_ids ``[1, L]`` -> (images ``[G*N, H, W, 3]`` in [0, 1],
    trajectory, contexts ``[G*N, 2, L, D]``). The text encoder runs without an attention mask,
    as SD's pipeline does (padding positions are causal-masked away from the pooled token)."""
    def embed(ids):
        return text_encoder.apply({"params": text_params}, ids)["last_hidden_state"]

    cond = jnp.repeat(embed(cond_ids), group_size, axis=0)
    contexts = jax.lax.with_sharding_constraint(branch_contexts(embed(null_ids), cond), sharding)
    x_0, traj = rollout(unet, unet_params, schedule, contexts, guidance, key,
                        latent_shape=latent_shape, eta=eta, sharding=sharding)
    images = jax.lax.with_sharding_constraint(
        latents_to_images(vae, vae_params, x_0, scaling_factor), sharding)
    return images, traj, contexts


@functools.partial(jax.jit, static_argnames=("config", "group_size", "names", "replicated",
                                             "pen_mode"))
def _advantages(config: AdvantageConfig, group_size: int, names: tuple[str, ...],
                replicated: NamedSharding, pen_mode: str, rewards: jax.Array,
                reward_ids: jax.Array, tracker: Any, prompt_ids: jax.Array):
    """-> (Advantages, tracker, PEN advantage per group ``[G]``, reward / selection metrics).
    The tracker stays replicated (a stable sharding: the next call reuses this compilation)."""
    adv, tracker = compute_advantages(rewards, reward_ids, config, group_size=group_size,
                                      tracker=tracker, prompt_ids=prompt_ids)
    tracker = jax.lax.with_sharding_constraint(tracker, replicated)
    pen_adv = group_advantages(rewards, reward_ids, adv.selected, config,
                               group_size=group_size, mode=pen_mode)
    ok = adv.valid[:, None]
    count = jnp.maximum(jnp.sum(adv.valid), 1)
    mean = jnp.sum(jnp.where(ok, rewards, 0.0), axis=0) / count
    std = jnp.sqrt(jnp.sum(jnp.where(ok, (rewards - mean) ** 2, 0.0), axis=0) / count)
    metrics = {"pareto/selected_fraction": jnp.mean(adv.selected.astype(jnp.float32)),
               "reward/nan_count": jnp.sum(~adv.valid).astype(jnp.float32),
               "advantage/mean_abs": jnp.mean(jnp.abs(adv.advantages))}
    for i, name in enumerate(names):
        metrics[f"reward/{name}/mean"] = mean[i]
        metrics[f"reward/{name}/std"] = std[i]
    return adv, tracker, pen_adv, metrics


@functools.partial(jax.jit, static_argnames=("sharding",))
def _minibatch(sharding: T2IBatch, batch: T2IBatch, rows: jax.Array) -> T2IBatch:
    """The samples ``rows`` of ``batch`` (timesteps shared), placed over the batch axes."""
    take = lambda x, s: jax.lax.with_sharding_constraint(jnp.take(x, rows, axis=0), s)  # noqa: E731
    return T2IBatch(latents=take(batch.latents, sharding.latents),
                    log_probs=take(batch.log_probs, sharding.log_probs),
                    timesteps=batch.timesteps,
                    contexts=take(batch.contexts, sharding.contexts),
                    advantages=take(batch.advantages, sharding.advantages),
                    selected=take(batch.selected, sharding.selected))


# Compiled T2I steps, shared by runs of one process with the same model and settings (a resumed
# run in a test or a notebook compiles nothing twice).
_TRAIN_STEPS: dict[Any, Any] = {}


def _train_step_fn(models: ParrotModels, config: ml_collections.ConfigDict,
                   update: T2IUpdateConfig, mesh: Mesh, state: T2ITrainState,
                   rules: Any) -> Any:
    key = (models.unet, update, mesh, rules, config.sample.guidance_scale,
           json.dumps(checkpoint.config_dict(config.sample)), config.model.pretrained)
    if key not in _TRAIN_STEPS:
        _TRAIN_STEPS[key] = make_train_step(
            models.unet, models.schedule, CFG(config.sample.guidance_scale), update, mesh=mesh,
            state_sharding=state_shardings(state, mesh, rules))
    return _TRAIN_STEPS[key]


# --- state -----------------------------------------------------------------------------------

def initial_state(config: ml_collections.ConfigDict, models: ParrotModels, mesh: Mesh,
                  update: T2IUpdateConfig, pen_rl: PENRLConfig) -> tuple[dict, Any]:
    """``(state, frozen T2I parameters)``. The state is what a checkpoint holds: ``step``,
    ``key`` (raw PRNG key data), ``t2i`` (step, trainable, opt_state), ``pen`` (lora,
    opt_state), ``tracker``, ``data_position`` (prompt draws consumed)."""
    root = jax.random.key(config.seed)
    t2i = init_train_state(models.unet_params, update, key=jax.random.fold_in(root, 10),
                           mesh=mesh, rules=PARAM_RULES[config.param_sharding])
    try:
        lora = init_pen_lora(jax.random.fold_in(root, 11), models.pen_params, pen_rl)
    except ValueError as e:
        raise ValueError(f"config.pen.lora_targets: {e} (model.pen={config.model.pen!r})") from e
    a = config.advantage
    state = {
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(jax.random.fold_in(root, 12)),
        "t2i": {"step": t2i.step, "trainable": t2i.trainable, "opt_state": t2i.opt_state},
        "pen": {"lora": lora, "opt_state": pen_rl_optimizer(pen_rl).init(lora.factors)},
        "tracker": init_stat_tracker(a.tracker_capacity, a.tracker_buffer),
        "data_position": jnp.zeros((), jnp.int32),
    }
    return state, t2i.frozen


@dataclasses.dataclass
class Run:
    """What one ``train_and_evaluate`` call holds fixed."""

    config: ml_collections.ConfigDict
    models: ParrotModels
    mesh: Mesh
    sizes: Sizes
    prompts: list[str]
    template: InstructionTemplate
    sampling: SamplingConfig
    pen_rl: PENRLConfig
    update: T2IUpdateConfig
    advantage: AdvantageConfig
    frozen: Any
    train_step: Any
    null_ids: np.ndarray


# --- one iteration ---------------------------------------------------------------------------

def _policy_rollout(run: Run, state: dict, cond_ids: Any, key: jax.Array,
                    group_size: int) -> tuple:
    """G x N images in [0, 1] from the current T2I policy for the conditioning token ids
    ``[G, L]`` (CFG against the null prompt): ``(images, trajectory, contexts)``."""
    m, c = run.models, run.config
    t2i_params = merged_params(state["t2i"]["trainable"], run.frozen)
    return _rollout_and_decode(
        m.unet, m.text_encoder, m.vae, group_size, m.latent_shape, c.sample.eta,
        m.scaling_factor, parallel.batch_sharding(run.mesh), t2i_params, m.text_params,
        m.vae_params, m.schedule, CFG(c.sample.guidance_scale), cond_ids, run.null_ids, key)


class PhaseTimer:
    """Wall seconds per phase of ``parrot_iteration`` (benchmarks only: each phase ends by
    blocking on its outputs, which removes the overlap of host and device work)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str, *outputs: Any) -> None:
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        self._start = now


def parrot_iteration(run: Run, state: dict, timer: PhaseTimer | None = None
                     ) -> tuple[dict, dict[str, jax.Array], jax.Array, jax.Array]:
    """One Parrot iteration (module docstring) -> (new state, device metrics, rewards
    ``[B, K]``, selection mask ``[B]``: the samples the T2I update used). ``timer``: record
    per-phase times (blocking between phases)."""
    c, m, sizes = run.config, run.models, run.sizes
    mark = timer or (lambda name, *outputs: None)
    key, k_pen, k_id, k_roll, k_train, k_perm = jax.random.split(
        jax.random.wrap_key_data(state["key"]), 6)
    position = int(state["data_position"])
    step = int(state["step"])

    # 1. prompts c_g (and 3.'s identifiers k_g: a prompt expanded E times keeps one k)
    prompt_ids, k_g = group_prompts(run.prompts, c, position, step, len(m.rewards.names), k_id)
    prompts = [run.prompts[i] for i in prompt_ids]
    per_image_pen = bool(c.pen.get("per_image", False))
    per_image = lambda xs: [x for x in xs for _ in range(sizes.group_size)]  # noqa: E731
    if per_image_pen:
        prompts_pen, k_pen_ids = per_image(prompts), np.repeat(k_g, sizes.group_size)
    else:
        prompts_pen, k_pen_ids = prompts, k_g
    # 2. expansions ĉ_g ~ p_φ(ĉ | c_g)
    ids, mask = tokenize_prompts(m.pen_tokenizer, prompts_pen, c.data.max_prompt_length,
                                 run.template)
    lora = state["pen"]["lora"]
    expansion = _expand(m.pen, run.sampling, m.pen_params, lora, ids, mask, k_pen)
    expanded = decode(m.pen_tokenizer, expansion.tokens, expansion.mask)
    mark("pen_expand", expansion)
    # 3. the conditioning text "<reward k_g>, " + ĉ_g
    cond = tokenize_conditioning(m.clip_tokenizer, [identifier_prefix([k]) for k in k_pen_ids],
                                 expanded, m.context_length)
    # 4.-5. rollouts of N images per group, decoded to [0, 1]
    images, traj, contexts = _policy_rollout(run, state, cond["input_ids"], k_roll,
                                             1 if per_image_pen else sizes.group_size)
    mark("rollout_and_decode", images, traj, contexts)
    inputs = m.rewards.inputs(images, prompts=per_image(prompts),
                              conditions=cond["texts"] if per_image_pen
                              else per_image(cond["texts"]))
    rewards = m.rewards.submit(inputs).result()
    mark("rewards", rewards)
    # 6. Pareto selection and advantages
    reward_ids = np.repeat(k_g, sizes.group_size).astype(np.int32)
    adv, tracker, pen_adv, metrics = _advantages(
        run.advantage, sizes.group_size, m.rewards.names, parallel.replicated(run.mesh),
        c.pen.advantage, rewards, reward_ids,
        state["tracker"], np.repeat(prompt_ids, sizes.group_size).astype(np.int32))
    mark("advantages", adv, metrics)
    new = {**state, "tracker": tracker, "key": jax.random.key_data(key),
           "step": state["step"] + 1, "data_position": state["data_position"] + 1}
    # 7. T2I update: num_minibatches optimiser steps over a random split of the batch
    if c.t2i.train:
        batch = T2IBatch(traj.latents, traj.log_probs, traj.timesteps, contexts, adv.advantages,
                         adv.selected)
        t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                            frozen=run.frozen, opt_state=state["t2i"]["opt_state"])
        order = np.asarray(jax.random.permutation(k_perm, sizes.batch))
        sharding = batch_shardings(run.mesh)
        steps = []
        for i in range(sizes.minibatches):
            rows = order[i * sizes.minibatch:(i + 1) * sizes.minibatch]
            t2i, out = run.train_step(t2i, _minibatch(sharding, batch, rows),
                                      jax.random.fold_in(k_train, i))
            steps.append(out)
        run.frozen = t2i.frozen  # the step donates the whole state; frozen comes back as is
        new["t2i"] = {"step": t2i.step, "trainable": t2i.trainable, "opt_state": t2i.opt_state}
        for name in ("loss", "approx_kl", "clipfrac", "grad_norm"):
            metrics[f"t2i/{name}"] = jnp.mean(jnp.stack([s[name] for s in steps]))
        # The first minibatch is scored by the policy that sampled it, so its ratios differ from
        # 1 only by numerics: how far the recomputed log-probs stray from the rollout's. Where
        # that exceeds the clip range, clipfrac_first > 0: reduced-precision float32 matmuls
        # (config.matmul_precision='default') do that in a CPU emulation of TF32 (README);
        # 'highest' asks for float32 ones, and float32 on a CPU gives 0.
        metrics["t2i/ratio_first"] = steps[0]["ratio"]
        metrics["t2i/clipfrac_first"] = steps[0]["clipfrac"]
        metrics["t2i/approx_kl_first"] = steps[0]["approx_kl"]
        mark("t2i_update", t2i)
    # 8. PEN update: REINFORCE with each group's mean selected reward
    if c.pen.train:
        lora, opt_state, out = pen_rl_step(
            lora, state["pen"]["opt_state"], m.pen_params, m.pen, run.pen_rl, ids, mask,
            expansion.tokens, expansion.mask, adv.advantages if per_image_pen else pen_adv)
        new["pen"] = {"lora": lora, "opt_state": opt_state}
        for name in ("loss", "log_prob", "grad_norm", "advantage"):
            metrics[f"pen/{name}"] = out[name]
        mark("pen_update", lora)
    return new, metrics, rewards, adv.selected


# --- evaluation pictures ---------------------------------------------------------------------

EVAL_COLUMNS = 8  # images per evaluation prompt shown in the grid (of the N rolled out)
EVAL_KEY = 13  # fold_in index of the evaluation key (10-12: initial_state's)


def check_eval_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """``config.eval_prompts``: 1 to ``num_groups`` non-empty strings (each fills one group's
    row of the evaluation batch, so evaluation reuses the training rollout's compilation)."""
    prompts = config.eval_prompts
    if (isinstance(prompts, str) or not isinstance(prompts, Sequence)
            or not 0 < len(prompts) <= config.num_groups
            or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ValueError(f"config.eval_prompts={prompts!r}: 1 to num_groups="
                         f"{config.num_groups} non-empty prompts")
    return list(prompts)


def check_final_eval(config: ml_collections.ConfigDict, num_rewards: int) -> None:
    """``config.final_eval``, checked before training rather than after it: the prompt file
    reads, the identifiers parse, the sizes are positive."""
    fe = config.final_eval
    if not fe.prompts:
        return
    read_prompts(fe.prompts)
    if fe.identifiers != "none":
        try:
            parse_identifiers(fe.identifiers, num_rewards)
        except ValueError as e:
            raise ValueError(f"config.final_eval.identifiers: {e}") from e
    for name in ("num_images", "batch_prompts"):
        if not isinstance(fe[name], int) or fe[name] <= 0:
            raise ValueError(f"config.final_eval.{name}={fe[name]!r} must be a positive int")


def _host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on every host."""
    return np.asarray(x if x.is_fully_addressable
                      else multihost_utils.process_allgather(x, tiled=True))


def eval_images(run: Run, state: dict) -> tuple[np.ndarray, list[str]]:
    """Images ``[G, N, H, W, 3]`` in [0, 1] of the current policy (PEN LoRA and T2I model of
    ``state``) for ``config.eval_prompts``, cycled over the G groups, and the G conditioning
    texts. Row g is conditioned as training conditions a group, on one identifier, k = g mod K
    (the paper's all-identifier inference text does not fit small CLIP contexts, e.g. the tiny
    models' 16 tokens). The PEN and
    the noise use a fixed key apart from the training stream, so successive grids differ only
    by the policy and a resumed run draws what an uninterrupted one does."""
    c, m, sizes = run.config, run.models, run.sizes
    # Placed as the training keys are, so the training compilations are reused.
    k_pen, k_roll = jax.device_put(
        jax.random.split(jax.random.fold_in(jax.random.key(c.seed), EVAL_KEY)),
        parallel.replicated(run.mesh))
    prompts = check_eval_prompts(c)
    prompts = [prompts[g % len(prompts)] for g in range(sizes.groups)]
    ids, mask = tokenize_prompts(m.pen_tokenizer, prompts, c.data.max_prompt_length,
                                 run.template)
    expansion = _expand(m.pen, run.sampling, m.pen_params, state["pen"]["lora"], ids, mask,
                        k_pen)
    expanded = decode(m.pen_tokenizer, expansion.tokens, expansion.mask)
    prefixes = [identifier_prefix([g % len(m.rewards.names)]) for g in range(sizes.groups)]
    cond = tokenize_conditioning(m.clip_tokenizer, prefixes, expanded, m.context_length)
    images, _, _ = _policy_rollout(run, state, cond["input_ids"], k_roll, run.sizes.group_size)
    images = _host(images)
    return images.reshape(sizes.groups, sizes.group_size, *images.shape[1:]), cond["texts"]


def write_pictures(run: Run, state: dict, step: int, rewards: jax.Array, selected: jax.Array,
                   workdir: Path, tensorboard: TensorBoardWriter | None) -> None:
    """``workdir/eval/grid_<step>.png`` (``eval_images``, up to ``EVAL_COLUMNS`` per prompt)
    and ``pareto_<step>.png`` (the batch's rewards and selection), also as TensorBoard images.
    Every process takes part in the rollout; process 0 writes."""
    images, texts = eval_images(run, state)
    host_rewards, host_selected = _host(rewards), _host(selected)
    if jax.process_index() != 0:
        return
    side = max(images.shape[2:4])
    grid = image_grid(images[:, :EVAL_COLUMNS].reshape(-1, *images.shape[2:]),
                      min(EVAL_COLUMNS, images.shape[1]), cell=64 if side < 64 else min(side, 256))
    scatter = pareto_scatter(host_rewards, host_selected, run.models.rewards.names,
                             title=f"iteration {step}")
    out = workdir / "eval"
    out.mkdir(exist_ok=True)
    (out / f"grid_{step:06d}.png").write_bytes(png_bytes(grid))
    (out / f"pareto_{step:06d}.png").write_bytes(png_bytes(scatter))
    logging.info("iteration %d: evaluation grid rows %s", step, texts)
    if tensorboard is not None:
        tensorboard.image(step, "eval/grid", grid)
        tensorboard.image(step, "pareto/scatter", scatter)
        tensorboard.flush()


# --- the loop --------------------------------------------------------------------------------

class _Preemption:
    """Records SIGTERM (TPU preemption) while installed; the loop saves and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint after this iteration, then stopping")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[Run, dict]:
    """Check the config and the workdir, load prompts and models, build the initial state."""
    check_fields(config)
    check_matmul_precision(config)
    mesh = parallel.make_mesh(dict(config.mesh))
    sizes = derived_sizes(config, mesh.size)
    logging.info("process %d of %d; %d devices (%s); mesh %s", jax.process_index(),
                 jax.process_count(), mesh.size, jax.devices()[0].platform, dict(mesh.shape))
    logging.info("Sizes: %s; %d DDIM steps; %d iterations", sizes.describe(),
                 config.sample.num_steps, config.num_iterations)
    if config.param_sharding not in PARAM_RULES:
        raise ValueError(f"config.param_sharding={config.param_sharding!r}; one of "
                         f"{sorted(PARAM_RULES)}")
    if config.identifiers not in ("cycle", "random"):
        raise ValueError(f"config.identifiers={config.identifiers!r}; 'cycle' or 'random'")
    if config.pen.advantage not in PEN_MODES:
        raise ValueError(f"config.pen.advantage={config.pen.advantage!r}; one of {PEN_MODES}")
    update, advantage = t2i_update_config(config), advantage_config(config)
    sampling, pen_rl = pen_configs(config)
    checkpoint.check_workdir(config, workdir)

    logging.info("Loading prompts (%s)", config.data.prompts)
    prompts = load_prompts(config)
    template = InstructionTemplate()
    logging.info("Loading models (T2I %s, PEN %s, rewards %s)", config.model.pretrained,
                 config.model.pen, config.model.rewards)
    models = load_models(config, workdir, mesh, prompts, template)
    if advantage.mode == "weighted_sum" and len(advantage.weights) != len(models.rewards.names):
        raise ValueError(f"config.advantage.weights has {len(advantage.weights)} entries for "
                         f"the rewards {models.rewards.names}")
    parse_reference(config.hypervolume_reference, len(models.rewards.names))
    check_eval_prompts(config)
    check_final_eval(config, len(models.rewards.names))
    rep = parallel.replicated(mesh)
    models.text_params = jax.device_put(models.text_params, rep)
    models.vae_params = jax.device_put(models.vae_params, rep)
    models.pen_params = jax.device_put(models.pen_params, rep)
    state, frozen = initial_state(config, models, mesh, update, pen_rl)
    # Everything outside the T2I state is small and replicated, so every iteration (and a
    # restored state) presents the same shardings and reuses the first compilation.
    state.update(jax.device_put({k: state[k] for k in ("step", "key", "pen", "tracker",
                                                       "data_position")}, rep))
    t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                        frozen=frozen, opt_state=state["t2i"]["opt_state"])
    train_step = _train_step_fn(models, config, update, mesh, t2i,
                                PARAM_RULES[config.param_sharding])
    null = models.clip_tokenizer([""], padding="max_length", max_length=models.context_length)
    run = Run(config, models, mesh, sizes, prompts, template, sampling, pen_rl, update,
              advantage, frozen, train_step, np.asarray(null["input_ids"], np.int32))
    checkpoint.write_config(config, workdir)
    return run, state


@under_matmul_precision()
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) Parrot training as ``config`` says, writing ``config.json``,
    ``metrics.jsonl`` and orbax checkpoints to ``workdir``. Returns the last logged record with
    ``step`` and ``preempted`` (True when SIGTERM stopped the run). Everything runs under
    ``config.matmul_precision``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run, state = setup(config, workdir)
    reference = parse_reference(config.hypervolume_reference, len(run.models.rewards.names))
    manager = checkpoint.checkpoint_manager(workdir, config.max_to_keep)
    state, restored = checkpoint.restore_latest(manager, state)
    if restored is not None:
        logging.info("Resuming from the checkpoint at iteration %d", restored)
    step = int(state["step"])
    tensorboard = (TensorBoardWriter(workdir / TENSORBOARD_DIR) if jax.process_index() == 0
                   else None)
    writer = MetricsWriter(workdir, tensorboard)
    result: dict[str, Any] = {"step": step, "preempted": False}
    logging.info("Compiling and training: iterations %d to %d", step, config.num_iterations)
    timer = None  # (start time, iterations) after the first (compiling) iteration
    try:
        with _Preemption() as preemption:
            while step < config.num_iterations:
                started = time.perf_counter()
                state, metrics, rewards, selected = parrot_iteration(run, state)
                step += 1
                writer.add(step, metrics)
                if timer is None:
                    jax.block_until_ready(state["step"])
                    timer = (time.perf_counter(), 0)
                    logging.info("iteration %d (with compilation): %.1f s", step,
                                 time.perf_counter() - started)
                else:
                    timer = (timer[0], timer[1] + 1)
                if step % config.log_every == 0 or step == config.num_iterations:
                    host_rewards = _host(rewards)
                    now = time.perf_counter()
                    extra = {"pareto/hypervolume": front_hypervolume(host_rewards, reference)}
                    if timer[1]:
                        extra["perf/samples_per_sec"] = (timer[1] * run.sizes.batch
                                                         / (now - timer[0]))
                        extra["perf/iteration_seconds"] = (now - timer[0]) / timer[1]
                    record = writer.flush(extra)
                    result.update(record)
                    eta = ((config.num_iterations - step) * extra["perf/iteration_seconds"]
                           if timer[1] else math.nan)
                    done = round(PROGRESS_WIDTH * step / config.num_iterations)
                    logging.info("[%s] iteration %d/%d, ETA %.0f s: %s",
                                 "#" * done + "." * (PROGRESS_WIDTH - done), step,
                                 config.num_iterations, eta,
                                 ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                           if k.startswith(("reward/", "t2i/loss", "pen/loss",
                                                            "perf/samples")) and "/std" not in k))
                if step % config.eval_every == 0:
                    write_pictures(run, state, step, rewards, selected, workdir, tensorboard)
                stop = preemption.requested or manager.reached_preemption(step)
                if (step % config.checkpoint_every == 0 or step == config.num_iterations
                        or stop):
                    checkpoint.save(manager, step, state)
                if stop:
                    result["preempted"] = True
                    logging.warning("stopped at iteration %d after a preemption signal; the "
                                    "checkpoint is saved", step)
                    break
        manager.wait_until_finished()
    finally:  # also on a NaN stop: close what holds threads and files
        manager.close()
        run.models.rewards.close()
        if tensorboard is not None:
            tensorboard.close()
    result["step"] = step
    if config.final_eval.prompts and not result["preempted"]:
        from parrot_jax.training.final_eval import final_evaluation, table

        record = final_evaluation(config, workdir)
        result["final_eval"] = record
        logging.info("Final evaluation, %d held-out prompts (%s):\n%s",
                     record["details"]["num_prompts"], config.final_eval.prompts, table(record))
    return result

