"""The guided scan sampler on the tiny SD-1-like UNet: trajectory, determinism, compile-once,
re-scoring with ratio 1, prompt-centred guidance and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_schedule import SD15

from parrot_jax import hub
from parrot_jax.diffusion import (
    CFG,
    DDIMSchedule,
    PromptCentredGuidance,
    branch_contexts,
    classifier_free_guidance,
    guided_model_output,
    prompt_centred_guidance,
    sample,
)
from parrot_jax.rl import ddpo_loss, rescore_log_prob

B, STEPS, LATENT = 8, 4, (16, 16, 4)  # B = 8: one sample per simulated device


def _texts(seed: int, n: int, dim: int = 32) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, (B, 7, dim)) for k in keys]


@pytest.fixture(scope="module")
def policy(sd1_unet):
    """(module, params, schedule, contexts [B, 2, L, D] = (null, prompt)) for CFG sampling."""
    module, params = hub.load_unet(sd1_unet[1])
    null, prompt = _texts(0, 2)
    contexts = branch_contexts(null[0], prompt)  # one null prompt for the whole batch
    return module, params, DDIMSchedule.from_config(SD15, STEPS), contexts


@pytest.fixture(scope="module")
def sampled(policy):
    module, params, schedule, contexts = policy
    x0, traj = sample(module, params, schedule, contexts, CFG(5.0), jax.random.key(1),
                      latent_shape=LATENT)
    return x0, traj


def test_guidance_rules():
    rng = np.random.default_rng(0)
    null, orig, expanded = (rng.standard_normal((2, 4, 4, 4)) for _ in range(3))
    np.testing.assert_allclose(prompt_centred_guidance(null, orig, expanded, 3.0, 0.0),
                               classifier_free_guidance(null, orig, 3.0), atol=1e-12)
    # Eq. 5 as written: w1 eps(c) + (1 - w1 - w2) eps(null) + w2 eps(c_hat); defaults 5, 5.
    np.testing.assert_allclose(prompt_centred_guidance(null, orig, expanded),
                               5 * orig - 9 * null + 5 * expanded, atol=1e-12)
    np.testing.assert_allclose(classifier_free_guidance(null, orig, 5.0),
                               5 * orig + (1 - 5) * null, atol=1e-12)


def test_one_batched_model_call_per_guided_prediction():
    calls = []

    def toy(params, x, t, ctx):  # a denoiser whose output tells the branches apart
        calls.append((x.shape, t.shape, ctx.shape))
        return params * x + ctx.mean(axis=(1, 2))[:, None, None, None] + 0.001 * t[:, None,
                                                                                    None, None]

    x = jax.random.normal(jax.random.key(0), (B, 4, 4, 2))
    null, orig, expanded = _texts(3, 3, dim=5)
    contexts = branch_contexts(null, orig, expanded)
    assert contexts.shape == (B, 3, 7, 5)
    t = jnp.arange(B) * 100
    guided = jax.jit(guided_model_output, static_argnums=0)
    out = guided(toy, 2.0, x, t, contexts, PromptCentredGuidance(5.0, 5.0))
    assert calls == [((3 * B, 4, 4, 2), (3 * B,), (3 * B, 7, 5))]
    eps = [toy(2.0, np.asarray(x), np.asarray(t), np.asarray(c)) for c in (null, orig, expanded)]
    np.testing.assert_allclose(out, prompt_centred_guidance(*eps), atol=1e-5)
    with pytest.raises(ValueError, match="2 branches"):
        guided_model_output(toy, 2.0, x, t, contexts, CFG(5.0))


def test_trajectory(policy, sampled):
    *_, schedule, _ = policy
    x0, traj = sampled
    assert x0.shape == (B, *LATENT) and x0.dtype == jnp.float32
    assert traj.latents.shape == (B, STEPS + 1, *LATENT)
    assert traj.log_probs.shape == (B, STEPS) and traj.timesteps.shape == (STEPS,)
    np.testing.assert_array_equal(traj.timesteps, schedule.timesteps)
    np.testing.assert_array_equal(traj.latents[:, -1], x0)
    assert np.isfinite(np.asarray(traj.log_probs)).all()
    assert 0.8 < float(jnp.std(traj.latents[:, 0])) < 1.2  # x_T ~ N(0, I)


def test_deterministic_given_the_key_and_compiled_once(policy, sampled):
    module, params, schedule, contexts = policy
    x0, traj = sampled
    compiled = sample._cache_size()
    again, traj2 = sample(module, params, schedule, contexts, CFG(5.0), jax.random.key(1),
                          latent_shape=LATENT)
    np.testing.assert_array_equal(again, x0)
    np.testing.assert_array_equal(traj2.log_probs, traj.log_probs)
    # New key, new prompts, new guidance weight and a fresh schedule object: no new compile.
    other, _ = sample(module, params, DDIMSchedule.from_config(SD15, STEPS),
                      contexts[::-1], CFG(3.0), jax.random.key(2), latent_shape=LATENT)
    assert np.abs(np.asarray(other - x0)).max() > 1e-2
    assert sample._cache_size() == compiled


def test_rescoring_gives_ratio_one(policy, sampled):
    """Re-score every transition with per-sample (shuffled) timesteps: rho = 1, approx_kl = 0."""
    module, params, schedule, contexts = policy
    _, traj = sampled
    rescore = jax.jit(rescore_log_prob, static_argnames=("denoiser", "eta"))
    rows = np.arange(B)
    for j in range(STEPS):
        step = (rows + j) % STEPS  # sample b re-scores its step (b + j) mod S
        log_prob = rescore(module, params, schedule, contexts, CFG(5.0), traj.latents[rows, step],
                           traj.timesteps[step], traj.latents[rows, step + 1], eta=1.0)
        old = traj.log_probs[rows, step]
        assert np.abs(np.asarray(log_prob - old)).max() <= 1e-6
        loss, metrics = ddpo_loss(log_prob, old, -jnp.ones(B))
        assert abs(float(loss) - 1.0) <= 1e-5  # advantage -1 at ratio 1
        assert float(metrics["approx_kl"]) <= 1e-12 and float(metrics["clipfrac"]) == 0.0
    assert rescore._cache_size() == 1


def test_eight_devices_and_prompt_centred_guidance(policy, sampled):
    """Batch sharded over 8 devices, prompt-centred guidance with w2 = 0 on (null, original,
    expanded): the same chains as 1 device with CFG on (null, original)."""
    module, params, schedule, contexts = policy
    x0, traj = sampled
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    (expanded,) = _texts(5, 1)
    three = branch_contexts(contexts[:, 0], contexts[:, 1], expanded)
    x0_8, traj_8 = sample(module, jax.device_put(params, NamedSharding(mesh, P())), schedule,
                          jax.device_put(three, batch), PromptCentredGuidance(5.0, 0.0),
                          jax.random.key(1), latent_shape=LATENT, sharding=batch)
    assert x0_8.sharding.is_equivalent_to(batch, x0_8.ndim)
    # Each device runs the UNet on its own slice, so convolutions may sum in another order:
    # agreement is to float32 round-off, 1e-5 of the latents' scale (they reach ~40 here).
    scale = max(1.0, float(np.abs(np.asarray(traj.latents)).max()))
    assert np.abs(np.asarray(traj_8.latents - traj.latents)).max() <= 1e-5 * scale
    np.testing.assert_allclose(traj_8.log_probs, traj.log_probs, atol=1e-5)


def test_chunked_rollout_gives_the_same_chains(policy, sampled):
    """``chunks=2`` over 4 devices (2 rows each, one per chunk): the chunks run in turn, yet
    the chains and log-probs are the unchunked ones (each chunk draws its rows of the full
    batch's noise), placed as the batch is."""
    module, params, schedule, contexts = policy
    x0, traj = sampled
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    batch = NamedSharding(mesh, P("data"))
    x0_c, traj_c = sample(module, jax.device_put(params, NamedSharding(mesh, P())), schedule,
                          jax.device_put(contexts, batch), CFG(5.0), jax.random.key(1),
                          latent_shape=LATENT, sharding=batch, chunks=2)
    assert traj_c.latents.shape == traj.latents.shape and x0_c.sharding.is_equivalent_to(batch, 4)
    scale = max(1.0, float(np.abs(np.asarray(traj.latents)).max()))
    assert np.abs(np.asarray(traj_c.latents - traj.latents)).max() <= 1e-5 * scale
    np.testing.assert_allclose(traj_c.log_probs, traj.log_probs, atol=1e-5)
    np.testing.assert_allclose(x0_c, x0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="3 chunks do not divide the batch of 8"):
        sample(module, params, schedule, contexts, CFG(5.0), jax.random.key(1),
               latent_shape=LATENT, chunks=3)


def test_training_rollout_decodes_in_chunks():
    """``policy.rollout`` with ``chunks=2`` (``sample.microbatch``) over 4 devices: the text
    encoder, the chunked DDIM chain and the chunked VAE decoding give the unchunked images,
    trajectory and contexts."""
    import importlib.util
    from pathlib import Path

    from parrot_jax import loading, parallel, policy
    from parrot_jax.data.prompts import BUILTIN_PROMPTS
    from parrot_jax.data.tokenizer import build_clip_tokenizer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("tiny_config", root / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config("smoke")
    length = config.model.tiny.context_length
    tokenizer = build_clip_tokenizer(loading._clip_corpus(BUILTIN_PROMPTS, 4), length)
    m = loading._tiny_t2i(config, tokenizer, jnp.float32)
    ids = np.asarray(tokenizer(list(BUILTIN_PROMPTS[:2]) + [""], padding="max_length",
                               max_length=length)["input_ids"], np.int32)
    mesh = parallel.make_mesh({"data": 4}, jax.devices()[:4])
    out = {}
    for chunks in (1, 2):
        out[chunks] = jax.device_get(policy.rollout(
            m["unet"], m["text_encoder"], m["vae"], 4, m["latent_shape"], 1.0, 0.18215,
            parallel.batch_sharding(mesh), m["unet_params"], m["text_params"], m["vae_params"],
            m["schedule"], CFG(5.0), ids[:2], ids[2:], jax.random.key(3), chunks))
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(out[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # float32 round-off
