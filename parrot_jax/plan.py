"""Ahead-of-time planner: will this config fit that TPU slice, and how much work is an iteration?

``python -m parrot_jax.plan --config configs/sd15.py --topology v5e:2x4`` compiles, for the TPU
topology and on this (CPU) machine, the programs a Parrot iteration runs on the chips — the
rollout (text encoding, the S-step CFG DDIM scan, VAE decoding), the T2I train step (the
scan over trained timesteps with its optimiser update) and the PEN expansion — with abstract,
shape-only, full-size parameters placed as ``train.py`` places them. Nothing is downloaded but
a config.json for a hub id that ``parrot_jax.architectures`` does not cover.

It prints per chip: resident bytes (parameters, optimiser state, the PEN and its LoRA), each
program's arguments, outputs and temporaries, the estimated peak of the rollout phase and of the
update phase (which also holds the rollout's trajectory), and FLOPs per iteration. It exits 1 if
a peak exceeds the chip's memory (``--hbm_gib`` to override the built-in capacities).

FLOPs come from XLA's cost analysis of single steps (one guided UNet call, one trained timestep,
the text encoder, the VAE decoder), multiplied by how often an iteration runs them: XLA counts a
loop body once, whatever its trip count. The PEN and the reward heads are not counted (a few
percent of the UNet at paper scale). Needs ``jax[tpu]`` (libtpu): ``pip install
'parrot-jax[tpu]'``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from parrot_jax import architectures, cli, hub, loading, parallel, policy
from parrot_jax import config as schema
from parrot_jax.data.prompts import BUILTIN_PROMPTS
from parrot_jax.data.tokenizer import build_clip_tokenizer, train_t5_tokenizer
from parrot_jax.diffusion import CFG, DDIMSchedule, guided_model_output
from parrot_jax.expansion import init_pen_lora, pen_rl_optimizer
from parrot_jax.models.clip import CLIPTextConfig, CLIPTextModel
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig
from parrot_jax.precision import under_matmul_precision
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

GIB = 1024 ** 3
# HBM per chip (GiB) by the device_kind libtpu reports.
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
           "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32, "TPU7x": 192}


# --- the chips -------------------------------------------------------------------------------

def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology such as ``'v5e:2x4'`` (libtpu; no TPU needed). Planning
    touches no chip, so it does not take libtpu's one-process lock: it may run beside a
    training process or another plan."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology).devices)
    except Exception as e:  # libtpu missing, or an unknown topology name
        raise SystemExit(f"--topology {topology!r}: cannot describe it ({type(e).__name__}: "
                         f"{e}). Is jax[tpu] installed (pip install 'parrot-jax[tpu]')? Names "
                         "look like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:4x4.") from e


def chip_memory(devices: Sequence[Any], override_gib: float | None) -> int:
    """HBM bytes per chip: ``override_gib`` or the table above by device kind."""
    if override_gib:
        return int(override_gib * GIB)
    kind = devices[0].device_kind
    if kind not in HBM_GIB:
        raise SystemExit(f"unknown chip {kind!r}: pass --hbm_gib (HBM per chip in GiB)")
    return HBM_GIB[kind] * GIB


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


def _read_json(path: Path, field: str, root: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config.{field}={root!r}: no {path}")
    return json.loads(path.read_text())


def _component(root: str, name: str, field: str) -> dict[str, Any]:
    """``<root>/<name>/config.json``: a folder's own file, a known hub id's copy from
    ``architectures``, or the file from the hub."""
    folder = Path(root).expanduser()
    if folder.exists():
        return _read_json(folder / name / "config.json", field, root)
    if root in architectures.PIPELINES:
        return architectures.PIPELINES[root][name]
    return hub.read_config(hub.ModelSource(root, name, None))[0]


def _schedule(root: str, steps: int) -> DDIMSchedule:
    if not Path(root).expanduser().exists() and root in architectures.PIPELINES:
        return DDIMSchedule.from_config(architectures.PIPELINES[root]["scheduler"], steps)
    return DDIMSchedule.from_pretrained(root, steps)


def _t5_config(source: str) -> dict[str, Any]:
    folder = Path(source).expanduser()
    if folder.exists():
        return _read_json(folder / "config.json", "model.pen", source)
    if source in architectures.T5_MODELS:
        return architectures.T5_MODELS[source]
    return hub.read_config(hub.ModelSource(source, None, None))[0]


def abstract_models(config: ml_collections.ConfigDict) -> AbstractModels:
    """The modules ``config.model`` names, built from configs only ('tiny': the tiny shapes,
    with tokenizers built from the built-in prompts as ``train.py`` builds them)."""
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
            _component(root, "unet", "model.pretrained")), dtype=dtype)
        vae = AutoencoderKL(VAEConfig.from_diffusers(
            _component(root, "vae", "model.pretrained")), dtype=dtype)
        text = CLIPTextModel(CLIPTextConfig.from_transformers(
            _component(root, "text_encoder", "model.pretrained"), root), dtype=dtype)
        schedule = _schedule(root, steps)
    if config.model.pen == "tiny":
        pen_tok = train_t5_tokenizer(list(BUILTIN_PROMPTS) + list(loading.MODIFIERS),
                                     config.model.tiny.t5_vocab_size)
        pen, _ = loading._tiny_pen(config, pen_tok, dtype)
    else:
        pen = T5ForConditionalGeneration(T5Config.from_transformers(
            _t5_config(config.model.pen), config.model.pen), dtype=dtype)
    side = unet.config.sample_size
    return AbstractModels(unet, vae, text, pen, schedule,
                          (side, side, unet.config.in_channels),
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


@dataclasses.dataclass
class ProgramStats:
    """One compiled program's memory per chip (bytes) as XLA reports it, or why the TPU
    compiler refused it (``error``: it needs more memory than a chip has)."""

    name: str
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0
    code: int = 0
    error: str | None = None

    @classmethod
    def of(cls, name: str, compiled: Any) -> ProgramStats:
        m = compiled.memory_analysis()
        return cls(name, m.argument_size_in_bytes, m.output_size_in_bytes,
                   m.temp_size_in_bytes, m.alias_size_in_bytes, m.generated_code_size_in_bytes)


def _compile(name: str, lowered: Any) -> tuple[Any, ProgramStats]:
    """``(compiled or None, stats)``: the TPU compiler's out-of-memory refusal becomes a
    finding of the plan; any other failure is raised."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED, "Ran out of memory ..."
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, ProgramStats(name, error=str(e).split("\n")[0])
    return compiled, ProgramStats.of(name, compiled)


def _flops(fn: Any, *args: Any) -> float:
    """Global FLOPs of one call: XLA's cost analysis of the lowered, unpartitioned program (on
    the host backend; counting FLOPs of unoptimised HLO does not depend on the platform)."""
    args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), args)
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


# --- the plan --------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What ``plan`` found; bytes per chip, FLOPs per iteration (all chips)."""

    devices: int
    device_kind: str
    hbm: int
    resident: dict[str, int]
    programs: list[ProgramStats]
    peaks: dict[str, int]
    flops: dict[str, float]

    @property
    def fits(self) -> bool:
        return (not any(s.error for s in self.programs)
                and max(self.peaks.values()) <= self.hbm)


@under_matmul_precision()
def plan(config: ml_collections.ConfigDict, devices: Sequence[Any],
         hbm: int) -> Plan:
    """Compile the iteration's programs for ``devices`` (see the module docstring), under
    ``config.matmul_precision`` as training compiles them."""
    schema.check(config)
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    settings = Settings.of(config, mesh.size, num_rewards=4)
    sizes, update = settings.sizes, settings.t2i
    sampling, pen_rl = settings.pen_sampling, settings.pen_rl
    rules = PARAM_RULES[settings.param_sharding]
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    m = abstract_models(config)
    key0 = jax.random.key(0)

    # Resident state, placed as training.loop.setup / state.initial_state place it.
    unet_shapes = jax.eval_shape(m.unet.init_params, key0)

    def build(params):
        trainable, frozen = split_params(params, update, key0)
        return T2ITrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                             opt_state=make_optimizer(update).init(trainable))

    state_shape = jax.eval_shape(build, unet_shapes)
    state = _abstract(state_shape, state_shardings(state_shape, mesh, rules))
    text_params = _placed(jax.eval_shape(m.text_encoder.init_params, key0), rep)
    vae_params = _placed(jax.eval_shape(m.vae.init_params, key0), rep)
    pen_params = _placed(jax.eval_shape(m.pen.init_params, key0), rep)
    lora = _placed(jax.eval_shape(lambda p: init_pen_lora(key0, p, pen_rl), pen_params), rep)
    pen_opt = _placed(jax.eval_shape(pen_rl_optimizer(pen_rl).init, lora.factors), rep)
    resident = {"t2i_state": chip_bytes(state), "text_encoder": chip_bytes(text_params),
                "vae": chip_bytes(vae_params), "pen": chip_bytes(pen_params),
                "pen_lora_and_optimizer": chip_bytes((lora, pen_opt))}
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
                    vae_params, schedule, guidance, cond_ids, null_ids, key)
    rollout, r = _compile("rollout+decode", policy.rollout.lower(*rollout_args))
    rollout_out = jax.eval_shape(policy.rollout, *rollout_args)
    _, traj, contexts = rollout_out

    # The T2I train step on one minibatch (state donated, as in the loop).
    train_step = make_train_step(m.unet, m.schedule, guidance, update, mesh=mesh,
                                 state_sharding=jax.tree.map(lambda x: x.sharding, state))
    mb = sizes.minibatch
    batch = batch_spec(mb, traj.log_probs.shape[1], m.latent_shape, contexts, mesh)
    _, t = _compile("t2i_train_step", train_step.lower(state, batch, key))

    # The PEN expansion of G templated prompts.
    ids = jax.ShapeDtypeStruct((sizes.groups, config.data.max_prompt_length), jnp.int32,
                               sharding=rep)
    _, p = _compile("pen_expand", policy.expand_tokens.lower(m.pen, sampling, pen_params, lora,
                                                              ids, ids, key))
    programs = [r, t, p]
    # The trajectory, contexts and images of the iteration, placed as the rollout leaves them
    # (as the rollout is asked to leave them when it could not be compiled).
    held = _abstract(rollout_out, rollout.output_shardings if rollout is not None else
                     jax.tree.map(lambda x: data if x.ndim and x.shape[0] == sizes.batch
                                  else rep, rollout_out))
    rollout_resident_args = chip_bytes((unet_params, text_params, vae_params))
    peaks = {}
    if not r.error:
        peaks["rollout"] = (resident_total + max(0, r.arguments - rollout_resident_args)
                            + r.outputs + r.temporaries)
    if not t.error:
        peaks["t2i_update"] = (resident_total + chip_bytes(held)
                               + max(0, t.arguments - chip_bytes(state)) + t.temporaries
                               + max(0, t.outputs - t.aliased))
    if not p.error:
        peaks["pen_expand"] = resident_total + p.outputs + p.temporaries

    # FLOPs per iteration, from single steps (global, all chips).
    b, steps = sizes.batch, config.sample.num_steps
    h, w, c = m.latent_shape
    unet_full = jax.eval_shape(m.unet.init_params, key0)
    ctx = jax.ShapeDtypeStruct((b, guidance.num_branches, length,
                                m.text_encoder.config.hidden_size), contexts.dtype)
    x = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
    t_scalar = jax.ShapeDtypeStruct((), jnp.int32)
    unet_call = _flops(lambda p, x, t, ctx: guided_model_output(
        lambda *a: m.unet.apply({"params": a[0]}, *a[1:]), p, x, t, ctx, guidance),
        unet_full, x, t_scalar, ctx)
    text_call = _flops(lambda p, i: m.text_encoder.apply({"params": p}, i),
                       text_params, jax.ShapeDtypeStruct((sizes.groups + 1, length), jnp.int32))
    decode_call = _flops(lambda p, z: m.vae.apply({"params": p}, z, method=m.vae.decode),
                         vae_params, x)
    slots = jax.ShapeDtypeStruct((1, mb), jnp.int32)
    timestep_call = _flops(lambda tr, fr, bt, sl: accumulate_gradients(
        m.unet, m.schedule, guidance, update, tr, fr, bt, sl),
        state.trainable, state.frozen, batch, slots)
    trained = update.train_timesteps(steps)
    flops = {"text_encoder": text_call, "rollout_unet": unet_call * steps,
             "vae_decode": decode_call,
             # one chunk at one trained timestep (XLA counts a loop body once), times their count
             "t2i_update": timestep_call * update.microbatches * trained * sizes.minibatches
             if config.t2i.train else 0.0,
             # behaviour_log_probs: one guided UNet call per trained transition
             "t2i_rescore": unet_call * trained if config.t2i.train and update.rescore
             else 0.0}
    return Plan(mesh.size, devices[0].device_kind, hbm, resident, programs, peaks, flops)


def report(p: Plan) -> str:
    """The plan as the table ``main`` prints."""
    g = lambda n: (f"{n / GIB:8.2f} GiB" if n >= GIB  # noqa: E731
                   else f"{n / 1024 ** 2:8.1f} MiB")
    lines = [f"{p.devices} x {p.device_kind}, {p.hbm / GIB:.0f} GiB HBM per chip", "",
             "resident per chip:"]
    lines += [f"  {k:<24}{g(v)}" for k, v in p.resident.items()]
    lines += ["", f"  {'program':<22}{'arguments':>13}{'outputs':>13}{'temporaries':>13}"
              f"{'aliased':>13}"]
    lines += [f"  {s.name:<22}{g(s.arguments):>13}{g(s.outputs):>13}{g(s.temporaries):>13}"
              f"{g(s.aliased):>13}" if not s.error else f"  {s.name:<22}NOT COMPILED: {s.error}"
              for s in p.programs]
    lines += ["", "estimated peak per chip:"]
    lines += [f"  {k:<24}{g(v)}  ({100 * v / p.hbm:.0f}% of HBM)" for k, v in p.peaks.items()]
    lines += [f"  {s.name:<24}more than the chip has (see above)" for s in p.programs
              if s.error]
    total = sum(p.flops.values())
    lines += ["", "FLOPs per iteration (all chips):"]
    lines += [f"  {k:<24}{v:12.4g}" for k, v in p.flops.items()]
    if p.flops.get("t2i_rescore") and p.flops.get("t2i_update"):
        lines += [f"  (t2i_rescore is {100 * p.flops['t2i_rescore'] / p.flops['t2i_update']:.0f}%"
                  " of t2i_update)"]
    lines += [f"  {'total':<24}{total:12.4g}  ({total / p.devices:.4g} per chip)", "",
              "FITS" if p.fits else "DOES NOT FIT: set t2i.microbatch (the update), lower "
              "images_per_group, raise num_minibatches, set param_sharding='fsdp', or use a "
              "bigger slice"]
    return "\n".join(lines)


PROG = "python -m parrot_jax.plan"


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file("config", None, "the training config to plan",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v4:2x2x1",
                        flag_values=values)
    flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: by chip kind)",
                       flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (without the program name), plan, print; exit 0 if it fits, else 1."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    if args.config is None or not args.topology:
        cli.fail(PROG, "--config and --topology are required")
    try:
        devices = topology_devices(args.topology)
        result = plan(args.config, devices, chip_memory(devices, args.hbm_gib))
    except (schema.ConfigError, ValueError) as e:
        cli.fail(PROG, str(e))
    print(report(result))
    sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    cli.entry_point(main)
