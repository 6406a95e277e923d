"""The AOT planner compiles the real programs for a TPU topology (libtpu, no TPU) and accounts
memory and FLOPs; the built-in architectures match the reference libraries' models."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch

from parrot_jax import architectures, plan
from parrot_jax.models.attention import softmax_attention
from parrot_jax.models.clip import CLIPTextConfig, CLIPTextModel
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def _smoke_config():
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    return tiny.get_config("smoke")


@pytest.fixture(scope="module")
def devices():
    return plan.topology_devices("v5e:2x4")


@pytest.fixture(scope="module")
def smoke_plan(devices):
    """The smoke config planned as SD 1.5 runs: bfloat16 activations (so re-scoring is on)."""
    config = _smoke_config()
    config.model.dtype = "bfloat16"
    return config, plan.plan(config, devices, plan.chip_memory(devices, None))


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_topology_and_capacity(devices):
    assert len(devices) == 8 and devices[0].platform == "tpu"
    assert plan.chip_memory(devices, None) == 16 * plan.GIB  # v5e: 16 GiB HBM
    assert plan.chip_memory(devices, 2.5) == int(2.5 * plan.GIB)
    with pytest.raises(SystemExit, match="v5e:2x4"):
        plan.topology_devices("v99:1x1")


def test_smoke_plan_accounts_memory_and_flops(smoke_plan):
    config, p = smoke_plan
    assert p.devices == 8 and p.fits
    assert [s.name for s in p.programs] == ["rollout+decode", "t2i_train_step", "pen_expand"]
    for s in p.programs:  # every program really compiled for the chip and reports memory
        assert s.arguments > 0 and s.code > 0
    # The T2I state is replicated: every chip holds all UNet params (f32) plus AdamW's two
    # moments of the trainable (cross-attention) ones, and a few scalars.
    models = plan.abstract_models(config)
    from parrot_jax.training.settings import t2i_update
    from parrot_jax.weights import split_params

    shapes = jax.eval_shape(models.unet.init_params, jax.random.key(0))
    trainable, _ = split_params(shapes, t2i_update(config), jax.random.key(0))
    expected = 4 * (_count(shapes) + 2 * _count(trainable))
    assert expected <= p.resident["t2i_state"] <= expected + 64
    # The donated state comes back in place.
    assert p.programs[1].aliased >= p.resident["t2i_state"] - 64
    assert p.peaks["t2i_update"] > p.resident["t2i_state"]
    # FLOPs: the rollout runs S guided UNet calls; the update n timesteps per minibatch.
    assert all(v > 0 for v in p.flops.values())
    assert p.flops["t2i_update"] > p.flops["rollout_unet"]  # fwd + bwd (+ remat) > fwd
    # Re-scoring: one guided UNet forward per trained transition, a quarter of the update
    # (forward, remat's recomputation, backward at about twice the forward).
    assert 0.15 * p.flops["t2i_update"] < p.flops["t2i_rescore"] <= 0.35 * p.flops["t2i_update"]
    assert "t2i_rescore is" in plan.report(p)
    assert "FITS" in plan.report(p)


def test_plan_refuses_when_memory_is_short(devices, smoke_plan):
    config, _ = smoke_plan
    tight = plan.plan(config, devices, hbm=1024 ** 2)  # 1 MiB chips
    assert not tight.fits and "DOES NOT FIT" in plan.report(tight)


def test_cli_exit_status(tmp_path):
    """The CLI prints the table; a chip too small exits 1 (the smoke config, 1 MiB chips)."""
    cmd = [sys.executable, "-m", "parrot_jax.plan", f"--config={ROOT}/configs/tiny.py:smoke",
           "--topology=v5e:2x4", "--hbm_gib=0.001"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                         env={"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "DOES NOT FIT" in out.stdout and "t2i_train_step" in out.stdout


def test_sd15_architecture_counts():
    """The shipped SD 1.5 text encoder and FLAN-T5-base configs build models of the published
    sizes, and match transformers' models built from the same dicts (meta device)."""
    import transformers

    text = architectures.SD15["text_encoder"]
    ours = jax.eval_shape(CLIPTextModel(CLIPTextConfig.from_transformers(text, "sd15")
                                        ).init_params, jax.random.key(0))
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    assert _count(ours) == sum(p.numel() for p in ref.parameters()) == 123_060_480
    # FLAN-T5-base as published: an untied LM head (transformers 5 ties it whatever the
    # config says, so its module is no reference for the count here).
    t5 = architectures.FLAN_T5_BASE
    ours = jax.eval_shape(T5ForConditionalGeneration(T5Config.from_transformers(t5)).init_params,
                          jax.random.key(0))
    assert _count(ours) == 247_577_856
    assert "lm_head" in ours


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_bfloat16_attention_compiles_for_tpu(devices, precision):
    """SD 1.5's bfloat16 UNet attention (the 16x16 level: 256 tokens, head dim 160) compiles
    for a v5e chip, forward and gradient, under every matmul_precision: libtpu's fused
    attention kernel rejects a float32 contract precision on bfloat16 operands ("Mosaic
    failed to compile TPU kernel: Bad lhs type"), which 'highest' used to ask for."""
    q = jax.ShapeDtypeStruct((2, 256, 8, 160), jnp.bfloat16,
                             sharding=jax.sharding.SingleDeviceSharding(devices[0]))
    loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v).astype(jnp.float32))  # noqa: E731
    with jax.default_matmul_precision(precision):
        for fn in (softmax_attention, jax.grad(loss, argnums=(0, 1, 2))):
            assert jax.jit(fn).lower(q, q, q).compile() is not None


def test_compiler_out_of_memory_is_a_finding_not_a_crash():
    """The TPU compiler refuses programs whose temporaries exceed HBM (SD 1.5 at the paper's
    minibatch on v5e does): the plan records it and does not fit; other errors propagate."""

    class Lowered:
        def __init__(self, message):
            self.message = message

        def compile(self):
            raise RuntimeError(self.message)

    compiled, stats = plan._compile("t2i_train_step", Lowered(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (19.36G) exceeds available HBM (15.75G).\nmore detail"))
    assert compiled is None and stats.error.endswith("exceeds available HBM (15.75G).")
    p = plan.Plan(8, "TPU v5 lite", 16 * plan.GIB, {"t2i_state": 1}, [stats], {}, {"x": 1.0})
    assert not p.fits and "NOT COMPILED: RESOURCE_EXHAUSTED" in plan.report(p)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan._compile("rollout", Lowered("INVALID_ARGUMENT: something else"))
