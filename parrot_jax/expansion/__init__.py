"""The prompt expansion network (PEN): instruction template, KV-cached sampling with log-probs,
teacher-forced scoring, the REINFORCE update of its LoRA parameters, and the reward identifiers
added after expansion."""

from parrot_jax.expansion.identifiers import (
    assign_identifiers,
    fit_to_context,
    identifier_prefix,
    inference_text,
    parse_identifiers,
    reward_identifier,
    tokenize_conditioning,
    training_text,
)
from parrot_jax.expansion.reinforce import (
    PENRLConfig,
    init_pen_lora,
    pen_rl_loss,
    pen_rl_optimizer,
    pen_rl_step,
)
from parrot_jax.expansion.sampling import PENSample, SamplingConfig, filter_logits, greedy, sample
from parrot_jax.expansion.scoring import sequence_log_prob, token_log_probs
from parrot_jax.expansion.template import (
    DEFAULT_TEMPLATE,
    InstructionTemplate,
    decode,
    tokenize,
    tokenize_prompts,
)

__all__ = [
    "DEFAULT_TEMPLATE", "InstructionTemplate", "PENRLConfig", "PENSample", "SamplingConfig",
    "assign_identifiers", "decode", "filter_logits", "fit_to_context", "greedy",
    "identifier_prefix", "inference_text", "init_pen_lora", "parse_identifiers", "pen_rl_loss",
    "pen_rl_optimizer", "pen_rl_step", "reward_identifier", "sample", "sequence_log_prob",
    "token_log_probs", "tokenize", "tokenize_conditioning", "tokenize_prompts", "training_text",
]
