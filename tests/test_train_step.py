"""The jitted T2I update on the tiny SD-1-like UNet: ratio 1 before any update, frozen parameters
untouched, scan-accumulated gradient = sum of per-timestep gradients, 1 vs 8 devices, and a few
updates moving log-probs in the advantages' direction."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_schedule import SD15

from parrot_jax import hub, parallel
from parrot_jax.diffusion import CFG, DDIMSchedule, branch_contexts, sample
from parrot_jax.models.lora import LoRA
from parrot_jax.rl import rescore_log_prob
from parrot_jax.rl.losses import ddpo_loss
from parrot_jax.toyworld import assets
from parrot_jax.training.step import (
    T2IBatch,
    T2IUpdateConfig,
    _timestep_slots,
    accumulate_gradients,
    init_train_state,
    make_rescore,
    make_train_step,
    merged_params,
    put_t2i_batch,
    split_params,
    state_shardings,
)

B, STEPS, LATENT = 8, 3, (8, 8, 4)
GUIDANCE = CFG(5.0)
# A wide ratio clip so a few updates visibly move the log-probs (the paper's 1e-4 clip is
# exercised in test_rl_losses); remat on, as in training.
CONFIG = T2IUpdateConfig(learning_rate=3e-4, clip_range=0.2)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.fixture(scope="module")
def setup(sd1_unet):
    module, params = hub.load_unet(sd1_unet[1])
    schedule = DDIMSchedule.from_config(SD15, STEPS)
    k1, k2 = jax.random.split(jax.random.key(0))
    contexts = branch_contexts(jax.random.normal(k1, (7, 32)), jax.random.normal(k2, (B, 7, 32)))
    _, traj = sample(module, params, schedule, contexts, GUIDANCE, jax.random.key(1),
                     latent_shape=LATENT)
    advantages = jnp.array([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.0])
    batch = T2IBatch(traj.latents, traj.log_probs, traj.timesteps, contexts, advantages,
                     advantages != 0)
    return module, params, schedule, batch


@pytest.fixture(scope="module")
def mesh_step(setup):
    module, params, schedule, _ = setup
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    rules = parallel.FSDP_ALL
    state = init_train_state(params, CONFIG, mesh=mesh, rules=rules)
    sharding = state_shardings(state, mesh, rules)
    step = make_train_step(module, schedule, GUIDANCE, CONFIG, mesh=mesh, state_sharding=sharding)
    return mesh, state, step


@pytest.fixture(scope="module")
def per_timestep(setup):
    """Jitted ``(trainable, slot [B]) -> (loss gradient, log_prob [B])`` of one transition."""
    module, params, schedule, batch = setup
    _, frozen = split_params(params, CONFIG)

    def loss(trainable, slot):
        rows = jnp.arange(B)
        log_prob = rescore_log_prob(
            module.clone(remat_policy=None), merged_params(trainable, frozen), schedule,
            batch.contexts, GUIDANCE, batch.latents[rows, slot], batch.timesteps[slot],
            batch.latents[rows, slot + 1], eta=CONFIG.eta)
        value, _ = ddpo_loss(log_prob, batch.log_probs[rows, slot], batch.advantages,
                             clip_range=CONFIG.clip_range, adv_clip=None)
        return value, log_prob

    return jax.jit(jax.grad(loss, has_aux=True))


def test_split_params():
    params = {"down": {"attn1": {"query": {"kernel": jnp.ones((4, 4))}},
                       "attn2": {"query": {"kernel": jnp.ones((4, 4))},
                                 "proj_attn": {"kernel": jnp.ones((4, 4)),
                                               "bias": jnp.ones(4)}}}}
    trainable, frozen = split_params(params, T2IUpdateConfig())
    assert sorted(trainable) == ["down/attn2/proj_attn/bias", "down/attn2/proj_attn/kernel",
                                 "down/attn2/query/kernel"]
    assert list(frozen) == ["down/attn1/query/kernel"]
    assert jax.tree.structure(merged_params(trainable, frozen)) == jax.tree.structure(params)
    everything, nothing = split_params(params, T2IUpdateConfig(trainable="all"))
    assert len(everything) == 4 and not nothing
    lora, base = split_params(params, T2IUpdateConfig(trainable="lora"), jax.random.key(0))
    assert isinstance(lora, LoRA) and base is params
    for a, b in zip(jax.tree.leaves(merged_params(lora, base)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # B = 0: a fresh LoRA changes nothing
    with pytest.raises(ValueError, match="matches no parameter"):
        split_params(params, T2IUpdateConfig(trainable="regex", trainable_regex="attn9"))
    with pytest.raises(ValueError, match="expected one of"):
        split_params(params, T2IUpdateConfig(trainable="cross"))
    with pytest.raises(ValueError, match="PRNG key"):
        split_params(params, T2IUpdateConfig(trainable="lora"))


def test_first_update_ratio_one_and_frozen_untouched(setup, mesh_step):
    _, params, _, batch = setup
    mesh, state, step = mesh_step
    before = jax.tree.map(np.asarray, state)
    new, metrics = step(_copy(state), put_t2i_batch(jax.device_get(batch), mesh),
                        jax.random.key(2))
    metrics = {k: float(v) for k, v in metrics.items()}
    for name in ("ratio", "ratio_min", "ratio_max"):
        assert abs(metrics[name] - 1.0) <= 1e-5, (name, metrics[name])
    assert metrics["clipfrac"] == 0.0 and metrics["approx_kl"] <= 1e-10
    assert metrics["selected_fraction"] == 7 / 8 and metrics["trained_timesteps"] == STEPS
    assert metrics["grad_norm"] > 0 and int(new.step) == 1
    # Frozen parameters are bit-for-bit the loaded ones; every trainable one is attn2 and moved.
    for path, value in new.frozen.items():
        np.testing.assert_array_equal(np.asarray(value), before.frozen[path], err_msg=path)
    assert all("attn2" in p for p in new.trainable)
    moved = [not np.array_equal(np.asarray(v), before.trainable[p])
             for p, v in new.trainable.items()]
    assert all(moved)
    merged = merged_params(jax.device_get(new.trainable), jax.device_get(new.frozen))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(merged),
                            jax.tree.leaves(params)):
        if "attn2" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, b)


def test_scan_gradient_is_sum_of_per_timestep_gradients(setup, per_timestep):
    module, params, schedule, batch = setup
    trainable, frozen = split_params(params, CONFIG)
    slots = _timestep_slots(jax.random.key(5), B, STEPS, STEPS)
    assert sorted(np.asarray(slots)[:, 0].tolist()) == list(range(STEPS))  # a permutation
    config = dataclasses.replace(CONFIG, remat_policy=None)
    accumulate = jax.jit(functools.partial(accumulate_gradients, module, schedule, GUIDANCE,
                                           config))
    summed, sums = accumulate(trainable, frozen, batch, slots)
    expected = jax.tree.map(jnp.zeros_like, trainable)
    for j in range(STEPS):
        grad, _ = per_timestep(trainable, slots[j])
        expected = jax.tree.map(jnp.add, expected, grad)
    # Two differently fused float32 programs: agreement to ~1e-4 of the gradient's scale.
    scale = max(float(jnp.abs(g).max()) for g in expected.values())
    for path in trainable:
        np.testing.assert_allclose(summed[path], expected[path], rtol=1e-3, atol=2e-4 * scale,
                                   err_msg=path)
    assert scale > 0
    assert abs(float(sums["ratio"]) / STEPS - 1.0) < 1e-5


def test_one_vs_eight_devices(setup, mesh_step):
    module, params, schedule, batch = setup
    mesh, state8, step8 = mesh_step
    step1 = make_train_step(module, schedule, GUIDANCE, CONFIG)
    state1 = init_train_state(params, CONFIG)
    key = jax.random.key(7)
    new1, m1 = step1(state1, batch, key)
    new8, m8 = step8(_copy(state8), put_t2i_batch(jax.device_get(batch), mesh), key)
    for name in m1:
        np.testing.assert_allclose(float(m8[name]), float(m1[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # The optimizer state holds the gradient (mu = 0.1 g, nu = 0.001 g^2): same on both, up to
    # float32 sums in another order (~1e-4 relative on g, measured up to 2.2e-4 on g^2).
    for a, b in zip(jax.tree.leaves(new1.opt_state), jax.tree.leaves(new8.opt_state)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=5e-4, atol=1e-4 * np.abs(a).max())
    # Adam's first step is lr * g / (|g| + 1e-8) per element: where |g| sits at float32 noise
    # (~1e-8) any reordering of the gradient sum can flip its sign. Elsewhere: <= 1e-5.
    mu = new1.opt_state[1][0].mu
    for path in new1.trainable:
        p1, p8 = np.asarray(new1.trainable[path]), np.asarray(new8.trainable[path])
        resolved = np.abs(np.asarray(mu[path])) / 0.1 > 1e-6
        np.testing.assert_allclose(p8[resolved], p1[resolved], atol=1e-5, err_msg=path)
        assert np.abs(p8 - p1).max() <= 2.01 * CONFIG.learning_rate, path  # at worst a flip


def test_updates_raise_log_prob_of_positive_advantages(setup, mesh_step, per_timestep):
    _, params, _, batch = setup
    mesh, state, step = mesh_step
    state = _copy(state)
    placed = put_t2i_batch(jax.device_get(batch), mesh)
    for i in range(3):
        state, metrics = step(state, placed, jax.random.key(10 + i))
    assert float(metrics["approx_kl"]) > 0
    trainable, _ = jax.device_get((state.trainable, None))
    rows = np.arange(B)
    delta = np.zeros(B)
    for j in range(STEPS):  # mean change of each sample's log-prob over its transitions
        _, log_prob = per_timestep(trainable, jnp.full((B,), j))
        delta += (np.asarray(log_prob) - np.asarray(batch.log_probs)[rows, j]) / STEPS
    adv = np.asarray(batch.advantages)
    assert np.all(delta[adv > 0] > 0) and np.all(delta[adv < 0] < 0), (delta, adv)



def test_lora_update_trains_only_the_factors(setup):
    module, params, schedule, batch = setup
    config = dataclasses.replace(CONFIG, trainable="lora", remat_policy=None)
    state = init_train_state(params, config, key=jax.random.key(4))
    assert isinstance(state.trainable, LoRA)
    step = make_train_step(module, schedule, GUIDANCE, config)
    new, metrics = step(state, batch, jax.random.key(5))
    assert abs(float(metrics["ratio"]) - 1.0) <= 1e-5  # B = 0: the LoRA starts as a no-op
    for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    factors = jax.tree_util.tree_leaves_with_path(new.trainable.factors)
    assert all("attn2" in jax.tree_util.keystr(p) for p, _ in factors)
    assert any(jax.tree_util.keystr(p).endswith("['b']") and float(jnp.abs(x).max()) > 0
               for p, x in factors)  # the zero-initialised B moved


def test_microbatches_give_the_unchunked_step(setup):
    """A minibatch processed in chunks inside the step (``t2i.microbatch``) gives the
    unchunked step's loss, ratios, gradient norm and re-scored log-probs, sharded over 2
    devices (4 samples each, chunks of 2: each device keeps its rows)."""
    module, params, schedule, batch = setup
    key = jax.random.key(2)
    results = {}
    for chunks, devices in ((1, None), (2, 2)):
        config = dataclasses.replace(CONFIG, microbatches=chunks)
        mesh = None if devices is None else parallel.make_mesh({"data": devices},
                                                               jax.devices()[:devices])
        state = init_train_state(params, config, mesh=mesh)
        kw = {} if mesh is None else dict(mesh=mesh, state_sharding=state_shardings(state, mesh))
        b = batch if mesh is None else put_t2i_batch(jax.device_get(batch), mesh)
        log_probs = make_rescore(module, schedule, GUIDANCE, config, **kw)(
            state.trainable, state.frozen, b, key)
        _, metrics = make_train_step(module, schedule, GUIDANCE, config, **kw)(state, b, key)
        results[chunks] = jax.device_get((metrics, log_probs))
    (m1, lp1), (m2, lp2) = results[1], results[2]
    np.testing.assert_allclose(lp2, lp1, rtol=1e-5, atol=1e-5)
    for name in ("loss", "ratio", "clipfrac", "grad_norm", "ratio_min", "ratio_max"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=1e-4, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="does not split into 3 chunks"):
        make_train_step(module, schedule, GUIDANCE, dataclasses.replace(CONFIG, microbatches=3))(
            init_train_state(params, CONFIG), batch, key)


@pytest.fixture(scope="module")
def toy_bf16():
    """The toy world's trained UNet with bfloat16 activations, 32 trajectories of 4 steps."""
    root = assets.ASSETS / assets.PIPELINE
    module, params = hub.load_unet(root, subfolder="unet")
    unet = module.clone(dtype=jnp.bfloat16)
    schedule = DDIMSchedule.from_pretrained(root, 4)
    n, side = 32, unet.config.sample_size
    width = unet.config.cross_attention_dim[-1]  # per block; all equal
    contexts = jax.random.normal(jax.random.key(0), (n, 2, 8, width))
    _, traj = sample(unet, params, schedule, contexts, GUIDANCE, jax.random.key(1),
                     latent_shape=(side, side, unet.config.in_channels))
    advantages = jnp.linspace(-1.0, 1.0, n)
    return unet, params, schedule, T2IBatch(traj.latents, traj.log_probs, traj.timesteps,
                                            contexts, advantages, advantages > 0)


@pytest.mark.parametrize("remat", [None, "nothing_saveable"])
def test_first_update_ratio_one_in_bfloat16(toy_bf16, remat):
    """bfloat16 activations: re-scored at the minibatch's shapes by the update's own forward
    pass (``make_rescore``), the stored transitions give ratio 1 inside the paper's 1e-4 clip,
    with per-block remat or without it (then the update checkpoints each timestep's loss).
    The rollout's own log-probs, from a batch twice as large, do not."""
    unet, params, schedule, batch = toy_bf16
    config = dataclasses.replace(CONFIG, clip_range=1e-4, remat_policy=remat, rescore=True,
                                 timestep_fraction=0.5)
    minibatch = jax.tree.map(lambda x: x[:16] if x.ndim and x.shape[0] == 32 else x, batch)
    state, key = init_train_state(params, config), jax.random.key(2)
    log_probs = make_rescore(unet, schedule, GUIDANCE, config)(state.trainable, state.frozen,
                                                              minibatch, key)
    assert log_probs.shape == minibatch.log_probs.shape and log_probs.dtype == jnp.float32
    trained = np.zeros(log_probs.shape, bool)  # the slots the step with this key trains on
    trained[np.arange(16)[None, :], np.asarray(_timestep_slots(key, 16, 4, 2))] = True
    np.testing.assert_array_equal(log_probs[~trained], minibatch.log_probs[~trained])
    np.testing.assert_allclose(log_probs[trained], minibatch.log_probs[trained], atol=2.0)
    step = make_train_step(unet, schedule, GUIDANCE, config)
    ratios = {}
    for name, b in (("rollout", minibatch), ("rescored", minibatch.replace(log_probs=log_probs))):
        _, metrics = step(jax.tree.map(jnp.copy, state), b, key)
        ratios[name] = {k: float(metrics[k]) for k in ("ratio_min", "ratio_max", "clipfrac")}
    assert all(abs(ratios["rescored"][k] - 1.0) <= 1e-6 for k in ("ratio_min", "ratio_max"))
    assert ratios["rescored"]["clipfrac"] == 0.0, ratios
    assert ratios["rollout"]["clipfrac"] > 0.0, ratios  # what re-scoring is for
