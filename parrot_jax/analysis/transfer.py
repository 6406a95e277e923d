"""Does an update for one identifier stay with it? ``python -m parrot_jax.analysis.transfer``.

Parrot trains the groups conditioned on "<reward k>, ĉ" on ``r_k`` and expects "<reward k>" to
favour ``r_k`` afterwards (the paper's Fig. 7). That needs an update taken under identifier k
to move the images rendered under "<reward k>" more than those under "<reward j>". Where it
moves them all alike, an update for one identifier is an update for every one, and the
identifiers can only come apart as the differences accumulate. For each identifier k this tool

1. renders groups from "<reward k>, ĉ" as training does (ĉ: one sampled PEN expansion per RL
   prompt, the same for every identifier; plain CFG at ``sample.guidance_scale``),
2. takes the policy gradient of the run's trainable T2I parameters with advantage ``r_k``
   z-scored within each group (Parrot's normalised advantage without the Pareto mask, so every
   image counts) over every DDIM step,
3. takes one plain step of global L2 length ``--step_size`` along it, and
4. renders the same prompts with one fresh, shared noise under every identifier and under all
   of them together (the paper's inference text), before and after the step,

and prints the change of the mean ``r_k`` (row k) for each text the images were rendered with
(columns), ± its standard error over the paired images, then each row divided by its
diagonal. It works on any run (toy, tiny or real).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from parrot_jax import cli, policy
from parrot_jax.analysis.as_trained import define_run_flags, draw_rl_prompts
from parrot_jax.diffusion import CFG
from parrot_jax.diffusion.sampler import sample
from parrot_jax.expansion import identifier_prefix, tokenize_conditioning
from parrot_jax.models.vae import latents_to_images
from parrot_jax.precision import matmul_precision
from parrot_jax.rl.losses import rescore_log_prob
from parrot_jax.training.settings import t2i_update
from parrot_jax.weights import merged_params, split_params

PROG = "python -m parrot_jax.analysis.transfer"

# score(x_0 [B, h, w, c], column) -> rewards [B, K] of the latents rendered under column's text.
Score = Callable[[jax.Array, int], np.ndarray]


def group_zscore(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """``[B]`` -> ``[B]``: each group of ``group_size`` consecutive values centred and divided by
    its std (a group with no spread gets zeros). Raises when no group varies: no gradient."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of {group_size}")
    groups = r.reshape(-1, group_size)
    std = groups.std(axis=1, keepdims=True)
    if not np.any(std > 0):
        raise ValueError("the reward is constant within every group: no policy gradient")
    z = np.where(std > 0, (groups - groups.mean(axis=1, keepdims=True))
                 / np.where(std > 0, std, 1.0), 0.0)
    return z.reshape(-1).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("denoiser", "eta"))
def policy_gradient(denoiser: Any, trainable: Any, frozen: Any, schedule: Any, guidance: Any,
                    contexts: jax.Array, latents: jax.Array, timesteps: jax.Array,
                    advantages: jax.Array, eta: float) -> Any:
    """The gradient w.r.t. ``trainable`` of ``sum_s mean_b A_b log pi(x_{s+1} | x_s, c_b)``.

    latents: the trajectories ``[B, S + 1, h, w, c]``; timesteps ``[S]``; contexts
    ``[B, G, L, D]`` as sampled; advantages ``[B]``. The ascent direction of the expected
    advantage (REINFORCE: the ratio's gradient at ratio 1). One step's gradient at a time is
    added up in a scan, as the training step does, so memory does not grow with S.
    """
    def term(tr, s):
        x_t = jax.lax.dynamic_index_in_dim(latents, s, axis=1, keepdims=False)
        x_prev = jax.lax.dynamic_index_in_dim(latents, s + 1, axis=1, keepdims=False)
        log_prob = rescore_log_prob(denoiser, merged_params(tr, frozen), schedule, contexts,
                                    guidance, x_t, timesteps[s], x_prev, eta=eta)
        return jnp.mean(advantages * log_prob)

    def body(total, s):
        return jax.tree.map(jnp.add, total, jax.grad(term)(trainable, s)), None

    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable),
                            jnp.arange(timesteps.shape[0]))
    return total


# The VAE decode, jitted: every rendering is one batch of one shape, so it compiles once.
_decode = jax.jit(latents_to_images, static_argnums=(0, 3))


def transfer_table(denoiser: Any, trainable: Any, frozen: Any, schedule: Any, guidance: Any,
                   contexts: jax.Array, score: Score, *, num_rewards: int, group_size: int,
                   latent_shape: tuple[int, int, int], eta: float, step_size: float,
                   train_key: jax.Array, eval_key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(change [K, C], standard error [K, C])``: the change of the mean ``r_k`` over the
    images rendered under text ``c`` after one step of length ``step_size`` along ``r_k``'s
    policy gradient under text ``k``, and its standard error over those images (each image is
    rendered from the same noise before and after, so the error is that of the paired
    differences).

    contexts: ``[C, B, G, L, D]``, one guidance-branch stack per text; the first K texts are the
    identifiers' (K = ``num_rewards``), the rest are only rendered. B images are groups of
    ``group_size`` (one prompt each); ``train_key`` draws the rollouts the gradients come from,
    ``eval_key`` the noise shared by every rendering, before and after each step.
    """
    if contexts.shape[0] < num_rewards:
        raise ValueError(f"{contexts.shape[0]} texts for {num_rewards} identifiers")
    params = merged_params(trainable, frozen)

    def render(p: Any, column: int, key: jax.Array, with_log_probs: bool = False):
        return sample(denoiser, p, schedule, contexts[column], guidance, key,
                      latent_shape=latent_shape, eta=eta, with_log_probs=with_log_probs)

    columns = range(contexts.shape[0])
    before = [np.asarray(score(render(params, c, eval_key)[0], c), np.float64) for c in columns]
    table = np.zeros((num_rewards, contexts.shape[0]))
    stderr = np.zeros_like(table)
    for k in range(num_rewards):
        x_0, traj = render(params, k, train_key, with_log_probs=True)
        advantages = group_zscore(np.asarray(score(x_0, k))[:, k], group_size)
        grad = policy_gradient(denoiser, trainable, frozen, schedule, guidance, contexts[k],
                               traj.latents, traj.timesteps, jnp.asarray(advantages), eta)
        norm = float(optax.tree.norm(grad))
        if not norm > 0:
            raise ValueError(f"the policy gradient of reward {k} is {norm}: the trainable "
                             "parameters do not change its log-probabilities")
        stepped = merged_params(optax.tree.add_scale(trainable, step_size / norm, grad), frozen)
        for c in columns:
            after = np.asarray(score(render(stepped, c, eval_key)[0], c), np.float64)
            diff = after[:, k] - before[c][:, k]
            table[k, c] = float(np.mean(diff))
            stderr[k, c] = float(np.std(diff, ddof=1) / np.sqrt(diff.size))
    return table, stderr


def markdown(names: Sequence[str], columns: Sequence[str], table: np.ndarray,
             stderr: np.ndarray) -> str:
    """The changes with their standard errors, then each row divided by its diagonal (the
    step's own identifier = 1)."""
    head = ("| step for | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n")
    out = ("Change of the mean reward after one step (rows: the reward and its identifier), "
           "± its standard error over the images:\n\n")
    out += head + "".join(f"| {n} | " + " | ".join(f"{v:+.3g} ± {e:.2g}"
                                                  for v, e in zip(row, err)) + " |\n"
                          for n, row, err in zip(names, table, stderr))
    out += "\nThe same, divided by the change under the step's own identifier:\n\n" + head
    for k, (n, row) in enumerate(zip(names, table)):
        cells = (["n/a (no change under its own identifier)"] * len(row) if row[k] == 0
                 else [f"{v / row[k]:.2f}" for v in row])
        out += f"| {n} | " + " | ".join(cells) + " |\n"
    return out


def measure(workdir: str, *, trained: bool, num_prompts: int, images: int, seed: int,
            step_size: float) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Load the run of ``workdir`` and measure ``transfer_table`` on ``num_prompts`` of its RL
    prompts: ``(reward names, column texts, change [K, K + 1], standard error [K, K + 1])``."""
    if num_prompts < 1 or images < 2:
        raise policy.RunError(f"--num_prompts {num_prompts} and --num_images {images}: at "
                              "least 1 prompt and 2 images")
    if not step_size > 0:
        raise policy.RunError(f"--step_size {step_size}: must be > 0")
    _, prompts = draw_rl_prompts(policy.read_config(workdir), num_prompts, seed)
    (loaded,) = policy.load(workdir, base=not trained, trained=trained)
    try:
        with matmul_precision(loaded.config):
            return _measure_loaded(loaded, prompts, images, jax.random.key(seed), step_size)
    finally:
        loaded.models.rewards.close()


def _measure_loaded(loaded: policy.Policy, prompts: Sequence[str], images: int,
                    key: jax.Array, step_size: float
                    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``measure`` on a loaded policy (the caller sets the run's ``matmul_precision``: the text
    encoder's contexts too are computed under it, as in training)."""
    m, c = loaded.models, loaded.config
    names = list(m.rewards.names)
    expansion_key, train_key, eval_key, lora_key = jax.random.split(key, 4)
    expanded = loaded.expand(prompts, greedy=False, key=expansion_key)
    prefixes = [identifier_prefix([k]) for k in range(len(names))]
    prefixes.append(identifier_prefix(list(range(len(names)))))
    columns = [f"<reward {k + 1}>" for k in range(len(names))] + ["all"]
    null_ids = m.clip_tokenizer([""], padding="max_length",
                                max_length=m.context_length)["input_ids"]
    texts, contexts = [], []
    for prefix in prefixes:
        cond = tokenize_conditioning(m.clip_tokenizer, [prefix] * len(prompts), expanded,
                                     m.context_length)
        texts.append([t for t in cond["texts"] for _ in range(images)])
        contexts.append(policy.group_contexts(m.text_encoder, m.text_params,
                                              jnp.asarray(null_ids),
                                              jnp.asarray(cond["input_ids"]), images))
    originals = [p for p in prompts for _ in range(images)]

    def score(x_0: jax.Array, column: int) -> np.ndarray:
        pictures = _decode(m.vae, m.vae_params, x_0, m.scaling_factor)
        return loaded.score(np.asarray(pictures), originals, texts[column])

    trainable, frozen = split_params(loaded.unet_params, t2i_update(c), lora_key)
    table, stderr = transfer_table(
        m.unet, trainable, frozen, m.schedule, CFG(c.sample.guidance_scale),
        jnp.stack(contexts), score, num_rewards=len(names), group_size=images,
        latent_shape=m.latent_shape, eta=float(c.sample.eta), step_size=step_size,
        train_key=train_key, eval_key=eval_key)
    return names, columns, table, stderr


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    define_run_flags(values)
    flags.DEFINE_integer("num_images", 8, "images per group (per prompt)", flag_values=values)
    flags.DEFINE_float("step_size", 0.05, "global L2 length of the step along each policy "
                       "gradient", flag_values=values)


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    """Parse ``argv`` (without the program name), measure, print the tables."""
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    try:
        names, columns, table, stderr = measure(
            args.workdir, trained=args.trained, num_prompts=args.num_prompts,
            images=args.num_images, seed=args.seed, step_size=args.step_size)
    except (policy.RunError, ValueError) as e:
        cli.fail(PROG, str(e))
    print(f"{args.num_prompts} prompts x {args.num_images} images per text, step "
          f"{args.step_size} ({'trained' if args.trained else 'untrained'} models)\n")
    print(markdown(names, columns, table, stderr), end="")
    return table


if __name__ == "__main__":
    cli.entry_point(main)
