"""The toy PEN: a tiny T5 trained from scratch through the PEN SFT step on toy prompt pairs.

Pairs are (user prompt, the prompt engineer's expansion) from ``captions.user_prompts`` and
``captions.engineer``: 2-4 modifiers with a plausible but not reward-optimal bias (soft, pastel),
which is what Parrot's RL then moves. Training reuses ``training.pen_sft`` as it is: its
``PairEncoder`` / grain ``train_dataset`` over an in-memory list of ``PromptPair``s, its jitted
``train_step`` (full fine-tuning: trainable = all parameters, no LoRA base), its optimiser and
its exact held-out loss; only the files, checkpoints and config plumbing of
``train_and_evaluate`` are left out (the build saves the result itself).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parrot_jax.data.pipeline import PairEncoder, train_dataset
from parrot_jax.data.promptist import PromptPair
from parrot_jax.expansion.sampling import greedy
from parrot_jax.expansion.template import InstructionTemplate, decode, tokenize_prompts
from parrot_jax.models.random_init import random_params
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.toyworld import captions, world
from parrot_jax.training import pen_sft


@dataclasses.dataclass(frozen=True)
class PenTrainConfig:
    """The toy T5 and its SFT run; the defaults are the real build budget. Batches are global
    (split over all devices, so a multiple of the device count)."""

    d_model: int = 64  # residual width
    d_kv: int = 16  # width of one attention head
    d_ff: int = 128  # gated-GELU feed-forward width
    num_layers: int = 2  # encoder blocks
    num_decoder_layers: int = 2
    num_heads: int = 4
    relative_attention_num_buckets: int = 16
    relative_attention_max_distance: int = 48
    num_pairs: int = 20000  # training pairs drawn from the world
    heldout_pairs: int = 512  # held-out pairs (another stream of the seed) for the loss
    batch_size: int = 64
    eval_batch_size: int = 128
    steps: int = 1500  # optimiser steps
    learning_rate: float = 3e-3  # peak AdamW rate
    schedule: str = "cosine"  # 'cosine' (to 0 at the last step) or 'constant', after warmup
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_input_length: int = 32  # tokens of the templated user prompt (longest seen: 24)
    max_target_length: int = 24  # tokens of the expansion incl. EOS (longest seen: 16)
    eval_prompts: int = 256  # held-out prompts expanded greedily for the parse metric
    log_every: int = 100  # steps between printed losses (0: silent)

    def __post_init__(self):
        for name in ("d_model", "num_layers", "num_decoder_layers", "num_pairs",
                     "heldout_pairs", "batch_size", "eval_batch_size", "steps", "eval_prompts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PenTrainConfig.{name}={getattr(self, name)} must be > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"PenTrainConfig.schedule={self.schedule!r}: 'cosine' or "
                             "'constant'")


def build_pen(config: PenTrainConfig, tokenizer: Any) -> T5ForConditionalGeneration:
    """The tiny FLAN-T5-layout model for ``tokenizer`` (pad = decoder start, eos from it)."""
    t5 = T5Config(
        vocab_size=len(tokenizer), d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)
    return T5ForConditionalGeneration(t5)


def toy_pairs(rng: np.random.Generator, n: int, source: str = "toy") -> list[PromptPair]:
    """``n`` (user prompt -> engineered prompt) pairs of fresh scenes."""
    prompts = captions.user_prompts(world.sample_scenes(rng, n), rng)
    return [PromptPair(p, e, f"{source}[{i}]")
            for i, (p, e) in enumerate(zip(prompts, captions.engineer(prompts, rng)))]


def expansion_ok(prompt: str, expansion: str, min_modifiers: int = 2) -> bool:
    """Whether ``expansion`` keeps every attribute ``prompt`` names (same values) and names at
    least ``min_modifiers`` others (``captions.parse``)."""
    asked, got = captions.parse(prompt), captions.parse(expansion)
    kept = all(got.get(a) == v for a, v in asked.items())
    return kept and len(set(got) - set(asked)) >= min_modifiers


def expand_greedy(module: T5ForConditionalGeneration, params: Any, tokenizer: Any,
                  prompts: Sequence[str], max_input_length: int, max_new_tokens: int,
                  template: InstructionTemplate | None = None) -> list[str]:
    """Greedy expansions of user ``prompts`` (``expansion.sampling.greedy``), decoded."""
    ids, mask = tokenize_prompts(tokenizer, prompts, max_input_length,
                                 template or InstructionTemplate())
    out = greedy(module, params, ids, mask, max_new_tokens)
    return decode(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))


def train_pen(config: PenTrainConfig, tokenizer: Any, seed: int,
              template: InstructionTemplate | None = None
              ) -> tuple[T5ForConditionalGeneration, Any, dict[str, float]]:
    """Train the toy PEN from random init -> ``(module, params, metrics)``.

    Metrics: ``initial_eval_loss`` / ``eval_loss`` (token-mean held-out NLL), ``first_loss``,
    ``train_loss`` (mean of the last 10% of steps), ``expansion_ok`` (fraction of greedy
    expansions of held-out prompts that keep the prompt's attributes and add >= 2),
    ``steps_per_s`` (after the compiling first step).
    """
    template = template or InstructionTemplate()
    mesh = pen_sft.data_mesh()
    devices = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % devices:
            raise ValueError(f"PenTrainConfig.{name}={getattr(config, name)} must be a "
                             f"multiple of the {devices} devices")
    train = toy_pairs(np.random.default_rng([seed, 30]), config.num_pairs, "train")
    heldout = toy_pairs(np.random.default_rng([seed, 31]), config.heldout_pairs, "heldout")
    encoder = PairEncoder(tokenizer, config.max_input_length, config.max_target_length,
                          template)
    encoder.check_lengths(train)
    encoder.check_lengths(heldout)
    dataset = train_dataset(train, encoder, config.batch_size, seed=seed)

    module = build_pen(config, tokenizer)
    params = jax.tree.map(jnp.asarray, random_params(module, seed))
    optim = pen_sft.OptimSettings(config.learning_rate, config.schedule, config.warmup_steps,
                                  config.weight_decay, 0.9, 0.999, config.grad_clip,
                                  config.steps if config.schedule == "cosine" else 0)
    state = jax.device_put(
        {"step": jnp.zeros((), jnp.int32), "trainable": params,
         "opt_state": pen_sft.make_optimizer(optim).init(params)},
        NamedSharding(mesh, PartitionSpec()))

    def evaluate(trainable: Any) -> float:
        return pen_sft.heldout_loss(module, None, trainable, heldout, encoder,
                                    config.eval_batch_size, mesh)

    metrics = {"initial_eval_loss": evaluate(state["trainable"])}
    losses, start = [], None
    for step in range(config.steps):
        state, out = pen_sft.train_step(state, None, pen_sft.shard_batch(dataset[step], mesh),
                                        module=module, optim=optim)
        losses.append(out["train_loss"])
        if start is None:
            jax.block_until_ready(out["train_loss"])
            start = time.perf_counter()
        if config.log_every and (step + 1) % config.log_every == 0:
            print(f"pen step {step + 1}/{config.steps}: loss {float(out['train_loss']):.4f}",
                  flush=True)
    losses = np.asarray(jax.device_get(losses), np.float64)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("toy PEN: non-finite loss at step "
                                 f"{int(np.argmin(np.isfinite(losses))) + 1}")
    elapsed = time.perf_counter() - start
    params = jax.device_get(state["trainable"])
    prompts = [p.prompt for p in toy_pairs(np.random.default_rng([seed, 32]),
                                           config.eval_prompts)]
    expansions = expand_greedy(module, params, tokenizer, prompts, config.max_input_length,
                               config.max_target_length, template)
    tail = max(1, len(losses) // 10)
    metrics.update(
        eval_loss=evaluate(state["trainable"]), first_loss=float(losses[0]),
        train_loss=float(losses[-tail:].mean()),
        expansion_ok=float(np.mean([expansion_ok(p, e) for p, e in zip(prompts, expansions)])),
        steps_per_s=(len(losses) - 1) / elapsed if len(losses) > 1 else 0.0)
    return module, params, metrics
