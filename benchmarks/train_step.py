"""Benchmark the jitted T2I update (``parrot_jax.training.step``) per sample x timestep.

For each UNet config ("tiny", "medium": the configs of ``benchmarks/unet.py``) with the same
random weights on both sides, a batch of ``--batch`` trajectories of ``--steps`` DDIM steps (CFG
5, eta 1), cross-attention-only training, AdamW:

* ``step``: our jitted ``train_step``: per-sample shuffled timesteps, a ``lax.scan`` of S guided
  UNet forward+backward passes (``--remat`` policy, default the config's; ``--unroll`` timesteps
  per loop iteration, S = no loop), one AdamW update;
* ``grad``: our jitted gradient of one timestep's DDPO loss (same guided UNet), times S: the UNet
  work the step is made of, so ``scan overhead = step / (S * grad) - 1``;
* ``torch``: the same work in PyTorch as ddpo-pytorch does it: per timestep one diffusers UNet
  forward on the CFG batch of 2B, the guided output, a loss, ``backward()`` into the attn2
  weights only, then one ``torch.optim.AdamW`` step; ``torch/ours`` above 1 means ours is faster.

Reported: ms per sample x timestep for each, the ratios, and compile seconds. Medians over
``--iters`` after ``--warmup``. On a busy 2-core machine use ``--threads 1`` (torch's OpenMP
workers busy-wait; see ``benchmarks/unet.py`` for the allocator setting that also matters).

Run (from the repository root)::

    python benchmarks/train_step.py --configs tiny,medium [--batch 2] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Sequence

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import (
    add_common_args,
    check_common_args,
    compile_timed,
    environment_lines,
    median_ms,
    pin_threads,
)
from sampler import SD15_SCHEDULER
from unet import CONFIG_NAMES, make_case

from parrot_jax import hub
from parrot_jax.diffusion import CFG, DDIMSchedule, branch_contexts, sample
from parrot_jax.rl.losses import ddpo_timestep_loss
from parrot_jax.training.step import (
    T2IBatch,
    T2IUpdateConfig,
    init_train_state,
    merged_params,
    train_step,
)


def run_case(name: str, args: argparse.Namespace) -> dict[str, float]:
    case = make_case(name)
    torch.manual_seed(0)
    torch_model = diffusers.UNet2DConditionModel(**case.unet_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        module, params = hub.load_unet(tmp)
    b, s = args.batch, args.steps
    schedule = DDIMSchedule.from_config(SD15_SCHEDULER, s)
    dim = case.unet_kwargs["cross_attention_dim"]
    k1, k2 = jax.random.split(jax.random.key(0))
    contexts = branch_contexts(jax.random.normal(k1, (case.text_len, dim)),
                               jax.random.normal(k2, (b, case.text_len, dim)))
    latent = (case.size, case.size, case.unet_kwargs["in_channels"])
    _, traj = sample(module, params, schedule, contexts, CFG(5.0), jax.random.key(1),
                     latent_shape=latent)
    adv = jnp.linspace(-1.0, 1.0, b)
    batch = T2IBatch(traj.latents, traj.log_probs, traj.timesteps, contexts, adv, adv != 0)
    config = T2IUpdateConfig(remat_policy=None if args.remat == "none" else args.remat,
                             scan_unroll=args.unroll)
    state = init_train_state(params, config)

    step_fn = functools.partial(train_step, module, schedule, CFG(5.0), config)
    start = time.perf_counter()  # donated state, as make_train_step does: no copy of the UNet
    step_c = jax.jit(step_fn, donate_argnums=0).lower(state, batch, jax.random.key(2)).compile()
    step_compile = time.perf_counter() - start
    holder = [init_train_state(params, config)]

    def run_step() -> None:
        holder[0], metrics = step_c(holder[0], batch, jax.random.key(2))
        jax.block_until_ready(metrics)

    step_ms = median_ms(run_step, args.iters, args.warmup)

    denoiser = module.clone(remat_policy=config.remat_policy)

    def grad_fn(trainable, frozen, x_t, t, x_prev, old):  # weights as arguments, as in the step
        def loss(tr):
            return ddpo_timestep_loss(denoiser, merged_params(tr, frozen), schedule,
                                      contexts, CFG(5.0), x_t, t, x_prev, old, adv, eta=1.0,
                                      clip_range=config.clip_range, adv_clip=None)[0]
        return jax.grad(loss)(trainable)

    g_args = (state.trainable, state.frozen, traj.latents[:, 0], traj.timesteps[0],
              traj.latents[:, 1], traj.log_probs[:, 0])
    grad_c, grad_compile = compile_timed(grad_fn, *g_args)
    grad_ms = median_ms(lambda: jax.block_until_ready(grad_c(*g_args)), args.iters, args.warmup)

    torch_ms = bench_torch(torch_model, np.asarray(traj.latents), np.asarray(traj.timesteps),
                           np.asarray(contexts), np.asarray(adv), args)
    per = b * s
    return dict(step=step_ms / per, grad=grad_ms / b, torch=torch_ms / per,
                overhead=step_ms / (s * grad_ms) - 1.0, ratio=torch_ms / step_ms,
                compile_step=step_compile, compile_grad=grad_compile)


def bench_torch(model: torch.nn.Module, latents: np.ndarray, timesteps: np.ndarray,
                contexts: np.ndarray, adv: np.ndarray, args: argparse.Namespace) -> float:
    """One ddpo-pytorch-style update: S guided forward+backward passes, one AdamW step (ms)."""
    for name, p in model.named_parameters():
        p.requires_grad_("attn2" in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 1, 4, 2, 3)))
    ctx = torch.from_numpy(contexts)  # [B, 2, L, D]: null, prompt
    ctx = torch.cat([ctx[:, 0], ctx[:, 1]])
    a = torch.from_numpy(adv)
    b, s = latents.shape[:2][0], timesteps.shape[0]

    def update() -> None:
        optimizer.zero_grad(set_to_none=True)
        for j in range(s):
            xt = x[:, j]
            t = torch.full((2 * b,), int(timesteps[j]))
            out = model(torch.cat([xt, xt]), t, ctx, return_dict=False)[0]
            null, cond = out.chunk(2)
            guided = null + 5.0 * (cond - null)
            # a Gaussian log-density of the stored next latent around the guided mean stands in
            # for the DDIM step (elementwise work, negligible next to the UNet)
            log_prob = -((x[:, j + 1] - guided) ** 2).mean(dim=(1, 2, 3))
            (-(a * torch.exp(log_prob - log_prob.detach())).mean() / s).backward()
        optimizer.step()

    return median_ms(update, args.iters, args.warmup)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, CONFIG_NAMES, batch=2, iters=3, warmup=1)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps S (all trained)")
    parser.add_argument("--remat", default=T2IUpdateConfig().remat_policy,
                        help="UNet remat policy for ours ('none': off)")
    parser.add_argument("--unroll", type=int, default=1,
                        help="timesteps per scan-loop iteration of ours (S: fully unrolled)")
    args = parser.parse_args(argv)
    check_common_args(parser, args, CONFIG_NAMES)
    pin_threads(args.threads)
    extra = f"; remat {args.remat}; scan unroll {args.unroll}; float32"
    for line in environment_lines(args.threads, extra):
        print(line)
    head = (f"{'config':<8} {'B':>3} {'S':>3} {'step ms':>9} {'grad ms':>9} {'torch ms':>9} "
            f"{'overhead':>9} {'torch/ours':>11} {'compile s (step/grad)':>22}")
    print("ms per sample x timestep\n" + head + "\n" + "-" * len(head), flush=True)
    for name in args.config_names:
        r = run_case(name, args)
        print(f"{name:<8} {args.batch:>3} {args.steps:>3} {r['step']:>9.2f} {r['grad']:>9.2f} "
              f"{r['torch']:>9.2f} {100 * r['overhead']:>8.1f}% {r['ratio']:>11.2f} "
              f"{r['compile_step']:>10.1f} / {r['compile_grad']:<10.1f}", flush=True)


if __name__ == "__main__":
    main()
