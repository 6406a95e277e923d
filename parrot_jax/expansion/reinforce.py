"""REINFORCE on the PEN's LoRA parameters (Parrot §4.1, Algorithm 1's ``∇J_φ``).

For each group g (one prompt ``c_g``, one sampled expansion ``ĉ_g``), ``A_g`` is the advantage
the training loop derives from the group's Pareto-selected images. The paper's loss is
``mean_g(-A_g · log p_φ(ĉ_g | c_g))`` with ``log p`` the sum of the expansion's token log-probs
(EOS included), and only LoRA factors trained. Two options, both off in the ``paper`` preset
(docs/method.md explains why one may want them):

* ``group_baseline``: subtract a mean advantage (variance reduction; equal advantages then give
  no gradient): over the batch of groups, or, when the loop expands each prompt
  ``expansions_per_prompt > 1`` times (consecutive groups), over the groups of the same prompt.
  The batch mean leaves in how hard each prompt is; the per-prompt mean compares only
  expansions of one prompt, as RLOO / GRPO do.
* ``kl_coef > 0``: a token-level KL penalty to the frozen SFT model, which is the base
  parameters without LoRA. Per group, ``kl_g = Σ_t (log p_φ - log p_sft)`` over the sampled
  expansion's tokens. It enters as a reward penalty, ``A_g ← A_g - kl_coef · sg(kl_g)`` (before
  the baseline), as in Promptist's / trl's PPO: on-policy, ``E[kl_g ∇log p_φ(ĉ_g)]`` is the
  gradient of ``KL(p_φ || p_sft)``, whereas differentiating ``kl_g`` itself adds
  ``E[∇log p_φ] = 0``, pure noise.

Everything here sees arrays and a module; the loop supplies advantages and sampled tokens.
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from parrot_jax.expansion.scoring import token_log_probs
from parrot_jax.models.lora import LoRA, init_lora, merge
from parrot_jax.models.t5 import T5ForConditionalGeneration
from parrot_jax.optim import clipped_adamw

# T5 attention query / value projections in both stacks (encoder self-, decoder self- and
# cross-attention): the usual LoRA targets; paths as in parrot_jax.models.t5.
DEFAULT_LORA_TARGETS = r"(SelfAttention|EncDecAttention)/(q|v)/kernel$"


@dataclasses.dataclass(frozen=True)
class PENRLConfig:
    """The PEN's policy-gradient update (static under jit). Parrot gives no PEN learning rate,
    LoRA rank or optimiser settings; the defaults follow DDPO's LoRA run (AdamW, lr 3e-4,
    wd 1e-4, grad-norm clip 1)."""

    learning_rate: float = 3e-4  # AdamW step size for the LoRA factors
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 1e-4  # AdamW decoupled weight decay on the factors
    max_grad_norm: float | None = 1.0  # global-norm gradient clip; None = off
    group_baseline: bool = False  # subtract the batch-mean advantage (off in the paper)
    expansions_per_prompt: int = 1  # consecutive groups sharing one prompt; > 1 makes the
    # group baseline the mean over the prompt's expansions instead of over the batch
    kl_coef: float = 0.0  # weight of the token-level KL to the SFT model, nats (paper: 0)
    lora_rank: int = 8  # rank r of each LoRA factor pair
    lora_alpha: float = 8.0  # LoRA scale numerator: delta W = (alpha / r) A B
    lora_targets: str = DEFAULT_LORA_TARGETS  # regex over '/'-joined kernel paths

    def __post_init__(self):
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r} (must be > 0)")
        if not self.kl_coef >= 0:
            problems.append(f"kl_coef={self.kl_coef!r} (must be >= 0)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r} (must be > 0 or None)")
        if not (isinstance(self.lora_rank, int) and self.lora_rank > 0):
            problems.append(f"lora_rank={self.lora_rank!r} (a positive int)")
        if not (isinstance(self.expansions_per_prompt, int) and self.expansions_per_prompt > 0):
            problems.append(f"expansions_per_prompt={self.expansions_per_prompt!r} "
                            "(a positive int)")
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            problems.append(f"lora_targets={self.lora_targets!r} (bad regex: {e})")
        if problems:
            raise ValueError("PENRLConfig: " + "; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PENRLConfig:
        """``paper``: plain REINFORCE, no baseline, no KL. ``regularised``: group baseline and
        ``kl_coef=0.05`` (not in the paper; docs/method.md)."""
        presets = {"paper": {}, "regularised": {"group_baseline": True, "kl_coef": 0.05}}
        if name not in presets:
            raise ValueError(f"unknown PEN RL preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def init_pen_lora(key: jax.Array, params: Any, config: PENRLConfig) -> LoRA:
    """Zero-effect LoRA factors (``B = 0``) on the kernels ``config.lora_targets`` matches."""
    return init_lora(key, params, rank=config.lora_rank, alpha=config.lora_alpha,
                     targets=config.lora_targets)


def pen_rl_optimizer(config: PENRLConfig) -> optax.GradientTransformation:
    """AdamW on the LoRA factors, after a global-norm clip when ``max_grad_norm`` is set."""
    return clipped_adamw(config)


def _baseline(weights: jax.Array, expansions_per_prompt: int) -> jax.Array:
    """``[G]``: the batch mean of ``weights [G]``, or, with ``expansions_per_prompt = E > 1``,
    the mean over each block of ``E`` consecutive groups (one prompt's expansions)."""
    g, e = weights.shape[0], expansions_per_prompt
    if g % e:
        raise ValueError(f"{g} groups do not split into prompts of {e} expansions "
                         "(expansions_per_prompt)")
    blocks = weights.reshape(-1, g if e == 1 else e)  # one block: the whole batch
    return jnp.broadcast_to(jnp.mean(blocks, axis=1, keepdims=True), blocks.shape).reshape(g)


def pen_rl_loss(lora: LoRA, params: Any, module: T5ForConditionalGeneration,
                config: PENRLConfig, input_ids: jax.Array, attention_mask: jax.Array,
                tokens: jax.Array, mask: jax.Array,
                advantages: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The REINFORCE loss over G groups; differentiable in ``lora`` (``params`` are frozen).

    input_ids / attention_mask ``[G, S]``: templated prompts; tokens / mask ``[G, N]``: the
    sampled expansions (``PENSample.tokens`` / ``.mask``); advantages ``[G]`` (treated as data).
    Returns ``(loss, metrics)``: ``log_prob`` (mean ``log p_φ(ĉ_g | c_g)``), ``kl`` (mean
    ``kl_g``; computed only when ``kl_coef > 0``, else 0), ``advantage`` (mean weight used).
    """
    if jnp.shape(advantages) != jnp.shape(tokens)[:1]:
        raise ValueError(f"advantages have shape {jnp.shape(advantages)}, expected one per "
                         f"group {jnp.shape(tokens)[:1]}")
    merged = merge(params, lora)
    token_lp = token_log_probs(module, merged, input_ids, attention_mask, tokens, mask)
    seq_lp = jnp.sum(token_lp, axis=-1)
    weights = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if config.kl_coef > 0:
        sft_lp = token_log_probs(module, params, input_ids, attention_mask, tokens, mask)
        kl = jax.lax.stop_gradient(jnp.sum(token_lp - sft_lp, axis=-1))
        weights = weights - config.kl_coef * kl
        kl = jnp.mean(kl)
    else:
        kl = jnp.zeros((), jnp.float32)
    if config.group_baseline:
        weights = weights - _baseline(weights, config.expansions_per_prompt)
    loss = -jnp.mean(weights * seq_lp)
    metrics = {"log_prob": jax.lax.stop_gradient(jnp.mean(seq_lp)), "kl": kl,
               "advantage": jnp.mean(weights)}
    return loss, metrics


@partial(jax.jit, static_argnames=("module", "config"), donate_argnames=("lora", "opt_state"))
def pen_rl_step(lora: LoRA, opt_state: optax.OptState, params: Any,
                module: T5ForConditionalGeneration, config: PENRLConfig,
                input_ids: jax.Array, attention_mask: jax.Array, tokens: jax.Array,
                mask: jax.Array,
                advantages: jax.Array) -> tuple[LoRA, optax.OptState, dict[str, jax.Array]]:
    """One AdamW update of the LoRA factors on ``pen_rl_loss`` (arguments as there).

    ``opt_state`` comes from ``pen_rl_optimizer(config).init(lora.factors)``; ``lora`` and
    ``opt_state`` are donated. Metrics: ``loss``, ``log_prob``, ``kl``, ``advantage`` and
    ``grad_norm`` (before clipping), all of the parameters before the update.
    """
    def loss_fn(factors):
        return pen_rl_loss(lora.replace(factors=factors), params, module, config, input_ids,
                           attention_mask, tokens, mask, advantages)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora.factors)
    updates, opt_state = pen_rl_optimizer(config).update(grads, opt_state, lora.factors)
    factors = optax.apply_updates(lora.factors, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
    return lora.replace(factors=factors), opt_state, metrics
