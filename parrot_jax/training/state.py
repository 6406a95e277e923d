"""What a Parrot run holds: the fixed parts (``Run``) and the checkpointed training state.

The state is a dict of arrays, exactly what an orbax checkpoint holds: ``step``, ``key`` (raw
PRNG key data), ``t2i`` (step, trainable, opt_state), ``pen`` (lora, opt_state), ``tracker``
(the per-prompt advantage statistics), ``data_position`` (prompt draws consumed). Everything
outside the T2I state is small and replicated, so every iteration (and a restored state)
presents the same shardings and reuses the first compilation.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from parrot_jax import parallel
from parrot_jax.diffusion import CFG
from parrot_jax.expansion import init_pen_lora, pen_rl_optimizer
from parrot_jax.loading import ParrotModels
from parrot_jax.models.lora import merge
from parrot_jax.policy import Policy, group_contexts, rollout
from parrot_jax.rl import init_stat_tracker
from parrot_jax.training.settings import Settings
from parrot_jax.training.step import (
    T2ITrainState,
    batch_spec,
    init_train_state,
    make_rescore,
    make_train_step,
    state_shardings,
)
from parrot_jax.weights import merged_params, split_params

PARAM_RULES = {"replicate": parallel.REPLICATE_ALL, "fsdp": parallel.FSDP_ALL}


@dataclasses.dataclass
class Run:
    """What one ``train_and_evaluate`` call holds fixed."""

    config: Any  # the checked ml_collections config (policies and config.json read it)
    settings: Settings
    models: ParrotModels
    mesh: Mesh
    prompts: list[str]  # the RL prompts
    frozen: Any  # the UNet parameters the T2I update does not train
    train_step: Any  # the jitted T2I update (state donated)
    rescore: Any  # the jitted behaviour_log_probs, or None (t2i.rescore off)
    null_ids: np.ndarray  # [1, L] the null prompt's token ids

    def rollout(self, state: dict, cond_ids: Any, key: jax.Array) -> tuple:
        """G x N images in [0, 1] from the T2I policy of ``state`` for the conditioning token
        ids ``[G, L]`` (CFG against the null prompt): ``(images, trajectory, contexts)``."""
        m, s = self.models, self.settings
        return rollout(
            m.unet, m.text_encoder, m.vae, s.sizes.group_size, m.latent_shape, s.eta,
            m.scaling_factor, parallel.batch_sharding(self.mesh),
            merged_params(state["t2i"]["trainable"], self.frozen), m.text_params, m.vae_params,
            m.schedule, CFG(s.guidance_scale), cond_ids, self.null_ids, key, s.rollout_chunks)

    def policy(self, state: dict, step: int | None = None, *, base: bool = False) -> Policy:
        """The policy of ``state`` (its T2I weights and PEN LoRA merged in), or with ``base``
        the untrained models, placed as ``state``'s weights are (so both policies run the
        same compiled programs)."""
        m = self.models
        trainable = state["t2i"]["trainable"]
        if base:
            initial, _ = split_params(m.unet_params, self.settings.t2i, jax.random.key(0))
            trainable = jax.device_put(initial, jax.tree.map(lambda x: x.sharding, trainable))
            return Policy(self.config, m, self.mesh, merged_params(trainable, self.frozen),
                          m.pen_params, None)
        return Policy(self.config, m, self.mesh, merged_params(trainable, self.frozen),
                      merge(m.pen_params, state["pen"]["lora"]), step)


def untrained_params(params: Any, frozen: Any, spec: Any) -> Any:
    """The untrained UNet tree ``params`` rebuilt on ``frozen`` (its frozen part as the run
    stores it, ``model.frozen_dtype``) and its own trainable part: what ``Run.policy(base=True)``
    splits again. (LoRA: the frozen tree is the whole model.)"""
    if spec.trainable == "lora":
        return frozen
    trainable, _ = split_params(params, spec)
    return merged_params(trainable, frozen)


def initial_state(settings: Settings, models: ParrotModels, mesh: Mesh,
                  pen_source: str) -> tuple[dict, Any]:
    """``(state, frozen T2I parameters)`` of a fresh run; ``pen_source`` (config.model.pen)
    names the PEN in errors."""
    root = jax.random.key(settings.seed)
    t2i = init_train_state(models.unet_params, settings.t2i, key=jax.random.fold_in(root, 10),
                           mesh=mesh, rules=PARAM_RULES[settings.param_sharding])
    try:
        lora = init_pen_lora(jax.random.fold_in(root, 11), models.pen_params, settings.pen_rl)
    except ValueError as e:
        raise ValueError(f"config.pen.lora_targets: {e} (model.pen={pen_source!r})") from e
    state = {
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(jax.random.fold_in(root, 12)),
        "t2i": {"step": t2i.step, "trainable": t2i.trainable, "opt_state": t2i.opt_state},
        "pen": {"lora": lora, "opt_state": pen_rl_optimizer(settings.pen_rl).init(lora.factors)},
        "tracker": init_stat_tracker(settings.tracker_capacity, settings.tracker_buffer),
        "data_position": jnp.zeros((), jnp.int32),
    }
    rep = parallel.replicated(mesh)
    state.update(jax.device_put({k: state[k] for k in ("step", "key", "pen", "tracker",
                                                       "data_position")}, rep))
    return state, t2i.frozen


# Compiled T2I steps, shared by runs of one process with the same model and settings (a resumed
# run in a test or a notebook compiles nothing twice).
_TRAIN_STEPS: dict[Any, Any] = {}


def train_step_for(models: ParrotModels, settings: Settings, mesh: Mesh, state: dict,
                   frozen: Any, sample_config: dict, pretrained: str) -> tuple[Any, Any]:
    """The jitted, sharded T2I update of this run and its re-scoring (None when
    ``settings.t2i.rescore`` is off), cached per model, settings and mesh."""
    t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                        frozen=frozen, opt_state=state["t2i"]["opt_state"])
    rules = PARAM_RULES[settings.param_sharding]
    key = (models.unet, settings.t2i, mesh, rules, settings.guidance_scale,
           json.dumps(sample_config, sort_keys=True), pretrained)
    if key not in _TRAIN_STEPS:
        args = (models.unet, models.schedule, CFG(settings.guidance_scale), settings.t2i)
        sharding = state_shardings(t2i, mesh, rules)
        _TRAIN_STEPS[key] = (
            make_train_step(*args, mesh=mesh, state_sharding=sharding),
            make_rescore(*args, mesh=mesh, state_sharding=sharding) if settings.t2i.rescore
            else None)
    return _TRAIN_STEPS[key]


def compile_ahead(run: Run, state: dict) -> None:
    """Start compiling the T2I step for this run's minibatches in a thread, and make
    ``run.train_step`` wait for it on its first call. The loop calls this before its first
    iteration, so the step compiles while the first rollout compiles and runs (on a CPU the two
    compilations share the cores; on an accelerator the host compiles while the device
    samples). The arguments are placed exactly as ``parrot_iteration`` places them, so the
    first call finds the program in jit's cache (were they not, it would compile again)."""
    s, m = run.settings, run.models
    steps, mb = m.schedule.num_inference_steps, s.sizes.minibatch
    contexts = jax.eval_shape(
        lambda params, ids: group_contexts(m.text_encoder, params, ids, ids, s.sizes.group_size),
        m.text_params, run.null_ids)
    batch = batch_spec(mb, steps, m.latent_shape, contexts, run.mesh)
    t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                        frozen=run.frozen, opt_state=state["t2i"]["opt_state"])
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=parallel.replicated(run.mesh))
    precision = jax.config.jax_default_matmul_precision  # thread-local: carried over

    def compile_step() -> None:
        try:
            with jax.default_matmul_precision(precision), parallel.traced_on(run.mesh):
                run.train_step.lower(t2i, batch, key).compile()
        except Exception as e:  # noqa: BLE001 (the first call compiles it instead)
            logging.warning("compiling the T2I step ahead failed (%s: %s); it compiles on its "
                            "first call", type(e).__name__, e)

    thread = threading.Thread(target=compile_step, name="compile_t2i_step", daemon=True)
    thread.start()
    run.train_step = _AfterThread(run.train_step, thread)


class _AfterThread:
    """A function that waits for a thread before its first call."""

    def __init__(self, fn: Any, thread: threading.Thread):
        self.fn, self.thread = fn, thread

    def __call__(self, *args: Any) -> Any:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return self.fn(*args)
