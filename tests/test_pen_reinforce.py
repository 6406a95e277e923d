"""REINFORCE on the PEN's LoRA factors: the loss against its definition, the direction of one
update for positive and negative advantages, the group baseline, and the KL to the SFT model.

The policy is a tiny random FLAN-T5-layout model written with ``save_pretrained`` and read with
``hub.load_t5``; the expansions are sampled by ``expansion.sample``.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FLAN_T5, tiny_t5_torch

from parrot_jax import hub
from parrot_jax.expansion import (
    PENRLConfig,
    SamplingConfig,
    init_pen_lora,
    pen_rl_loss,
    pen_rl_optimizer,
    pen_rl_step,
    sample,
    sequence_log_prob,
)
from parrot_jax.models.lora import merge

G = 4  # groups (one prompt and one sampled expansion each)
# A larger step than the default so one update moves log-probs well above float32 noise.
PAPER = PENRLConfig.preset("paper", learning_rate=1e-3, lora_rank=4)
KL = PENRLConfig.preset("paper", kl_coef=0.5, learning_rate=1e-3, lora_rank=4)


class Batch(NamedTuple):
    module: Any
    params: Any
    ids: np.ndarray
    mask: np.ndarray
    tokens: np.ndarray
    token_mask: np.ndarray
    sampled_log_probs: np.ndarray  # [G, N], recorded by the sampler


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    folder = tmp_path_factory.mktemp("pen_rl")
    tiny_t5_torch(TINY_FLAN_T5, seed=5).save_pretrained(folder)
    module, params = hub.load_t5(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 100, (G, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    out = sample(module, params, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=16))
    tokens, token_mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert token_mask.sum(1).min() >= 2
    return Batch(module, params, ids, mask, tokens, token_mask, np.asarray(out.log_probs))


@pytest.fixture(scope="module")
def seq_log_prob():
    return jax.jit(sequence_log_prob, static_argnums=0)


def _lora(batch: Batch, config: PENRLConfig = PAPER):
    return init_pen_lora(jax.random.key(1), batch.params, config)


def _step(batch: Batch, config: PENRLConfig, advantages, lora=None):
    """One pen_rl_step from a fresh LoRA (copied: the step donates its inputs)."""
    lora = _lora(batch, config) if lora is None else lora
    lora = jax.tree_util.tree_map(jnp.copy, lora)
    opt_state = pen_rl_optimizer(config).init(lora.factors)
    return pen_rl_step(lora, opt_state, batch.params, batch.module, config, batch.ids,
                       batch.mask, batch.tokens, batch.token_mask,
                       jnp.asarray(advantages, jnp.float32))


def _max_abs(tree) -> float:
    return max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))


def _log_p(batch: Batch, seq_log_prob, lora=None) -> np.ndarray:
    """``log p(ĉ_g | c_g)`` ``[G]`` under the base parameters or with ``lora`` merged."""
    params = batch.params if lora is None else merge(batch.params, lora)
    return np.asarray(seq_log_prob(batch.module, params, batch.ids, batch.mask, batch.tokens,
                                   batch.token_mask))


def test_loss_and_mixed_advantages(batch, seq_log_prob):
    """The loss is ``-mean_g(A_g log p(ĉ_g | c_g))``, the recorded sampling log-probs sum to
    ``log p``, and after one step a rewarded expansion became more likely, a penalised one less.
    """
    lora = _lora(batch)
    assert _max_abs(lora.factors) > 0  # the A factors are random, B is zero
    advantages = np.array([1.0, 0.0, -1.0, 0.5], np.float32)
    log_p = _log_p(batch, seq_log_prob)
    assert (log_p < -5).all()
    np.testing.assert_allclose(batch.sampled_log_probs.sum(1), log_p, rtol=1e-6, atol=1e-5)
    lora, _, metrics = _step(batch, PAPER, advantages, lora)
    np.testing.assert_allclose(float(metrics["loss"]), -np.mean(advantages * log_p), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["log_prob"]), log_p.mean(), rtol=1e-6)
    assert float(metrics["kl"]) == 0.0
    change = _log_p(batch, seq_log_prob, lora) - log_p
    assert change[0] > 0 > change[2]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_log_prob(batch, seq_log_prob, sign):
    """Positive advantages raise the sampled expansions' log-probs after one step, negative ones
    lower them, and only the LoRA factors change (the base parameters are untouched)."""
    advantages = np.full(G, sign, np.float32)
    before = np.asarray(seq_log_prob(batch.module, batch.params, batch.ids, batch.mask,
                                     batch.tokens, batch.token_mask))
    lora, _, metrics = _step(batch, PAPER, advantages)
    assert float(metrics["grad_norm"]) > 0
    np.testing.assert_allclose(float(metrics["log_prob"]), before.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), -sign * before.mean(), rtol=1e-6)
    after = np.asarray(seq_log_prob(batch.module, merge(batch.params, lora), batch.ids,
                                    batch.mask, batch.tokens, batch.token_mask))
    change = sign * (after - before)
    assert change.mean() > 1e-3
    assert (change > 0).all()


def test_group_baseline(batch):
    """With the baseline, equal advantages give exactly zero gradient (without it they do not),
    and unequal ones the loss and gradient of the centred advantages without a baseline."""
    baseline = dataclasses.replace(PAPER, group_baseline=True)
    equal = np.full(G, 3.0, np.float32)
    assert float(_step(batch, baseline, equal)[2]["grad_norm"]) == 0.0
    assert float(_step(batch, PAPER, equal)[2]["grad_norm"]) > 1e-3
    unequal = np.array([2.0, -1.0, 0.5, 0.0], np.float32)
    ours = _step(batch, baseline, unequal)[2]
    ref = _step(batch, PAPER, unequal - unequal.mean())[2]
    assert float(ours["grad_norm"]) > 1e-3
    for key in ("loss", "grad_norm", "advantage"):
        np.testing.assert_allclose(float(ours[key]), float(ref[key]), rtol=1e-5, atol=1e-7)


def test_per_prompt_baseline(batch):
    """With two expansions per prompt the baseline is each pair's mean: pairs whose two
    advantages are equal give no gradient however far apart the pairs are (the batch mean
    would still push the better pair up), and unequal ones the update of the advantages
    centred within pairs without a baseline."""
    per_prompt = dataclasses.replace(PAPER, group_baseline=True, expansions_per_prompt=2)
    batch_mean = dataclasses.replace(PAPER, group_baseline=True)
    pairs = np.array([5.0, 5.0, -1.0, -1.0], np.float32)
    assert float(_step(batch, per_prompt, pairs)[2]["grad_norm"]) == 0.0
    assert float(_step(batch, batch_mean, pairs)[2]["grad_norm"]) > 1e-3
    unequal = np.array([2.0, -1.0, 0.5, 0.0], np.float32)
    centred = unequal - np.repeat(unequal.reshape(2, 2).mean(1), 2)
    ours = _step(batch, per_prompt, unequal)[2]
    ref = _step(batch, PAPER, centred)[2]
    for key in ("loss", "grad_norm", "advantage"):
        np.testing.assert_allclose(float(ours[key]), float(ref[key]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="4 groups do not split into prompts of 3"):
        _step(batch, dataclasses.replace(per_prompt, expansions_per_prompt=3), unequal)


def test_kl_to_sft_model(batch, seq_log_prob):
    """The KL is exactly 0 for a fresh LoRA (B = 0: the policy is the SFT model) and positive
    after a step that raised the sampled expansions' log-probs; it enters the loss as the
    penalty ``A - kl_coef * kl`` on each group's advantage (metrics of a second step are those
    of the updated LoRA)."""
    advantages = np.ones(G, np.float32)
    lora, opt_state, metrics = _step(batch, KL, advantages)
    assert float(metrics["kl"]) == 0.0
    kl = _log_p(batch, seq_log_prob, lora) - _log_p(batch, seq_log_prob)
    assert (kl > 0).all()
    tuned = _log_p(batch, seq_log_prob, lora)
    _, _, metrics = pen_rl_step(lora, opt_state, batch.params, batch.module, KL, batch.ids,
                                batch.mask, batch.tokens, batch.token_mask, jnp.asarray(advantages))
    np.testing.assert_allclose(float(metrics["kl"]), kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), -np.mean((advantages - 0.5 * kl) * tuned),
                               rtol=1e-5)


def test_step_compiles_once(batch):
    before = pen_rl_step._cache_size()
    lora, opt_state, _ = _step(batch, KL, np.arange(G, dtype=np.float32))
    compiled = pen_rl_step._cache_size()
    assert compiled <= before + 1  # KL's step may have been compiled by an earlier test
    for advantages in (np.ones(G), np.linspace(-1, 1, G)):
        lora, opt_state, metrics = pen_rl_step(
            lora, opt_state, batch.params, batch.module, KL, batch.ids, batch.mask,
            batch.tokens, batch.token_mask, jnp.asarray(advantages, jnp.float32))
    assert pen_rl_step._cache_size() == compiled
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) != 0


def test_presets_and_config_errors(batch):
    paper = PENRLConfig.preset("paper")
    assert not paper.group_baseline and paper.kl_coef == 0.0
    regularised = PENRLConfig.preset("regularised")
    assert regularised.group_baseline and regularised.kl_coef > 0
    with pytest.raises(ValueError, match="unknown PEN RL preset 'ppo'"):
        PENRLConfig.preset("ppo")
    with pytest.raises(ValueError, match="kl_coef=-1.*lora_rank=0.*expansions_per_prompt=0"):
        PENRLConfig(kl_coef=-1.0, lora_rank=0, expansions_per_prompt=0)
    with pytest.raises(ValueError, match="match no kernel"):
        init_pen_lora(jax.random.key(0), batch.params, PENRLConfig(lora_targets="nothing"))
    with pytest.raises(ValueError, match=r"advantages have shape \(3,\)"):
        pen_rl_loss(_lora(batch), batch.params, batch.module, PAPER, batch.ids, batch.mask,
                    batch.tokens, batch.token_mask, jnp.ones(3))
