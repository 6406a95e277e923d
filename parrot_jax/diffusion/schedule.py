"""The DDIM noise schedule, built from a diffusers scheduler config, as a jittable pytree.

Arrays (``alphas_cumprod``, ``timesteps``, ``final_alpha_cumprod``) are pytree leaves; the step
count, the prediction type and x0 clipping are static metadata, so a jitted function compiles
once per schedule *kind* and is fed new arrays freely.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from parrot_jax.models.config import ConfigError, ConfigReader, is_positive_int

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys that other diffusers schedulers (PNDM for SD 1.x, Euler, DPM-Solver, UniPC, LCM ...) add
# to choose *their* sampling algorithm. They do not change the trained noise process, so a DDIM
# schedule built from such a config ignores them, as ``DDIMScheduler.from_config`` does.
OTHER_SAMPLER_KEYS = (
    "skip_prk_steps", "final_sigmas_type", "interpolation_type", "sigma_max", "sigma_min",
    "timestep_type", "use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas",
    "algorithm_type", "euler_at_final", "lambda_min_clipped", "lower_order_final",
    "solver_order", "solver_type", "use_lu_lambdas", "variance_type", "disable_corrector",
    "predict_x0", "solver_p", "original_inference_steps", "timestep_scaling", "flow_shift",
    "time_shift_type",
)


@struct.dataclass
class DDIMSchedule:
    """Discrete DDPM noise levels and the S inference timesteps DDIM visits.

    ``alphas_cumprod``: float32 ``[T]``, ``alpha_bar_t`` for the T training timesteps.
    ``timesteps``: int32 ``[S]``, descending, as diffusers' ``DDIMScheduler.set_timesteps``.
    ``final_alpha_cumprod``: float32 ``[]``, ``alpha_bar`` before the first training step
    (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
    """

    alphas_cumprod: jax.Array
    timesteps: jax.Array
    final_alpha_cumprod: jax.Array
    num_inference_steps: int = struct.field(pytree_node=False, default=50)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    # Clip the predicted x0 to [-r, r]; None (the default) does not clip.
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def step_ratio(self) -> int:
        """diffusers' distance from ``t`` to the previous timestep: ``T // S``, every spacing."""
        return self.num_train_timesteps // self.num_inference_steps

    @classmethod
    def from_config(cls, config: dict[str, Any], num_inference_steps: int,
                    source: str = "scheduler config") -> DDIMSchedule:
        """Build from a diffusers scheduler config dict (``scheduler_config.json``).

        Raises one ``ConfigError`` naming every unsupported or malformed key. Unlike diffusers'
        constructor default, a config without ``clip_sample`` does not clip x0.
        """
        r = ConfigReader(config, source, ignored=OTHER_SAMPLER_KEYS)
        num_train = r.get("num_train_timesteps", 1000, is_positive_int, "a positive int")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        beta_start = r.get("beta_start", 0.0001, lambda v: number(v) and v >= 0, "a number >= 0")
        beta_end = r.get("beta_end", 0.02, lambda v: number(v) and v >= 0, "a number >= 0")
        schedule = r.require("beta_schedule", BETA_SCHEDULES, default="linear")
        trained = r.get("trained_betas", None,
                        lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                                and all(number(b) for b in v)),
                        "null or a list of numbers")
        clip = r.get("clip_sample", False, lambda v: isinstance(v, bool), "a bool")
        clip_range = r.get("clip_sample_range", 1.0, lambda v: number(v) and v > 0,
                           "a positive number")
        alpha_to_one = r.get("set_alpha_to_one", True, lambda v: isinstance(v, bool), "a bool")
        offset = r.get("steps_offset", 0, lambda v: isinstance(v, int) and v >= 0,
                       "a non-negative int")
        prediction = r.require("prediction_type", PREDICTION_TYPES, default="epsilon")
        spacing = r.require("timestep_spacing", TIMESTEP_SPACINGS, default="leading")
        zero_snr = r.get("rescale_betas_zero_snr", False, lambda v: isinstance(v, bool), "a bool")
        r.require("thresholding", False, default=False)  # dynamic thresholding: pixel space only
        r.get("dynamic_thresholding_ratio", 0.995)  # only read when thresholding is on
        r.get("sample_max_value", 1.0)
        for key, neutral in [("use_flow_sigmas", False), ("use_dynamic_shifting", False),
                             ("shift_terminal", None)]:  # flow matching: another process
            r.require(key, neutral, default=neutral)
        if not is_positive_int(num_inference_steps):
            r.problems.append(f"num_inference_steps={num_inference_steps!r} (a positive int)")
        elif is_positive_int(num_train) and num_inference_steps > num_train:
            r.problems.append(f"num_inference_steps={num_inference_steps} is more than "
                              f"num_train_timesteps={num_train}")
        if trained is not None and is_positive_int(num_train) and len(trained) != num_train:
            r.problems.append(f"trained_betas has {len(trained)} entries, "
                              f"num_train_timesteps={num_train}")
        r.finish()

        betas = (np.asarray(trained, np.float64) if trained is not None
                 else make_betas(schedule, beta_start, beta_end, num_train))
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        timesteps = make_timesteps(spacing, num_train, num_inference_steps, offset)
        if (len(timesteps) != num_inference_steps or timesteps.min() < 0
                or timesteps.max() >= num_train):
            raise ConfigError(f"{source}: timestep_spacing={spacing!r} with steps_offset={offset} "
                              f"gives timesteps {timesteps.tolist()}, not {num_inference_steps} "
                              f"values in [0, {num_train - 1}]")
        final = 1.0 if alpha_to_one else alphas_cumprod[0]
        return cls(alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
                   timesteps=jnp.asarray(timesteps, jnp.int32),
                   final_alpha_cumprod=jnp.asarray(final, jnp.float32),
                   num_inference_steps=num_inference_steps, prediction_type=prediction,
                   clip_sample_range=float(clip_range) if clip else None)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, num_inference_steps: int, *,
                        subfolder: str | None = "scheduler",
                        revision: str | None = None) -> DDIMSchedule:
        """From ``<pipeline>/scheduler/scheduler_config.json`` (a folder or a hub id).

        Pass ``subfolder=None`` for a folder that holds ``scheduler_config.json`` itself.
        """
        from parrot_jax.hub import CheckpointError, ModelSource

        path = ModelSource(path_or_id, subfolder, revision).require("scheduler_config.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                                  f"{e.msg}") from e
        return cls.from_config(config, num_inference_steps, source=str(path))

    def alpha_bars(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(alpha_bar_t, alpha_bar_prev)`` for timesteps of any shape (float32, same shape).

        The previous timestep is ``t - T // S`` (diffusers' rule, for every spacing); below 0 it
        is ``final_alpha_cumprod``.
        """
        t = jnp.asarray(timestep, jnp.int32)
        prev = t - self.step_ratio
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = jnp.where(prev >= 0, self.alphas_cumprod[jnp.maximum(prev, 0)],
                               self.final_alpha_cumprod)
        return alpha_t, alpha_prev


def make_betas(schedule: str, beta_start: float, beta_end: float, num_train: int) -> np.ndarray:
    """float64 ``[T]`` betas of a diffusers ``beta_schedule``."""
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine alpha_bar, beta <= 0.999
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - alpha_bar((i + 1) / num_train) / alpha_bar(i / num_train), 0.999)
                         for i in range(num_train)], np.float64)
    raise ValueError(f"beta_schedule={schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last ``alpha_bar`` is 0 (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def make_timesteps(spacing: str, num_train: int, steps: int, offset: int = 0) -> np.ndarray:
    """int64 ``[S]`` descending timesteps, as ``DDIMScheduler.set_timesteps``."""
    if spacing == "leading":
        return (np.arange(steps) * (num_train // steps))[::-1].astype(np.int64) + offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].astype(np.int64)
    raise ValueError(f"timestep_spacing={spacing!r}; supported: {', '.join(TIMESTEP_SPACINGS)}")
