"""A run's policy: its models with one set of weights, and the steps from text to images.

Training, sampling, evaluation, the closing evaluation and the diagnostics all render through
this module:

- ``expand``: the PEN's expansions of user prompts (sampled with log-probs, or greedy);
- ``condition``: the texts and guidance of the paper's inference (identifiers before the
  expansion; original-prompt-centred guidance, Eq. 5) as token ids per guidance branch;
- ``rollout`` (training: CFG on "<reward k>, ĉ" for G groups of N images, keeping the
  trajectory) and ``draw`` (inference: P prompts x N images of any guidance): text encoder ->
  contexts -> the DDIM scan -> VAE decode, each one jitted program built from the same steps
  (``group_contexts`` / ``prompt_contexts``, then ``render``).

``Policy`` holds a run's models and one set of weights (the untrained ones, or a checkpoint's
T2I cross-attention and PEN LoRA merged in); ``load`` reads them from a workdir's
``config.json`` and checkpoint without building an optimizer or a training state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from parrot_jax import config as schema
from parrot_jax import parallel, storage
from parrot_jax.data.prompts import load_prompts
from parrot_jax.diffusion import CFG, PromptCentredGuidance, branch_contexts
from parrot_jax.diffusion import rollout as scan
from parrot_jax.expansion import (
    PENSample,
    SamplingConfig,
    decode,
    identifier_prefix,
    tokenize_conditioning,
    tokenize_prompts,
)
from parrot_jax.expansion import sample as pen_sample
from parrot_jax.loading import ParrotModels, load_models
from parrot_jax.models.lora import LoRA, merge
from parrot_jax.models.vae import latents_to_images
from parrot_jax.precision import matmul_precision
from parrot_jax.weights import with_trained
from parrot_jax.workdir import CHECKPOINT_DIR, CONFIG_FILE, checkpoint_manager, restore_parts

__all__ = ["Conditioning", "Policy", "RunError", "Samples", "draw", "expand_tokens", "load",
           "read_config", "rollout"]


class RunError(ValueError):
    """A workdir, checkpoint or option that cannot be used (the message says which)."""


# --- the jitted steps ------------------------------------------------------------------------

def _embed(text_encoder: Any, text_params: Any, ids: jax.Array) -> jax.Array:
    """Token ids ``[n, L]`` -> the text encoder's last hidden state ``[n, L, D]``. No attention
    mask, as SD's pipeline (padding is causal-masked away from the pooled token)."""
    return text_encoder.apply({"params": text_params}, ids)["last_hidden_state"]


def group_contexts(text_encoder: Any, text_params: Any, null_ids: jax.Array,
                   cond_ids: jax.Array, group_size: int) -> jax.Array:
    """CFG contexts ``[G*N, 2, L, D]`` (null, condition) of G groups of ``group_size`` images
    from null_ids ``[1, L]`` and cond_ids ``[G, L]``."""
    cond = jnp.repeat(_embed(text_encoder, text_params, cond_ids), group_size, axis=0)
    return branch_contexts(_embed(text_encoder, text_params, null_ids), cond)


def prompt_contexts(text_encoder: Any, text_params: Any, branch_ids: jax.Array,
                    num_images: int) -> jax.Array:
    """Contexts ``[P*num_images, G, L, D]`` from ``branch_ids [P, G, L]`` (the guidance's G
    branches per prompt, encoded as one batch)."""
    p, g, length = branch_ids.shape
    hidden = _embed(text_encoder, text_params, branch_ids.reshape(p * g, length))
    hidden = hidden.reshape(p, g, length, -1)
    return branch_contexts(*[jnp.repeat(hidden[:, i], num_images, axis=0) for i in range(g)])


def render(unet: Any, vae: Any, unet_params: Any, vae_params: Any, schedule: Any,
           guidance: Any, contexts: jax.Array, key: jax.Array, *,
           latent_shape: tuple[int, int, int], eta: float, scaling_factor: float,
           with_log_probs: bool, sharding: NamedSharding | None = None,
           chunks: int = 1) -> tuple:
    """contexts ``[B, G, L, D]`` -> (images ``[B, H, W, 3]`` in [0, 1], the DDIM trajectory).
    ``sharding`` keeps the batch placed over the mesh's batch axes; ``chunks`` runs the DDIM
    chain and the decoder on that many chunks of the batch in turn (the same images, the
    activation memory of one chunk). Traceable."""
    x_0, trajectory = scan(unet, unet_params, schedule, contexts, guidance, key,
                           latent_shape=latent_shape, eta=eta, with_log_probs=with_log_probs,
                           sharding=sharding, chunks=chunks)
    decode = lambda z: latents_to_images(vae, vae_params, z, scaling_factor)  # noqa: E731
    if chunks == 1:
        images = decode(x_0)
    else:
        images = parallel.unchunk_rows(jax.lax.map(
            lambda j: decode(parallel.chunk_rows(x_0, j, chunks)), jnp.arange(chunks)))
    if sharding is not None:
        images = jax.lax.with_sharding_constraint(images, sharding)
    return images, trajectory


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "vae", "group_size",
                                             "latent_shape", "eta", "scaling_factor",
                                             "sharding", "chunks"))
def rollout(unet: Any, text_encoder: Any, vae: Any, group_size: int,
            latent_shape: tuple[int, int, int], eta: float, scaling_factor: float,
            sharding: NamedSharding | None, unet_params: Any, text_params: Any,
            vae_params: Any, schedule: Any, guidance: Any, cond_ids: jax.Array,
            null_ids: jax.Array, key: jax.Array, chunks: int = 1) -> tuple:
    """The training rollout: cond_ids ``[G, L]``, null_ids ``[1, L]`` -> (images ``[G*N, H, W,
    3]`` in [0, 1], trajectory with log-probs, contexts ``[G*N, 2, L, D]``), N = group_size,
    rendered in ``chunks`` chunks (``render``)."""
    contexts = group_contexts(text_encoder, text_params, null_ids, cond_ids, group_size)
    if sharding is not None:
        contexts = jax.lax.with_sharding_constraint(contexts, sharding)
    images, trajectory = render(unet, vae, unet_params, vae_params, schedule, guidance,
                                contexts, key, latent_shape=latent_shape, eta=eta,
                                scaling_factor=scaling_factor, with_log_probs=True,
                                sharding=sharding, chunks=chunks)
    return images, trajectory, contexts


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "vae", "num_images",
                                             "latent_shape", "eta", "scaling_factor"))
def draw(unet: Any, text_encoder: Any, vae: Any, num_images: int,
         latent_shape: tuple[int, int, int], eta: float, scaling_factor: float,
         unet_params: Any, text_params: Any, vae_params: Any, schedule: Any, guidance: Any,
         branch_ids: jax.Array, key: jax.Array) -> jax.Array:
    """Inference: branch_ids ``[P, G, L]`` -> images ``[P*num_images, H, W, 3]`` in [0, 1]
    (no log-probs)."""
    contexts = prompt_contexts(text_encoder, text_params, branch_ids, num_images)
    images, _ = render(unet, vae, unet_params, vae_params, schedule, guidance, contexts, key,
                       latent_shape=latent_shape, eta=eta, scaling_factor=scaling_factor,
                       with_log_probs=False)
    return images


@functools.partial(jax.jit, static_argnames=("module", "config"))
def expand_tokens(module: Any, config: SamplingConfig, params: Any, lora: LoRA, ids: jax.Array,
                  mask: jax.Array, key: jax.Array) -> PENSample:
    """PEN expansions of templated prompts ``ids [G, S]`` under a LoRA (merged inside the
    program): ``PENSample`` fields ``[G, max_new_tokens]``, with log-probs."""
    return pen_sample(module, merge(params, lora), ids, mask, key, config)


# --- a run's policy --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on for P prompts: token ids ``[P, G, L]`` per guidance
    branch (null first), the guidance rule, and the texts (for records)."""

    branch_ids: np.ndarray
    guidance: Any
    expansions: list[str]  # [P] the PEN's expansions ('' without expansion)
    texts: list[str]  # [P] the conditioning text of the last branch


@dataclasses.dataclass
class Samples:
    """``Policy.sample``'s output for P prompts x N images (rows prompt-major)."""

    images: np.ndarray  # [P*N, H, W, 3] float32 in [0, 1]
    expansions: list[str]  # [P] the PEN's expansions ('' without expansion)
    conditions: list[str]  # [P] the conditioning texts the UNet saw


def _as_trained(method: Any) -> Any:
    """A policy method that compiles and runs as training did: under its run's
    ``config.matmul_precision`` (on a GPU or TPU the default would use reduced-precision float32
    matmuls and disagree with training) and traced on its mesh (``parallel.traced_on``: the
    attention kernels split the batch over it)."""

    @functools.wraps(method)
    def wrapped(self: Policy, *args: Any, **kwargs: Any) -> Any:
        with matmul_precision(self.config), parallel.traced_on(self.mesh):
            return method(self, *args, **kwargs)

    return wrapped


@dataclasses.dataclass
class Policy:
    """A run's models with one set of weights: a checkpoint's, or the untrained ones."""

    config: ml_collections.ConfigDict
    models: ParrotModels
    mesh: Mesh
    unet_params: Any  # full UNet parameters (trained cross-attention merged in)
    pen_params: Any  # PEN parameters with the trained LoRA merged in
    step: int | None  # the checkpoint's iteration; None for the untrained models

    @property
    def label(self) -> str:
        return "base" if self.step is None else f"step_{self.step}"

    def pen_sampling(self, greedy: bool) -> SamplingConfig:
        p = self.config.pen
        return SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p, greedy=greedy)

    @_as_trained
    def expand(self, prompts: Sequence[str], *, greedy: bool = True,
               key: jax.Array | None = None) -> list[str]:
        """The PEN's expansions of ``prompts`` (greedy, or sampled as the run's ``pen`` config
        says with ``key``)."""
        m, length = self.models, self.config.data.max_prompt_length
        try:
            ids, mask = tokenize_prompts(m.pen_tokenizer, prompts, length)
        except ValueError as e:
            raise RunError(f"PEN input (config.data.max_prompt_length={length}): {e}") from e
        out = pen_sample(m.pen, self.pen_params, ids, mask,
                         jax.random.key(0) if key is None else key, self.pen_sampling(greedy))
        return decode(m.pen_tokenizer, out.tokens, out.mask)

    def clip_ids(self, texts: Sequence[str], what: str) -> np.ndarray:
        """int32 ``[len(texts), L]`` padded to the context; a text that does not fit is an
        error (nothing is cut silently)."""
        m = self.models
        length = m.context_length
        enc = m.clip_tokenizer(list(texts), padding="max_length", max_length=length)
        for i, ids in enumerate(enc["input_ids"]):
            if len(ids) > length:
                raise RunError(f"{what} {i} ({texts[i]!r}) takes {len(ids)} tokens; the text "
                               f"encoder's context is {length}")
        return np.asarray(enc["input_ids"], np.int32)

    def condition(self, prompts: Sequence[str], *, identifiers: Sequence[int], w1: float,
                  w2: float, expand_prompt: bool = True, greedy: bool = True,
                  key: jax.Array | None = None) -> Conditioning:
        """The paper's inference conditioning of ``prompts``: the PEN's expansion ĉ with the
        ``identifiers`` (0-based reward columns) before it, and Eq. 5's guidance with the null
        prompt, the original prompt (weight ``w1``) and the identified expansion (``w2``).
        ``w1 = 0`` is CFG on the identified expansion (one UNet branch fewer);
        ``expand_prompt=False`` is plain CFG (weight ``w1``) on the prompt alone."""
        null = self.clip_ids([""], "null prompt")[0]
        original = self.clip_ids(prompts, "prompt")
        nulls = np.broadcast_to(null, original.shape)
        if not expand_prompt:
            return Conditioning(np.stack([nulls, original], axis=1), CFG(w1),
                                [""] * len(prompts), list(prompts))
        expansions = self.expand(prompts, greedy=greedy, key=key)
        try:
            cond = tokenize_conditioning(self.models.clip_tokenizer,
                                         [identifier_prefix(identifiers)] * len(prompts),
                                         expansions, self.models.context_length)
        except ValueError as e:  # the identifiers alone do not fit the context
            raise RunError(f"--identifiers: {e}") from e
        if w1 == 0:
            return Conditioning(np.stack([nulls, cond["input_ids"]], axis=1), CFG(w2),
                                expansions, cond["texts"])
        return Conditioning(np.stack([nulls, original, cond["input_ids"]], axis=1),
                            PromptCentredGuidance(w1, w2), expansions, cond["texts"])

    @_as_trained
    def draw(self, conditioning: Conditioning, num_images: int, key: jax.Array) -> np.ndarray:
        """Images ``[P*num_images, H, W, 3]`` float32 in [0, 1] (rows prompt-major)."""
        if num_images <= 0:
            raise RunError(f"--num_images {num_images}: must be positive")
        m = self.models
        images = draw(m.unet, m.text_encoder, m.vae, num_images, m.latent_shape,
                      float(self.config.sample.eta), m.scaling_factor, self.unet_params,
                      m.text_params, m.vae_params, m.schedule, conditioning.guidance,
                      conditioning.branch_ids, key)
        return np.asarray(images, np.float32)

    @_as_trained
    def sample(self, prompts: Sequence[str], *, identifiers: Sequence[int], w1: float,
               w2: float, expand_prompt: bool = True, greedy: bool = True, num_images: int = 4,
               seed: int = 0) -> Samples:
        """``num_images`` images of each of ``prompts``, conditioned as ``condition`` says;
        ``seed`` fixes the PEN's draws (if not greedy) and every diffusion noise."""
        if num_images <= 0:
            raise RunError(f"--num_images {num_images}: must be positive")
        key_pen, key_images = jax.random.split(jax.random.key(seed))
        c = self.condition(prompts, identifiers=identifiers, w1=w1, w2=w2,
                           expand_prompt=expand_prompt, greedy=greedy, key=key_pen)
        return Samples(self.draw(c, num_images, key_images), c.expansions, c.texts)

    @_as_trained
    def score(self, images: Any, prompts: Sequence[str],
              conditions: Sequence[str]) -> np.ndarray:
        """The run's rewards ``[n, K]`` of images ``[n, H, W, 3]`` in [0, 1], each with its
        original prompt and conditioning text; the batch is padded to a multiple of the
        devices (the padding rows are dropped)."""
        rewards, n = self.models.rewards, len(images)
        prompts, conditions = list(prompts), list(conditions)
        pad = -n % self.mesh.size
        if pad:
            images = np.concatenate([np.asarray(images),
                                     np.repeat(np.asarray(images[-1:]), pad, axis=0)])
            prompts = prompts + prompts[-1:] * pad
            conditions = conditions + conditions[-1:] * pad
        r = rewards(rewards.inputs(images, prompts=prompts, conditions=conditions))
        return np.asarray(r)[:n]


# --- reading a workdir -----------------------------------------------------------------------

def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run's ``workdir/config.json`` as a checked config of today's schema (errors name
    the path)."""
    try:
        workdir = storage.path(workdir)
    except storage.StorageError as e:
        raise RunError(f"--workdir {e}") from None
    if not workdir.is_dir():
        raise RunError(f"--workdir {workdir}: no such directory")
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{path}: missing; {workdir} is not a Parrot training workdir")
    try:
        return schema.upgrade(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: unreadable JSON ({e})") from e
    except schema.ConfigError as e:
        raise RunError(f"{path}: {e}") from e


def load(workdir: str | os.PathLike, *, step: int | None = None, base: bool = False,
         trained: bool = True) -> list[Policy]:
    """The run of ``workdir``: the checkpoint's weights (``step``, default the latest) when
    ``trained``, then the untrained ones when ``base``; both share one set of loaded models.
    Reads ``config.json``, the models it names and, for the trained policy, only the
    checkpoint's trained T2I weights and PEN LoRA (no optimizer, no training state)."""
    config = read_config(workdir)  # first: a workdir it cannot reach is a RunError
    workdir = storage.path(workdir)
    chosen = None
    if trained:
        manager = checkpoint_manager(workdir, read_only=True)
        steps = sorted(manager.all_steps())
        manager.close()
        if not steps:
            raise RunError(f"{workdir / CHECKPOINT_DIR}: no checkpoint (train first, or pass "
                           "--base alone for the untrained models)")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise RunError(f"--step {step}: no such checkpoint in {workdir}; saved steps are "
                           f"{steps}")
    mesh = parallel.make_mesh(dict(config.mesh))
    tiny = "tiny" in (config.model.pretrained, config.model.pen)
    # The tiny tokenizers are saved in the workdir; the prompts rebuild them if they are not.
    models = load_models(config, workdir, mesh, load_prompts(config.data.prompts) if tiny else [])
    models.place(parallel.replicated(mesh))
    out = []
    if chosen is not None:
        parts = jax.tree.map(jnp.asarray, restore_parts(workdir, chosen,
                                                        ("t2i/trainable", "pen/lora")))
        lora = LoRA(parts["pen"]["lora"]["factors"], float(config.pen.lora_alpha))
        out.append(Policy(config, models, mesh,
                          with_trained(models.unet_params, parts["t2i"]["trainable"]),
                          merge(models.pen_params, lora), chosen))
    if base:
        out.append(Policy(config, models, mesh, models.unet_params, models.pen_params, None))
    return out
