"""DDIMSchedule against diffusers' DDIMScheduler: timesteps, alphas, config checks, loading."""

import json

import jax
import numpy as np
import pytest
from diffusers import DDIMScheduler, PNDMScheduler

from parrot_jax.diffusion import DDIMSchedule
from parrot_jax.hub import CheckpointError
from parrot_jax.models.config import ConfigError

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (a PNDM config) and of
# stabilityai/stable-diffusion-2-1 (768 px, v-prediction).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}


def _reference(config: dict, steps: int) -> DDIMScheduler:
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    return ref


def _assert_matches(ours: DDIMSchedule, ref: DDIMScheduler):
    assert ours.timesteps.dtype == np.int32 and ours.timesteps.shape == ref.timesteps.shape
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    # Ours are float64 cumulative products rounded once; diffusers accumulates in float32.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(ours.final_alpha_cumprod),
                               float(ref.final_alpha_cumprod), atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name,config", [("sd15", SD15), ("sd21", SD21)])
@pytest.mark.parametrize("steps", [50, 20, 7, 1])
def test_matches_diffusers_sd_configs(name, config, spacing, steps):
    config = {**config, "timestep_spacing": spacing}
    ours = DDIMSchedule.from_config(config, steps)
    _assert_matches(ours, _reference(config, steps))
    assert ours.num_inference_steps == steps and ours.step_ratio == 1000 // steps
    assert ours.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
    assert ours.clip_sample_range is None


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
     "prediction_type": "v_prediction"},
    {"trained_betas": np.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500,
     "steps_offset": 3},
])
def test_other_beta_schedules(config):
    _assert_matches(DDIMSchedule.from_config(config, 25), _reference(config, 25))


def test_final_alpha_follows_set_alpha_to_one():
    assert float(DDIMSchedule.from_config({**SD15, "set_alpha_to_one": True},
                                          50).final_alpha_cumprod) == 1.0
    sched = DDIMSchedule.from_config(SD15, 50)
    assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0]) < 1.0


def test_alpha_bars_per_sample():
    sched = DDIMSchedule.from_config(SD15, 50)
    ref = _reference(SD15, 50)
    t = np.array([981, 21, 1])
    alpha_t, alpha_prev = sched.alpha_bars(t)
    np.testing.assert_allclose(alpha_t, ref.alphas_cumprod.numpy()[t], atol=1e-6)
    np.testing.assert_allclose(alpha_prev[:2], ref.alphas_cumprod.numpy()[t[:2] - 20], atol=1e-6)
    assert float(alpha_prev[2]) == float(sched.final_alpha_cumprod)  # t - 20 < 0


def test_is_a_pytree_for_jit():
    f = jax.jit(lambda s: s.alpha_bars(s.timesteps)[1])
    a = f(DDIMSchedule.from_config(SD15, 10))
    b = f(DDIMSchedule.from_config({**SD15, "beta_end": 0.02}, 10))  # new leaves, same kind
    assert f._cache_size() == 1 and not np.allclose(a, b)
    leaves = jax.tree_util.tree_leaves(DDIMSchedule.from_config(SD15, 10))
    assert len(leaves) == 3  # alphas_cumprod, timesteps, final_alpha_cumprod


@pytest.mark.parametrize("change,needle", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"prediction_type": "flow"}, "prediction_type='flow'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"thresholding": True}, "thresholding=True"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ({"my_new_key": 1}, "unknown keys: my_new_key"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 entries"),
])
def test_unsupported_config_names_the_key(change, needle):
    with pytest.raises(ConfigError, match="my.json") as info:
        DDIMSchedule.from_config({**SD15, **change}, 50, source="my.json")
    assert needle in str(info.value)


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as info:
        DDIMSchedule.from_config({**SD15, "beta_schedule": "x", "prediction_type": "y"}, 2000)
    message = str(info.value)
    assert "beta_schedule" in message and "prediction_type" in message
    assert "num_inference_steps=2000 is more than num_train_timesteps=1000" in message


def test_timesteps_out_of_range_raise():
    with pytest.raises(ConfigError, match="steps_offset=1"):
        DDIMSchedule.from_config(SD15, 1000)  # leading: 999 + 1 is not a training timestep


def test_from_pretrained_pipeline_folder(tmp_path):
    PNDMScheduler.from_config(SD15).save_pretrained(tmp_path / "scheduler")
    ours = DDIMSchedule.from_pretrained(tmp_path, 50)
    _assert_matches(ours, _reference(SD15, 50))
    same = DDIMSchedule.from_pretrained(tmp_path / "scheduler", 50, subfolder=None)
    np.testing.assert_array_equal(same.timesteps, ours.timesteps)


def test_from_pretrained_errors(tmp_path):
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(CheckpointError, match="missing scheduler_config.json"):
        DDIMSchedule.from_pretrained(tmp_path, 50)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{\n  oops")
    with pytest.raises(CheckpointError, match="invalid JSON at line 2"):
        DDIMSchedule.from_pretrained(tmp_path, 50)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD21, "prediction_type": "sample_x"}))
    with pytest.raises(ConfigError, match="scheduler_config.json: prediction_type"):
        DDIMSchedule.from_pretrained(tmp_path, 50)
