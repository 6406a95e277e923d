"""The diffusion policy: DDIM schedule, stochastic DDIM step with log-probs, guidance, sampler."""

from parrot_jax.diffusion.ddim import ddim_step, gaussian_log_prob
from parrot_jax.diffusion.guidance import (
    CFG,
    DenoiseFn,
    Guidance,
    PromptCentredGuidance,
    branch_contexts,
    classifier_free_guidance,
    guided_model_output,
    prompt_centred_guidance,
)
from parrot_jax.diffusion.sampler import (
    Trajectory,
    denoise_fn,
    policy_step,
    rollout,
    sample,
)
from parrot_jax.diffusion.schedule import DDIMSchedule

__all__ = [
    "CFG",
    "DDIMSchedule",
    "DenoiseFn",
    "Guidance",
    "PromptCentredGuidance",
    "Trajectory",
    "branch_contexts",
    "classifier_free_guidance",
    "ddim_step",
    "denoise_fn",
    "gaussian_log_prob",
    "guided_model_output",
    "policy_step",
    "prompt_centred_guidance",
    "rollout",
    "sample",
]
