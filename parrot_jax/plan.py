"""Ahead-of-time planner: will this config fit those TPU slices, and how fast could it run?

``python -m parrot_jax.plan --config configs/sd15.py --topology v5e:2x4,v5e:4x4,v5p:2x2x1``
compiles, for each TPU topology and on this (CPU) machine, the programs a Parrot iteration runs
on the chips, with abstract, shape-only, full-size parameters placed as ``train.py`` places
them: the rollout (text encoding, the S-step CFG DDIM scan, VAE decoding), the reward models on
the iteration's images, the T2I train step (the scan over trained timesteps with its optimiser
update), its re-scoring pass, and the PEN's expansion and REINFORCE update. Nothing is
downloaded but a config.json for a hub id that ``parrot_jax.architectures`` does not cover.

For one topology it prints per chip: resident bytes (parameters, optimiser state, the PEN and
its LoRA, the reward models), each program's arguments, outputs and temporaries, each phase's
estimated peak and its share of HBM, FLOPs per iteration, and a roofline estimate of the time
per iteration. For several it prints one table row each. A config fits when every phase's peak
is at most ``--max_fraction`` (0.85) of the chip's HBM; ``--max_images_per_chip`` also finds,
by bisection, the most images a chip can process at once (``t2i.microbatch`` and
``sample.microbatch``) that still fit. Exit status 0 when every topology fits, else 1.

FLOPs come from XLA's cost analysis of single steps (one guided UNet call, one trained
timestep, the text encoder, the VAE decoder, the reward models, the PEN's update), multiplied by
how often an iteration runs them: XLA counts a loop body once, whatever its trip count. The
UNet's are checked against an analytic count (``roofline.unet_forward_flops``). Bytes moved
through HBM are each phase's FLOPs divided by its compiled TPU program's arithmetic intensity
(XLA's FLOPs over its bytes accessed); the roofline adds the gradient all-reduce over the
chips' interconnect. Needs ``jax[tpu]`` (libtpu): ``pip install 'parrot-jax[tpu]'``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from parrot_jax import architectures, cli, loading, parallel, policy
from parrot_jax import config as schema
from parrot_jax.data.prompts import BUILTIN_PROMPTS
from parrot_jax.data.tokenizer import build_clip_tokenizer, train_t5_tokenizer
from parrot_jax.diffusion import CFG, DDIMSchedule, guided_model_output
from parrot_jax.expansion import init_pen_lora, pen_rl_optimizer, pen_rl_step
from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig
from parrot_jax.precision import under_matmul_precision
from parrot_jax.rewards.configs import CLIP_VIT_B32, CLIP_VIT_L14, PICKSCORE
from parrot_jax.rewards.preprocess import ImageProcessorConfig, preprocess
from parrot_jax.roofline import (
    CHIPS,
    GIB,
    ChipSpec,
    phase_seconds,
    ring_allreduce_bytes,
    unet_forward_flops,
)
from parrot_jax.training.settings import Settings
from parrot_jax.training.state import PARAM_RULES
from parrot_jax.training.step import (
    T2ITrainState,
    accumulate_gradients,
    batch_spec,
    make_optimizer,
    make_train_step,
    merged_params,
    split_params,
    state_shardings,
)

# Single-host slices whose 8 chips libtpu would otherwise describe as two hosts of 4.
SINGLE_HOST = {"v5e:2x4": (2, 4, 1), "v6e:2x4": (2, 4, 1)}


# --- the chips -------------------------------------------------------------------------------

def topology_devices(topology: str) -> list[Any]:
    """The devices (one per chip) of a TPU topology such as ``'v5e:2x4'`` (libtpu; no TPU
    needed), on as many hosts as Cloud TPU gives that slice. Planning
    touches no chip, so it does not take libtpu's one-process lock: it may run beside a
    training process or another plan."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if topology in SINGLE_HOST:
        kwargs["chips_per_host_bounds"] = SINGLE_HOST[topology]
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                               **kwargs).devices
        if any(getattr(d, "core_on_chip", 0) for d in devices):  # v4: one device per chip,
            devices = topologies.get_topology_desc(  # as JAX runs it ("megacore")
                platform="tpu", topology_name=topology, chip_config_name="megacore",
                **kwargs).devices
        return list(devices)
    except Exception as e:  # libtpu missing, or an unknown topology name
        raise SystemExit(f"--topology {topology!r}: cannot describe it ({type(e).__name__}: "
                         f"{e}). Is jax[tpu] installed (pip install 'parrot-jax[tpu]')? Names "
                         "look like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:4x4.") from e


def chip_spec(devices: Sequence[Any], hbm_gib: float | None = None,
              tflops: float | None = None, hbm_gbs: float | None = None,
              ici_gbs: float | None = None) -> ChipSpec:
    """The chip of ``devices`` (``roofline.CHIPS`` by device kind), with any figure given."""
    kind = devices[0].device_kind
    if kind not in CHIPS and not hbm_gib:
        raise SystemExit(f"unknown chip {kind!r}: pass --hbm_gib (HBM per chip in GiB)")
    base = CHIPS.get(kind, ChipSpec(kind, 0.0))
    given = {k: v for k, v in dict(hbm_gib=hbm_gib, bf16_tflops=tflops, hbm_gbs=hbm_gbs,
                                   ici_gbs=ici_gbs).items() if v}
    return dataclasses.replace(base, **given)


# --- abstract models -------------------------------------------------------------------------

@dataclasses.dataclass
class AbstractModels:
    """Modules, parameter shapes and the sizes the programs need; no weights."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    pen: T5ForConditionalGeneration
    schedule: DDIMSchedule
    latent_shape: tuple[int, int, int]
    scaling_factor: float

    @property
    def context_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings


def abstract_models(config: ml_collections.ConfigDict) -> AbstractModels:
    """The modules ``config.model`` names, built from configs only ('tiny': the tiny shapes,
    with tokenizers built from the built-in prompts as ``train.py`` builds them), with the
    self-attention ``model.attention`` means on a TPU."""
    dtype = loading._dtype(config.model.dtype)
    steps = config.sample.num_steps
    if config.model.pretrained == "tiny":
        tokenizer = build_clip_tokenizer(loading._clip_corpus(BUILTIN_PROMPTS, 4),
                                         config.model.tiny.context_length)
        t2i = loading._tiny_t2i(config, tokenizer, dtype)
        unet, vae, text = t2i["unet"], t2i["vae"], t2i["text_encoder"]
        schedule = t2i["schedule"]
    else:
        root = config.model.pretrained
        unet = UNet2DConditionModel(UNetConfig.from_diffusers(
            architectures.pipeline_component(root, "unet")), dtype=dtype)
        vae = AutoencoderKL(VAEConfig.from_diffusers(
            architectures.pipeline_component(root, "vae")), dtype=dtype)
        text = CLIPTextModel(CLIPTextConfig.from_transformers(
            architectures.pipeline_component(root, "text_encoder"), root), dtype=dtype)
        schedule = DDIMSchedule.from_config(architectures.pipeline_component(root, "scheduler"),
                                            steps)
    if config.model.pen == "tiny":
        pen_tok = train_t5_tokenizer(list(BUILTIN_PROMPTS) + list(loading.MODIFIERS),
                                     config.model.tiny.t5_vocab_size)
        pen, _ = loading._tiny_pen(config, pen_tok, dtype)
    else:
        pen = T5ForConditionalGeneration(T5Config.from_transformers(
            architectures.t5_config(config.model.pen), config.model.pen), dtype=dtype)
    side = unet.config.sample_size
    impl = loading.attention_impl(config, "tpu")
    unet, vae = unet.clone(attention_impl=impl), vae.clone(attention_impl=impl)
    return AbstractModels(unet, vae, text, pen, schedule,
                          loading.latent_shape(config, unet, vae, side),
                          float(vae.config.scaling_factor))


# --- abstract arrays -------------------------------------------------------------------------

def _abstract(tree: Any, shardings: Any) -> Any:
    """Shapes of ``tree`` (arrays or ShapeDtypeStructs) with the given shardings attached."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _placed(tree: Any, sharding: Any) -> Any:
    """Every array leaf of ``tree`` as a ShapeDtypeStruct with one sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                       sharding=sharding), tree)


def chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of an abstract (sharded) tree."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


# --- the reward models -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardBackbone:
    """A reward set's CLIP backbone as the planner sees it: it encodes every image once, and
    each image's text once when a head reads text."""

    name: str
    module: CLIPModel
    processor: ImageProcessorConfig
    reads_text: bool


# config.model.rewards='parrot': aesthetic and sentiment share ViT-L/14 (image features only;
# the sentiment classes are embedded once), PickScore's ViT-H/14 and ViT-B/32 (CLIP score)
# also encode each image's prompt.
PARROT_BACKBONES = ((CLIP_VIT_L14, False), (PICKSCORE, True), (CLIP_VIT_B32, True))


def abstract_rewards(config: ml_collections.ConfigDict,
                     text_encoder: CLIPTextModel) -> tuple[RewardBackbone, ...] | None:
    """The backbones of ``config.model.rewards`` ('parrot' or 'tiny': the tiny text encoder's
    tokenizer, as ``loading`` builds it); None for other reward sets, which the planner does
    not build."""
    dtype = loading._dtype(config.model.dtype)
    name = config.model.rewards
    if name == "parrot":
        return tuple(RewardBackbone(
            source.split("/")[-1],
            CLIPModel(CLIPConfig.from_transformers(architectures.CLIP_MODELS[source], source),
                      dtype=dtype), ImageProcessorConfig.square(224), text)
            for source, text in PARROT_BACKBONES)
    if name == "tiny":
        t = config.model.tiny
        size = t.latent_size * 2 ** (len(t.vae.block_out_channels) - 1)
        text = CLIPTextConfig(vocab_size=text_encoder.config.vocab_size,
                              max_position_embeddings=t.context_length,
                              projection_dim=t.projection_dim, **t.text.to_dict())
        clip = CLIPModel(CLIPConfig(text=text, vision=CLIPVisionConfig(
            image_size=size, projection_dim=t.projection_dim, **t.vision.to_dict()),
            projection_dim=t.projection_dim), dtype=dtype)
        return (RewardBackbone("tiny_clip", clip, ImageProcessorConfig.square(size), True),)
    return None


def reward_features(backbones: tuple[RewardBackbone, ...], params: tuple, images: jax.Array,
                    ids: tuple) -> jax.Array:
    """What the reward heads read: each backbone's image features (and text features of
    ``ids [B, L]`` where it reads text), ``[B, n]`` (the heads on them are a few dot products)."""
    out = []
    for backbone, p, tokens in zip(backbones, params, ids):
        m = backbone.module
        pixels = preprocess(images, backbone.processor).astype(m.dtype)
        out.append(jnp.sum(m.apply({"params": p}, pixels, method=m.get_image_features), -1))
        if backbone.reads_text:
            out.append(jnp.sum(m.apply({"params": p}, tokens, method=m.get_text_features), -1))
    return jnp.stack(out, axis=-1)


# --- the plan --------------------------------------------------------------------------------

PHASES = ("rollout", "rewards", "t2i_update", "pen")
# What to change when a phase does not fit, by phase.
REMEDIES = {
    "rollout": "sample.microbatch (fewer images per chip at once), images_per_group or "
               "num_groups, model.frozen_dtype='bfloat16'",
    "rewards": "model.frozen_dtype='bfloat16' (reward weights in bf16), images_per_group or "
               "num_groups",
    "t2i_update": "t2i.microbatch (fewer images per chip at once), t2i.remat=True, "
                  "num_minibatches, param_sharding='fsdp', model.frozen_dtype='bfloat16'",
    "pen": "pen.lora_rank, model.pen (a smaller T5), num_groups",
}


@dataclasses.dataclass
class ProgramStats:
    """One compiled program's memory per chip (bytes) and XLA's cost analysis of it (loop bodies
    counted once), or why the TPU compiler refused it (``error``: it needs more memory than a
    chip has)."""

    name: str
    phase: str
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0
    code: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    error: str | None = None

    @classmethod
    def of(cls, name: str, phase: str, compiled: Any) -> ProgramStats:
        m = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        return cls(name, phase, m.argument_size_in_bytes, m.output_size_in_bytes,
                   m.temp_size_in_bytes, m.alias_size_in_bytes, m.generated_code_size_in_bytes,
                   float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))

    @property
    def intensity(self) -> float | None:
        """FLOPs per byte of HBM traffic of the compiled program (None: no figures)."""
        return self.flops / self.bytes_accessed if self.flops and self.bytes_accessed else None


def _compile(name: str, phase: str, lowered: Any) -> tuple[Any, ProgramStats]:
    """``(compiled or None, stats)``: the TPU compiler's out-of-memory refusal becomes a
    finding of the plan; any other failure is raised."""
    start = time.monotonic()
    try:
        compiled = lowered.compile()
        stats, outcome = ProgramStats.of(name, phase, compiled), "compiled"
    except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED, "Ran out of memory ..."
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, outcome = None, "refused (out of memory)"
        stats = ProgramStats(name, phase, error=str(e).split("\n")[0])
    # Progress on stderr: a paper-scale program takes minutes to compile on a laptop.
    print(f"plan: {name} {outcome} in {time.monotonic() - start:.0f} s (host peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.1f} GiB)",
          file=sys.stderr, flush=True)
    return compiled, stats


def _flops(fn: Any, *args: Any) -> float:
    """Global FLOPs of one call: XLA's cost analysis of the lowered, unpartitioned program (on
    the host backend; counting FLOPs of unoptimised HLO does not depend on the platform)."""
    args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), args)
    with parallel.traced_on(None):  # one device
        cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _g(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


@dataclasses.dataclass
class Plan:
    """What ``plan`` found for one topology; bytes per chip, FLOPs per iteration (all chips)."""

    topology: str
    devices: int
    hosts: int
    chip: ChipSpec
    max_fraction: float
    images: int  # per iteration
    minibatch_per_chip: int
    at_once: tuple[int, int]  # images per chip processed at once: (rollout, update)
    resident: dict[str, int]
    programs: list[ProgramStats]
    peaks: dict[str, int]  # per phase; a phase whose program did not compile is absent
    flops: dict[str, float]  # per part of the iteration, all chips
    unet_call: float  # FLOPs of one image's guided UNet call (all branches)
    unet_analytic: float  # the analytic count of the same
    seconds: dict[str, float | None]  # roofline per phase

    @property
    def hbm(self) -> int:
        return int(self.chip.hbm_gib * GIB)

    @property
    def limit(self) -> int:
        return int(self.max_fraction * self.hbm)

    @property
    def fits(self) -> bool:
        return (not any(s.error for s in self.programs)
                and max(self.peaks.values()) <= self.limit)

    @property
    def failures(self) -> list[str]:
        """One line per phase that does not fit: the program, the phase, the bytes, and the
        config fields that would make it fit."""
        out = [f"{s.name} (phase {s.phase}) did not compile: {s.error}; try "
               f"{REMEDIES[s.phase]}" for s in self.programs if s.error]
        out += [f"phase {phase} needs {_g(peak)} per chip, over {100 * self.max_fraction:.0f}% "
                f"of {self.chip.hbm_gib:g} GiB ({_g(self.limit)}); try {REMEDIES[phase]}"
                for phase, peak in self.peaks.items() if peak > self.limit]
        return out

    @property
    def flops_per_sample(self) -> float:
        return sum(self.flops.values()) / self.images

    @property
    def iteration_seconds(self) -> float | None:
        values = list(self.seconds.values())
        return None if not values or any(v is None for v in values) else sum(values)

    @property
    def images_per_second_per_chip(self) -> float | None:
        t = self.iteration_seconds
        return None if not t else self.images / t / self.devices

    @property
    def mfu(self) -> float | None:
        """The roofline's model-FLOPs utilisation: compute time at peak over the time."""
        t = self.iteration_seconds
        if not t or self.chip.bf16_tflops is None:
            return None
        return sum(self.flops.values()) / self.devices / (self.chip.bf16_tflops * 1e12) / t


@under_matmul_precision()
def plan(config: ml_collections.ConfigDict, devices: Sequence[Any], chip: ChipSpec,
         topology: str = "", max_fraction: float = 0.85) -> Plan:
    """Compile the iteration's programs for ``devices`` (see the module docstring), under
    ``config.matmul_precision`` as training compiles them, traced on their mesh as training
    traces them (``parallel.traced_on``)."""
    schema.check(config)
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    with parallel.traced_on(mesh):
        return _plan(config, mesh, chip, topology, max_fraction)


def _plan(config: ml_collections.ConfigDict, mesh: Any, chip: ChipSpec, topology: str,
          max_fraction: float) -> Plan:
    settings = Settings.of(config, mesh.size, num_rewards=4)
    sizes, update = settings.sizes, settings.t2i
    sampling, pen_rl = settings.pen_sampling, settings.pen_rl
    rules = PARAM_RULES[settings.param_sharding]
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    m = abstract_models(config)
    frozen_dtype = loading.frozen_dtype(config)
    key0 = jax.random.key(0)
    stored = lambda tree: loading.store_as(tree, frozen_dtype)  # noqa: E731

    # Resident state, placed as training.loop.setup / state.initial_state place it.
    unet_shapes = jax.eval_shape(m.unet.init_params, key0)

    def build(params):
        trainable, frozen = split_params(params, update, key0)
        return T2ITrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                             frozen=stored(frozen),
                             opt_state=make_optimizer(update).init(trainable))

    state_shape = jax.eval_shape(build, unet_shapes)
    state = _abstract(state_shape, state_shardings(state_shape, mesh, rules))
    text_params = _placed(jax.eval_shape(lambda k: stored(m.text_encoder.init_params(k)),
                                         key0), rep)
    vae_params = _placed(jax.eval_shape(lambda k: stored(m.vae.init_params(k)), key0), rep)
    pen_params = _placed(jax.eval_shape(m.pen.init_params, key0), rep)
    lora = _placed(jax.eval_shape(lambda p: init_pen_lora(key0, p, pen_rl), pen_params), rep)
    pen_opt = _placed(jax.eval_shape(pen_rl_optimizer(pen_rl).init, lora.factors), rep)
    backbones = abstract_rewards(config, m.text_encoder)
    reward_params = () if backbones is None else tuple(
        _placed(jax.eval_shape(lambda k, b=b: stored(b.module.init_params(k)), key0), rep)
        for b in backbones)
    resident = {"t2i_state": chip_bytes(state), "text_encoder": chip_bytes(text_params),
                "vae": chip_bytes(vae_params), "pen": chip_bytes(pen_params),
                "pen_lora_and_optimizer": chip_bytes((lora, pen_opt)),
                "reward_models": chip_bytes(reward_params)}
    resident_total = sum(resident.values())

    # Rollout + decode: policy.rollout, as parrot_iteration calls it.
    schedule = _placed(m.schedule, rep)
    key = jax.ShapeDtypeStruct((), key0.dtype, sharding=rep)
    length = m.context_length
    cond_ids = jax.ShapeDtypeStruct((sizes.groups, length), jnp.int32, sharding=rep)
    null_ids = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=rep)
    guidance = CFG(config.sample.guidance_scale)
    unet_params = merged_params(state.trainable, state.frozen)
    rollout_args = (m.unet, m.text_encoder, m.vae, sizes.group_size, m.latent_shape,
                    config.sample.eta, m.scaling_factor, data, unet_params, text_params,
                    vae_params, schedule, guidance, cond_ids, null_ids, key,
                    settings.rollout_chunks)
    rollout, r = _compile("rollout+decode", "rollout", policy.rollout.lower(*rollout_args))
    rollout_out = jax.eval_shape(policy.rollout, *rollout_args)
    images, traj, contexts = rollout_out
    # The trajectory, contexts and images of the iteration, placed as the rollout leaves them
    # (as the rollout is asked to leave them when it could not be compiled). Each compiled
    # program is dropped once measured: the host holds one at a time.
    held = _abstract(rollout_out, rollout.output_shardings if rollout is not None else
                     jax.tree.map(lambda x: data if x.ndim and x.shape[0] == sizes.batch
                                  else rep, rollout_out))
    del rollout
    programs = [r]

    # The reward models on the iteration's images (RewardSet's jitted apply).
    reward_ids = tuple(jax.ShapeDtypeStruct(
        (sizes.batch, b.module.config.text.max_position_embeddings), jnp.int32, sharding=data)
        for b in backbones or ())
    placed_images = _placed(images, data)
    w = None
    if backbones:
        features = jax.jit(reward_features, static_argnums=0, out_shardings=data)
        _, w = _compile("reward_models", "rewards",
                        features.lower(backbones, reward_params, placed_images, reward_ids))
        programs.append(w)

    # The T2I train step on one minibatch (state donated, as in the loop).
    train_step = make_train_step(m.unet, m.schedule, guidance, update, mesh=mesh,
                                 state_sharding=jax.tree.map(lambda x: x.sharding, state))
    mb = sizes.minibatch
    batch = batch_spec(mb, traj.log_probs.shape[1], m.latent_shape, contexts, mesh)
    _, t = _compile("t2i_train_step", "t2i_update", train_step.lower(state, batch, key))
    programs.append(t)

    # The PEN: expansion of G templated prompts, and its REINFORCE step.
    ids = jax.ShapeDtypeStruct((sizes.groups, config.data.max_prompt_length), jnp.int32,
                               sharding=rep)
    _, p = _compile("pen_expand", "pen", policy.expand_tokens.lower(
        m.pen, sampling, pen_params, lora, ids, ids, key))
    tokens = jax.ShapeDtypeStruct((sizes.groups, sampling.max_new_tokens), jnp.int32,
                                  sharding=rep)
    advantages = jax.ShapeDtypeStruct((sizes.groups,), jnp.float32, sharding=rep)
    pen_args = (lora, pen_opt, pen_params, m.pen, pen_rl, ids, ids, tokens, tokens, advantages)
    _, u = _compile("pen_update", "pen", pen_rl_step.lower(*pen_args))
    programs += [p, u]

    # Peaks per phase: what stays resident, plus what the phase holds and allocates.
    rollout_resident_args = chip_bytes((unet_params, text_params, vae_params))
    peaks = {}
    if not r.error:
        peaks["rollout"] = (resident_total + max(0, r.arguments - rollout_resident_args)
                            + r.outputs + r.temporaries)
    if w is not None and not w.error:
        peaks["rewards"] = (resident_total + chip_bytes(held) + max(
            0, w.arguments - chip_bytes(reward_params) - chip_bytes(placed_images))
            + w.outputs + w.temporaries)
    if not t.error:
        peaks["t2i_update"] = (resident_total + chip_bytes(held)
                               + max(0, t.arguments - chip_bytes(state)) + t.temporaries
                               + max(0, t.outputs - t.aliased))
    if not (p.error or u.error):
        peaks["pen"] = resident_total + max(p.outputs + p.temporaries,
                                            u.temporaries + max(0, u.outputs - u.aliased))

    # FLOPs per iteration, from single steps (global, all chips), on the XLA form of attention
    # (the host cannot lower the TPU kernel; the arithmetic is the same).
    b, steps = sizes.batch, config.sample.num_steps
    h, w_, c = m.latent_shape
    unet, vae = m.unet.clone(attention_impl="xla"), m.vae.clone(attention_impl="xla")
    ctx = jax.ShapeDtypeStruct((b, guidance.num_branches, length,
                                m.text_encoder.config.hidden_size), contexts.dtype)
    x = jax.ShapeDtypeStruct((b, h, w_, c), jnp.float32)
    t_scalar = jax.ShapeDtypeStruct((), jnp.int32)
    unet_call = _flops(lambda p, x, t, ctx: guided_model_output(
        lambda *a: unet.apply({"params": a[0]}, *a[1:]), p, x, t, ctx, guidance),
        unet_params, x, t_scalar, ctx)
    text_call = _flops(lambda p, i: m.text_encoder.apply({"params": p}, i),
                       text_params, jax.ShapeDtypeStruct((sizes.groups + 1, length), jnp.int32))
    decode_call = _flops(lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
                         vae_params, x)
    slots = jax.ShapeDtypeStruct((1, mb), jnp.int32)
    timestep_call = _flops(lambda tr, fr, bt, sl: accumulate_gradients(
        unet, m.schedule, guidance, update, tr, fr, bt, sl),
        state.trainable, state.frozen, batch, slots)
    trained = update.train_timesteps(steps)
    train = config.t2i.train
    pen_step = lambda lo, op, pp, *rest: pen_rl_step(lo, op, pp, m.pen, pen_rl, *rest)  # noqa
    flops = {"text_encoder": text_call, "rollout_unet": unet_call * steps,
             "vae_decode": decode_call,
             "reward_models": _flops(lambda *a: reward_features(backbones, *a), reward_params,
                                     images, reward_ids) if backbones else 0.0,
             # one chunk at one trained timestep (XLA counts a loop body once), times their count
             "t2i_update": timestep_call * update.microbatches * trained * sizes.minibatches
             if train else 0.0,
             # behaviour_log_probs: one guided UNet call per trained transition
             "t2i_rescore": unet_call * trained if train and update.rescore else 0.0,
             # the REINFORCE step (forward + backward of the sampled tokens), and the
             # expansion, generation of the same tokens: about a third more
             "pen": _flops(pen_step, *pen_args[:3], *pen_args[5:]) * 4 / 3
             if config.pen.train else 0.0}
    analytic = guidance.num_branches * unet_forward_flops(unet.config, h, w_, length)

    # The roofline per phase, per chip: each phase's FLOPs; its bytes through its compiled
    # program's arithmetic intensity; the update's gradient all-reduce per optimiser step.
    n = mesh.size
    grads = chip_bytes(state.trainable) if settings.param_sharding == "replicate" else 0
    phase_flops = {"rollout": flops["text_encoder"] + flops["rollout_unet"]
                   + flops["vae_decode"],
                   "rewards": flops["reward_models"],
                   "t2i_update": flops["t2i_update"] + flops["t2i_rescore"],
                   "pen": flops["pen"]}
    by_phase = {"rollout": r, "rewards": w, "t2i_update": t, "pen": u}
    seconds: dict[str, float | None] = {}
    for phase, f in phase_flops.items():
        stats = by_phase[phase]
        if not f or stats is None:
            continue
        allreduce = (ring_allreduce_bytes(grads, n) * sizes.minibatches
                     if phase == "t2i_update" else 0.0)
        seconds[phase] = None if stats.intensity is None else phase_seconds(
            f / n, f / n / stats.intensity, allreduce, chip)
    hosts = len({getattr(d, "process_index", 0) for d in mesh.devices.flat})
    at_once = (b // n // settings.rollout_chunks, mb // n // update.microbatches)
    return Plan(topology, n, hosts, chip, max_fraction, b, mb // n, at_once, resident,
                programs, peaks, flops, unet_call / b, analytic, seconds)


def report(p: Plan) -> str:
    """One topology's plan in full, as ``main`` prints it."""
    g = lambda n: f"{_g(n):>12}"  # noqa: E731
    lines = [f"{p.topology or 'topology'}: {p.devices} chips on {p.hosts} host(s); "
             f"{p.chip.describe()}", "",
             f"{p.images} images per iteration, {p.minibatch_per_chip} per chip per minibatch; "
             f"at once per chip: {p.at_once[0]} in the rollout, {p.at_once[1]} in the update",
             "", "resident per chip:"]
    lines += [f"  {k:<24}{g(v)}" for k, v in p.resident.items()]
    lines += ["", f"  {'program':<18}{'phase':<12}{'arguments':>12}{'outputs':>12}"
              f"{'temporaries':>13}{'aliased':>12}"]
    lines += [f"  {s.name:<18}{s.phase:<12}{g(s.arguments)}{g(s.outputs)} {g(s.temporaries)}"
              f"{g(s.aliased)}" if not s.error else
              f"  {s.name:<18}{s.phase:<12}NOT COMPILED: {s.error}" for s in p.programs]
    lines += ["", f"estimated peak per chip (fits: <= {100 * p.max_fraction:.0f}% of HBM):"]
    lines += [f"  {k:<24}{g(v)}  ({100 * v / p.hbm:.0f}% of HBM)" for k, v in p.peaks.items()]
    total = sum(p.flops.values())
    lines += ["", "FLOPs per iteration (all chips):"]
    lines += [f"  {k:<24}{v:12.4g}" for k, v in p.flops.items()]
    if p.flops.get("t2i_rescore") and p.flops.get("t2i_update"):
        lines += [f"  (t2i_rescore is {100 * p.flops['t2i_rescore'] / p.flops['t2i_update']:.0f}%"
                  " of t2i_update)"]
    lines += [f"  {'total':<24}{total:12.4g}  ({total / p.devices:.4g} per chip, "
              f"{p.flops_per_sample:.4g} per image)",
              f"  one image's guided UNet call: {p.unet_call:.4g}, analytic {p.unet_analytic:.4g}"
              f" (ratio {p.unet_call / p.unet_analytic:.3f})", "",
              "roofline per iteration (per chip):"]
    lines += [f"  {k:<24}{'n/a' if v is None else f'{v:10.2f} s'}" for k, v in p.seconds.items()]
    if p.iteration_seconds:
        lines += [f"  {'total':<24}{p.iteration_seconds:10.2f} s: "
                  f"{p.images_per_second_per_chip:.3f} images/s per chip, MFU {p.mfu:.0%}"]
    lines += ["", "FITS" if p.fits else "DOES NOT FIT:\n  " + "\n  ".join(p.failures)]
    return "\n".join(lines)


COLUMNS = ("topology", "chips", "hosts", "img/chip/mb", "at once", *[f"{ph} peak" for ph in
           PHASES], "fits", "TFLOP/img", "UNet/analytic", "s/iter", "img/s/chip", "MFU",
           "max at once")


def table_row(p: Plan, max_at_once: int | None = None) -> list[str]:
    """``COLUMNS`` of one plan (peaks in GiB with their share of HBM; n/c: not compiled)."""
    def peak(phase: str) -> str:
        if phase in p.peaks:
            return f"{p.peaks[phase] / GIB:.1f} ({100 * p.peaks[phase] / p.hbm:.0f}%)"
        return "n/c" if any(s.phase == phase and s.error for s in p.programs) else "-"

    t = p.iteration_seconds
    return [p.topology, str(p.devices), str(p.hosts), str(p.minibatch_per_chip),
            f"{p.at_once[0]}/{p.at_once[1]}", *[peak(ph) for ph in PHASES],
            "yes" if p.fits else "no", f"{p.flops_per_sample / 1e12:.0f}",
            f"{p.unet_call / p.unet_analytic:.3f}", "n/a" if t is None else f"{t:.0f}",
            "n/a" if t is None else f"{p.images_per_second_per_chip:.3f}",
            "n/a" if p.mfu is None else f"{p.mfu:.0%}",
            "-" if max_at_once is None else str(max_at_once)]


def table(rows: list[list[str]]) -> str:
    """A markdown table of ``table_row`` rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def max_images_per_chip(config: ml_collections.ConfigDict, devices: Sequence[Any],
                        chip: ChipSpec, max_fraction: float) -> int:
    """The most images per chip the rollout and the update can process at once
    (``sample.microbatch`` = ``t2i.microbatch`` = b, b a power of two dividing the per-chip
    minibatch) with every phase fitting; 0 when even 1 does not. Bisection over the powers."""
    per_chip = Settings.of(config, len(devices), num_rewards=4).sizes.minibatch // len(devices)
    candidates = [b for b in (2 ** i for i in range(per_chip.bit_length())) if per_chip % b == 0]
    lo, hi, best = 0, len(candidates) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        probe = ml_collections.ConfigDict(config.to_dict())
        probe.t2i.microbatch = probe.sample.microbatch = candidates[mid]
        if plan(probe, devices, chip, max_fraction=max_fraction).fits:
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


PROG = "python -m parrot_jax.plan"


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file("config", None, "the training config to plan",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_list("topology", None, "TPU topologies, comma-separated, e.g. "
                      "v5e:2x4,v5e:4x4,v4:2x2x1", flag_values=values)
    flags.DEFINE_float("max_fraction", 0.85, "a phase fits when its peak is at most this share "
                       "of HBM", flag_values=values)
    flags.DEFINE_bool("max_images_per_chip", False, "also find, by bisection, the most images "
                      "per chip the rollout and update can process at once", flag_values=values)
    flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: by chip kind)",
                       flag_values=values)
    flags.DEFINE_float("chip_tflops", None, "peak bf16 TFLOP/s per chip (default: by chip "
                       "kind)", flag_values=values)
    flags.DEFINE_float("hbm_gbs", None, "HBM bandwidth per chip in GB/s (default: by chip "
                       "kind)", flag_values=values)
    flags.DEFINE_float("ici_gbs", None, "inter-chip bandwidth per chip in GB/s (default: by "
                       "chip kind)", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (without the program name), plan each topology, print; exit 0 if every
    one fits, else 1."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    if args.config is None or not args.topology:
        cli.fail(PROG, "--config and --topology are required")
    if not 0 < args.max_fraction <= 1:
        cli.fail(PROG, f"--max_fraction={args.max_fraction}: a share of HBM in (0, 1]")
    rows, fits = [], True
    for topology in args.topology:
        try:
            devices = topology_devices(topology)
            chip = chip_spec(devices, args.hbm_gib, args.chip_tflops, args.hbm_gbs,
                             args.ici_gbs)
            result = plan(args.config, devices, chip, topology, args.max_fraction)
            best = (max_images_per_chip(args.config, devices, chip, args.max_fraction)
                    if args.max_images_per_chip else None)
        except (schema.ConfigError, ValueError) as e:
            cli.fail(PROG, f"--topology {topology}: {e}")
        jax.clear_caches()  # the traced programs of one topology are no use to the next
        fits = fits and result.fits
        if len(args.topology) == 1:
            print(report(result))
            if best is not None:
                print(f"at most {best} image(s) per chip at once "
                      f"(--config.t2i.microbatch={best} --config.sample.microbatch={best})")
        else:
            print(f"{topology}: {result.chip.describe()}; "
                  + ("fits" if result.fits else "does not fit"), flush=True)
            for line in result.failures:
                print(f"  {line}")
            rows.append(table_row(result, best))
    if rows:
        print("\n" + table(rows))
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    cli.entry_point(main)
