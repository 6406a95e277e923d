"""The Parrot training loop: the paper's Algorithm 1, resumable and logged.

One iteration over G groups x N images (``parrot_iteration``):

1. draw G prompts c_g (deterministic in the seed and the data position, so a resume is exact);
   with ``pen.expansions_per_prompt = E`` only G / E are drawn, each filling E groups;
2. the PEN samples one expansion ĉ_g per group, recording its log-probs;
3. each group gets a reward identifier k_g (one per prompt) and the text
   ``"<reward k_g>, " + ĉ_g``, fitted to the CLIP context (the expansion is cut, never the
   identifier);
4. N images per group are rolled out (CFG against the null prompt, DDIM, eta 1) by the jitted
   scan sampler, keeping the latent chain and log-probs (``policy.rollout``);
5. the VAE decodes them to images in [0, 1]; the ``RewardSet`` scores all K rewards at once ->
   R ``[G*N, K]``;
6. non-dominated masks and advantages as ``config.advantage`` says (``rl.compute_advantages``);
7. the T2I update: ``num_minibatches`` optimiser steps of the DDPO clipped objective over a
   random split of the batch, gradients accumulated over timesteps inside each jitted step;
8. the PEN update: REINFORCE on its LoRA with each group's advantage: the mean, over the group's
   selected (non-dominated, valid) images, of the reward the group maximised (r_{k_g}; the
   scalarised reward for 'weighted_sum' / 'single'). This is Algorithm 1's
   ``∇J_φ += -r_k ∇log p_φ(ĉ|c)`` summed over P, divided by |P| so that groups with large fronts
   do not dominate; ``pen.advantage='normalized'`` z-scores each reward over the batch first.

Everything after the prompts' text handling runs on device, with the batch sharded over
``('data', 'fsdp')``. Each iteration fetches only its guarded scalars (losses, gradient norms,
invalid-reward counts: ``metrics.check_iteration``), before anything of it is written; the rest
is fetched at log steps and at checkpoints (``metrics.jsonl`` and TensorBoard scalars). Every
``eval_every`` iterations ``visualize.write_pictures`` saves an image grid and the batch's reward
scatter. On several hosts every process draws the same G prompts and runs the (small,
replicated) PEN and tokenisation identically; the image batch is split across hosts. The whole
state is checkpointed with orbax (``training.state``), only when every value in it is finite;
SIGTERM saves and returns. A resume restores the latest checkpoint that reads back (skipping a
damaged one, ``workdir.restore_latest``) and cuts the logs back to it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding

from parrot_jax import config as schema
from parrot_jax import parallel, policy, storage
from parrot_jax.data.promptist import DatasetError
from parrot_jax.data.prompts import draw_prompts, load_prompts
from parrot_jax.expansion import (
    assign_identifiers,
    decode,
    identifier_prefix,
    pen_rl_step,
    tokenize_conditioning,
    tokenize_prompts,
)
from parrot_jax.loading import TOKENIZER_DIR, frozen_dtype, load_models, store_as
from parrot_jax.precision import matmul_precision
from parrot_jax.rl import AdvantageConfig, compute_advantages, group_advantages
from parrot_jax.rl.pareto import front_hypervolume
from parrot_jax.training import visualize
from parrot_jax.training.metrics import (
    INVALID,
    MetricsWriter,
    check_iteration,
    host,
    truncate_metrics,
)
from parrot_jax.training.preemption import Preemption
from parrot_jax.training.settings import Settings, check_prompt_files
from parrot_jax.training.state import (
    Run,
    compile_ahead,
    initial_state,
    train_step_for,
    untrained_params,
)
from parrot_jax.training.step import T2IBatch, T2ITrainState, batch_shardings, minibatch
from parrot_jax.training.tensorboard import (
    TENSORBOARD_DIR,
    TensorBoardWriter,
    truncate_events,
)
from parrot_jax.workdir import (
    check_workdir,
    checkpoint_manager,
    config_dict,
    nonfinite_parts,
    restore_latest,
    save,
    write_config,
)

PROGRESS_WIDTH = 20  # characters of the progress bar in each logged line


def group_prompts(prompts: Sequence[str], settings: Settings, position: int, step: int,
                  num_rewards: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_ids [G], identifiers [G])`` of one iteration: ``G / E`` prompts drawn at
    ``position`` (``draw_prompts``), each given to ``E = pen.expansions_per_prompt``
    consecutive groups that share its identifier, so that the PEN's baseline over a prompt's
    expansions compares texts scored by the same reward."""
    e = settings.expansions_per_prompt
    n = settings.sizes.groups // e
    ids = draw_prompts(prompts, settings.seed, position, n)
    k = assign_identifiers(n, num_rewards, settings.identifiers, start=step * n, key=key)
    return np.repeat(ids, e), np.repeat(k, e)


@functools.partial(jax.jit, static_argnames=("config", "group_size", "names", "replicated",
                                             "pen_mode"))
def _advantages(config: AdvantageConfig, group_size: int, names: tuple[str, ...],
                replicated: NamedSharding, pen_mode: str, rewards: jax.Array,
                reward_ids: jax.Array, tracker: Any, prompt_ids: jax.Array):
    """-> (Advantages, tracker, PEN advantage per group ``[G]``, reward / selection metrics).
    The tracker stays replicated (a stable sharding: the next call reuses this compilation)."""
    adv, tracker = compute_advantages(rewards, reward_ids, config, group_size=group_size,
                                      tracker=tracker, prompt_ids=prompt_ids)
    tracker = jax.lax.with_sharding_constraint(tracker, replicated)
    pen_adv = group_advantages(rewards, reward_ids, adv.selected, config,
                               group_size=group_size, mode=pen_mode)
    ok = adv.valid[:, None]
    count = jnp.maximum(jnp.sum(adv.valid), 1)
    mean = jnp.sum(jnp.where(ok, rewards, 0.0), axis=0) / count
    std = jnp.sqrt(jnp.sum(jnp.where(ok, (rewards - mean) ** 2, 0.0), axis=0) / count)
    bad = jnp.sum(~jnp.isfinite(rewards), axis=0).astype(jnp.float32)  # [K]
    metrics = {"pareto/selected_fraction": jnp.mean(adv.selected.astype(jnp.float32)),
               INVALID: jnp.sum(~adv.valid).astype(jnp.float32),
               "advantage/mean_abs": jnp.mean(jnp.abs(adv.advantages))}
    for i, name in enumerate(names):
        metrics[f"reward/{name}/mean"] = mean[i]
        metrics[f"reward/{name}/std"] = std[i]
        metrics[f"reward/{name}/invalid_count"] = bad[i]
    return adv, tracker, pen_adv, metrics


def parrot_iteration(run: Run, state: dict, mark: Callable[..., None] | None = None
                     ) -> tuple[dict, dict[str, jax.Array], jax.Array, jax.Array]:
    """One Parrot iteration (module docstring) -> (new state, device metrics, rewards
    ``[B, K]``, selection mask ``[B]``: the samples the T2I update used). ``mark(phase,
    *outputs)`` is called at the end of each phase (benchmarks time them)."""
    s, m, sizes = run.settings, run.models, run.settings.sizes
    mark = mark or (lambda name, *outputs: None)
    key, k_pen, k_id, k_roll, k_train, k_perm = jax.random.split(
        jax.random.wrap_key_data(state["key"]), 6)
    position, step = int(state["data_position"]), int(state["step"])

    # 1. prompts c_g (and 3.'s identifiers k_g: a prompt expanded E times keeps one k)
    prompt_ids, k_g = group_prompts(run.prompts, s, position, step, len(m.rewards.names), k_id)
    prompts = [run.prompts[i] for i in prompt_ids]
    per_image = lambda xs: [x for x in xs for _ in range(sizes.group_size)]  # noqa: E731
    # 2. expansions ĉ_g ~ p_φ(ĉ | c_g)
    ids, mask = tokenize_prompts(m.pen_tokenizer, prompts, s.max_prompt_length)
    expansion = policy.expand_tokens(m.pen, s.pen_sampling, m.pen_params, state["pen"]["lora"],
                                     ids, mask, k_pen)
    expanded = decode(m.pen_tokenizer, expansion.tokens, expansion.mask)
    mark("pen_expand", expansion)
    # 3. the conditioning text "<reward k_g>, " + ĉ_g
    cond = tokenize_conditioning(m.clip_tokenizer, [identifier_prefix([k]) for k in k_g],
                                 expanded, m.context_length)
    # 4.-5. rollouts of N images per group, decoded to [0, 1], and every reward
    images, traj, contexts = run.rollout(state, cond["input_ids"], k_roll)
    mark("rollout_and_decode", images, traj, contexts)
    rewards = m.rewards.submit(m.rewards.inputs(images, prompts=per_image(prompts),
                                                conditions=per_image(cond["texts"]))).result()
    mark("rewards", rewards)
    # 6. Pareto selection and advantages
    adv, tracker, pen_adv, metrics = _advantages(
        s.advantage, sizes.group_size, m.rewards.names, parallel.replicated(run.mesh),
        s.pen_advantage, rewards, np.repeat(k_g, sizes.group_size).astype(np.int32),
        state["tracker"], np.repeat(prompt_ids, sizes.group_size).astype(np.int32))
    mark("advantages", adv, metrics)
    new = {**state, "tracker": tracker, "key": jax.random.key_data(key),
           "step": state["step"] + 1, "data_position": state["data_position"] + 1}
    # 7. T2I update: num_minibatches optimiser steps over a random split of the batch
    if s.t2i_train:
        batch = T2IBatch(traj.latents, traj.log_probs, traj.timesteps, contexts, adv.advantages,
                         adv.selected)
        t2i = T2ITrainState(step=state["t2i"]["step"], trainable=state["t2i"]["trainable"],
                            frozen=run.frozen, opt_state=state["t2i"]["opt_state"])
        order = np.asarray(jax.random.permutation(k_perm, sizes.batch))
        shardings = batch_shardings(run.mesh)
        parts = [(minibatch(shardings, batch, order[i * sizes.minibatch:][:sizes.minibatch]),
                  jax.random.fold_in(k_train, i)) for i in range(sizes.minibatches)]
        if run.rescore is not None:  # every minibatch scored by the sampling policy, first
            rescored = [run.rescore(t2i.trainable, t2i.frozen, mb, k) for mb, k in parts]
            metrics["t2i/rescore_shift"] = jnp.max(jnp.stack(
                [jnp.max(jnp.abs(lp - mb.log_probs)) for lp, (mb, _) in zip(rescored, parts)]))
            parts = [(mb.replace(log_probs=lp), k) for lp, (mb, k) in zip(rescored, parts)]
        steps = []
        for mb, k in parts:
            t2i, out = run.train_step(t2i, mb, k)
            steps.append(out)
        run.frozen = t2i.frozen  # the step donates the whole state; frozen comes back as is
        new["t2i"] = {"step": t2i.step, "trainable": t2i.trainable, "opt_state": t2i.opt_state}
        for name in ("loss", "approx_kl", "clipfrac", "grad_norm"):
            metrics[f"t2i/{name}"] = jnp.mean(jnp.stack([o[name] for o in steps]))
        # The first minibatch is scored by the policy that sampled it, so its ratios differ from
        # 1 only by numerics (docs/method.md, numerics).
        metrics["t2i/ratio_first"] = steps[0]["ratio"]
        metrics["t2i/clipfrac_first"] = steps[0]["clipfrac"]
        metrics["t2i/approx_kl_first"] = steps[0]["approx_kl"]
        mark("t2i_update", t2i)
    # 8. PEN update: REINFORCE with each group's mean selected reward
    if s.pen_train:
        lora, opt_state, out = pen_rl_step(
            state["pen"]["lora"], state["pen"]["opt_state"], m.pen_params, m.pen, s.pen_rl, ids,
            mask, expansion.tokens, expansion.mask, pen_adv)
        new["pen"] = {"lora": lora, "opt_state": opt_state}
        for name in ("loss", "log_prob", "grad_norm", "advantage"):
            metrics[f"pen/{name}"] = out[name]
        mark("pen_update", lora)
    return new, metrics, rewards, adv.selected


def setup(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> tuple[Run, dict]:
    """Check the config and the workdir, load prompts and models, build the initial state."""
    schema.check(config)
    mesh = parallel.make_mesh(dict(config.mesh))
    logging.info("process %d of %d; %d devices (%s); mesh %s", jax.process_index(),
                 jax.process_count(), mesh.size, jax.devices()[0].platform, dict(mesh.shape))
    check_workdir(config, workdir)
    logging.info("Loading prompts (%s)", config.data.prompts)
    prompts = load_prompts(config.data.prompts)  # with each prompt's file:line
    logging.info("Loading models (T2I %s, PEN %s, rewards %s)", config.model.pretrained,
                 config.model.pen, config.model.rewards)
    tokenizers = storage.path(workdir) / TOKENIZER_DIR
    new_tokenizers = not tokenizers.exists()
    models = load_models(config, workdir, mesh, prompts)
    settings = Settings.of(config, mesh.size, len(models.rewards.names))
    try:  # every prompt list, whole, before any iteration: not at the draw that meets it
        check_prompt_files(config, prompts, models)
    except DatasetError:
        # The tiny tokenizers load_models just built from these prompts go too: a failed
        # start leaves the workdir as it was, so the corrected rerun builds its own.
        if new_tokenizers and jax.process_index() == 0:
            storage.remove_tree(tokenizers)
        raise
    logging.info("Sizes: %s; %d DDIM steps; %d iterations", settings.sizes.describe(),
                 config.sample.num_steps, config.num_iterations)
    models.place(parallel.replicated(mesh), frozen_dtype(config))
    state, frozen = initial_state(settings, models, mesh, config.model.pen)
    frozen = store_as(frozen, frozen_dtype(config))
    # The untrained UNet (the base policy) from here on shares the stored frozen weights: a
    # float32 copy of the whole UNet would stay on every device for nothing.
    models.unet_params = untrained_params(models.unet_params, frozen, settings.t2i)
    train_step, rescore = train_step_for(models, settings, mesh, state, frozen,
                                         config_dict(config.sample), config.model.pretrained)
    null = models.clip_tokenizer([""], padding="max_length", max_length=models.context_length)
    run = Run(config, settings, models, mesh, prompts, frozen, train_step, rescore,
              np.asarray(null["input_ids"], np.int32))
    write_config(config, workdir)
    return run, state


def _progress(step: int, total: int, eta: float, record: dict[str, float]) -> None:
    done = round(PROGRESS_WIDTH * step / total)
    logging.info("[%s] iteration %d/%d, ETA %.0f s: %s", "#" * done + "." * (PROGRESS_WIDTH - done),
                 step, total, eta, ", ".join(
                     f"{k} {v:.4g}" for k, v in record.items()
                     if k.startswith(("reward/", "t2i/loss", "pen/loss", "perf/samples"))
                     and not k.endswith(("/std", "/invalid_count"))
                     or k == INVALID and v > 0))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | epath.Path) -> dict[str, Any]:
    """Run (or resume) Parrot training as ``config`` says, writing ``config.json``,
    ``metrics.jsonl`` and orbax checkpoints to the workdir; with ``final_eval.prompts`` set,
    end with the base-vs-trained comparison (``final_eval.json``). Returns the last logged
    record with ``step`` and ``preempted`` (True when SIGTERM stopped the run). A config the
    schema refuses raises before anything is written; everything runs under
    ``config.matmul_precision``."""
    schema.check(config)
    with matmul_precision(config):
        return _train_and_evaluate(config, storage.path(workdir))


def _train_and_evaluate(config: ml_collections.ConfigDict,
                        workdir: epath.Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    run, state = setup(config, workdir)
    with parallel.traced_on(run.mesh):
        return _train(run, state, workdir)


def _saved(step: int | None) -> str:
    return ("no checkpoint has been saved" if step is None
            else f"the last checkpoint, iteration {step}, holds finite weights")


def _cut_logs(workdir: epath.Path, step: int) -> None:
    """Process 0 cuts ``metrics.jsonl`` and the TensorBoard events back to ``step``: the
    iterations logged after the restored checkpoint run again and log themselves again."""
    if jax.process_index() != 0:
        return
    dropped = (truncate_metrics(workdir, step), truncate_events(workdir / TENSORBOARD_DIR, step))
    if any(dropped):
        logging.info("Dropped %d metrics.jsonl records and %d TensorBoard events after iteration "
                     "%d (logged after the checkpoint this run resumes from)", *dropped, step)


def _train(run: Run, state: dict, workdir: epath.Path) -> dict[str, Any]:
    s = run.settings
    reference = None if s.hypervolume_reference is None else np.asarray(s.hypervolume_reference)
    manager = checkpoint_manager(workdir, s.max_to_keep)
    state, restored = restore_latest(manager, state)
    if restored is not None:
        logging.info("Resuming from the checkpoint at iteration %d", restored)
    step = int(state["step"])
    _cut_logs(workdir, step)
    saved = restored  # the last checkpoint written or restored
    tensorboard = (TensorBoardWriter(workdir / TENSORBOARD_DIR) if jax.process_index() == 0
                   else None)
    writer = MetricsWriter(workdir, tensorboard)
    result: dict[str, Any] = {"step": step, "preempted": False}
    logging.info("Compiling and training: iterations %d to %d", step, s.num_iterations)
    if s.t2i_train and step < s.num_iterations:
        compile_ahead(run, state)
    timer = None  # (start time, iterations) after the first (compiling) iteration
    try:
        with Preemption() as preemption:
            while step < s.num_iterations:
                started = time.perf_counter()
                state, metrics, rewards, selected = parrot_iteration(run, state)
                step += 1
                try:  # every iteration, before anything of it is written
                    check_iteration(step, metrics, run.models.rewards.names)
                except FloatingPointError as e:
                    raise FloatingPointError(f"{e}; stopping before anything of iteration {step} "
                                             f"is written ({_saved(saved)})") from None
                writer.add(step, metrics)
                if timer is None:
                    jax.block_until_ready(state["step"])
                    timer = (time.perf_counter(), 0)
                    logging.info("iteration %d (with compilation): %.1f s", step,
                                 time.perf_counter() - started)
                else:
                    timer = (timer[0], timer[1] + 1)
                stop = preemption.requested or manager.reached_preemption(step)
                checkpoint = step % s.checkpoint_every == 0 or step == s.num_iterations or stop
                bad = nonfinite_parts(state) if checkpoint else []
                if bad:
                    raise FloatingPointError(
                        f"iteration {step}: non-finite values in the state's {', '.join(bad)}; "
                        f"stopping before anything of iteration {step} is written "
                        f"({_saved(saved)})")
                # A record at every checkpoint too (written before it: a kill in between loses
                # nothing), so that a resume loses no iteration's metrics and logs none twice.
                if step % s.log_every == 0 or checkpoint:
                    extra = {"pareto/hypervolume": front_hypervolume(host(rewards), reference)}
                    seconds = (time.perf_counter() - timer[0]) / max(timer[1], 1)
                    if timer[1]:
                        extra["perf/samples_per_sec"] = s.sizes.batch / seconds
                        extra["perf/iteration_seconds"] = seconds
                    record = writer.flush(extra)
                    result.update(record)
                    _progress(step, s.num_iterations,
                              (s.num_iterations - step) * seconds if timer[1] else math.nan,
                              record)
                if step % s.eval_every == 0:
                    visualize.write_pictures(run, state, step, rewards, selected, workdir,
                                             tensorboard)
                if checkpoint:
                    save(manager, step, state, checked=True)  # checked above
                    saved = step
                if stop:
                    result["preempted"] = True
                    logging.warning("stopped at iteration %d after a preemption signal; the "
                                    "checkpoint is saved", step)
                    break
        manager.wait_until_finished()
        result["step"] = step
        if s.final_eval is not None and not result["preempted"]:
            from parrot_jax.training.final_eval import final_evaluation, table

            record = final_evaluation(s.final_eval, run.policy(state, base=True),
                                      run.policy(state, step), workdir)
            result["final_eval"] = record
            logging.info("Final evaluation, %d held-out prompts (%s):\n%s",
                         record["details"]["num_prompts"], s.final_eval.prompts, table(record))
    finally:  # also on a NaN stop: close what holds threads and files
        manager.close()
        run.models.rewards.close()
        if tensorboard is not None:
            tensorboard.close()
    return result
