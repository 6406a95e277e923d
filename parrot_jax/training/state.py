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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parrot_jax import parallel
from parrot_jax.diffusion import CFG
from parrot_jax.expansion import init_pen_lora, pen_rl_optimizer
from parrot_jax.loading import ParrotModels
from parrot_jax.models.lora import merge
from parrot_jax.policy import Policy, rollout
from parrot_jax.rl import init_stat_tracker
from parrot_jax.training.settings import Settings
from parrot_jax.training.step import (
    T2ITrainState,
    init_train_state,
    make_train_step,
    state_shardings,
)
from parrot_jax.weights import merged_params

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
    null_ids: np.ndarray  # [1, L] the null prompt's token ids

    def rollout(self, state: dict, cond_ids: Any, key: jax.Array) -> tuple:
        """G x N images in [0, 1] from the T2I policy of ``state`` for the conditioning token
        ids ``[G, L]`` (CFG against the null prompt): ``(images, trajectory, contexts)``."""
        m, s = self.models, self.settings
        return rollout(
            m.unet, m.text_encoder, m.vae, s.sizes.group_size, m.latent_shape, s.eta,
            m.scaling_factor, parallel.batch_sharding(self.mesh),
            merged_params(state["t2i"]["trainable"], self.frozen), m.text_params, m.vae_params,
            m.schedule, CFG(s.guidance_scale), cond_ids, self.null_ids, key)

    def policy(self, state: dict | None, step: int | None = None) -> Policy:
        """The policy of ``state`` (its T2I weights and PEN LoRA merged in), or with None the
        untrained models."""
        m = self.models
        if state is None:
            return Policy(self.config, m, self.mesh, m.unet_params, m.pen_params, None)
        return Policy(self.config, m, self.mesh,
                      merged_params(state["t2i"]["trainable"], self.frozen),
                      merge(m.pen_params, state["pen"]["lora"]), step)


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
                   frozen: Any, sample_config: dict, pretrained: str) -> Any:
    """The jitted, sharded T2I update of this run (cached per model, settings and mesh)."""
    t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                        frozen=frozen, opt_state=state["t2i"]["opt_state"])
    rules = PARAM_RULES[settings.param_sharding]
    key = (models.unet, settings.t2i, mesh, rules, settings.guidance_scale,
           json.dumps(sample_config, sort_keys=True), pretrained)
    if key not in _TRAIN_STEPS:
        _TRAIN_STEPS[key] = make_train_step(
            models.unet, models.schedule, CFG(settings.guidance_scale), settings.t2i, mesh=mesh,
            state_sharding=state_shardings(t2i, mesh, rules))
    return _TRAIN_STEPS[key]
