"""The AOT planner compiles the real programs for a TPU topology (libtpu, no TPU) and accounts
memory and FLOPs; the built-in architectures match the reference libraries' models."""

import dataclasses
import math
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch

from parrot_jax import architectures, plan
from parrot_jax.models.attention_ops import softmax_attention
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
    """The smoke config planned as SD 1.5 runs: bfloat16 activations (so re-scoring is on, and
    the frozen weights are kept in bfloat16)."""
    config = _smoke_config()
    config.model.dtype = "bfloat16"
    return config, plan.plan(config, devices, plan.chip_spec(devices), "v5e:2x4")


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_topology_and_chip(devices):
    assert len(devices) == 8 and devices[0].platform == "tpu"
    assert len({d.process_index for d in devices}) == 1  # a v5litepod-8 is one host
    assert len({d.process_index for d in plan.topology_devices("v5e:4x4")}) == 4
    assert len(plan.topology_devices("v4:2x2x1")) == 4  # one device per chip (megacore)
    chip = plan.chip_spec(devices)
    assert (chip.name, chip.hbm_gib, chip.bf16_tflops, chip.hbm_gbs) == ("v5e", 16, 197, 819)
    assert plan.chip_spec(devices, hbm_gib=2.5, tflops=100).hbm_gib == 2.5
    assert "197 TFLOP/s" in chip.describe()
    with pytest.raises(SystemExit, match="v5e:2x4"):
        plan.topology_devices("v99:1x1")


def test_smoke_plan_accounts_memory_and_flops(smoke_plan):
    config, p = smoke_plan
    assert p.devices == 8 and p.fits
    assert [(s.name, s.phase) for s in p.programs] == [
        ("rollout+decode", "rollout"), ("reward_models", "rewards"),
        ("t2i_train_step", "t2i_update"), ("pen_expand", "pen"), ("pen_update", "pen")]
    for s in p.programs:  # every program really compiled for the chip and reports memory
        assert s.arguments > 0 and s.code > 0 and s.flops > 0 and s.bytes_accessed > 0
    assert set(p.peaks) == set(plan.PHASES) and p.resident["reward_models"] > 0
    # The T2I state is replicated: every chip holds the trainable (cross-attention) params in
    # float32 with AdamW's two moments, the frozen rest in bfloat16, and a few scalars.
    models = plan.abstract_models(config)
    from parrot_jax.training.settings import t2i_update
    from parrot_jax.weights import split_params

    shapes = jax.eval_shape(models.unet.init_params, jax.random.key(0))
    trainable, frozen = split_params(shapes, t2i_update(config), jax.random.key(0))
    expected = 4 * 3 * _count(trainable) + 2 * _count(frozen)
    assert expected <= p.resident["t2i_state"] <= expected + 64
    # The donated state comes back in place.
    assert p.programs[2].aliased >= p.resident["t2i_state"] - 64
    assert p.peaks["t2i_update"] > p.resident["t2i_state"]
    # FLOPs: the rollout runs S guided UNet calls; the update n timesteps per minibatch.
    assert all(v > 0 for v in p.flops.values())
    assert p.flops["t2i_update"] > p.flops["rollout_unet"]  # fwd + bwd (+ remat) > fwd
    # Re-scoring: one guided UNet forward per trained transition, a quarter of the update
    # (forward, remat's recomputation, backward at about twice the forward).
    assert 0.15 * p.flops["t2i_update"] < p.flops["t2i_rescore"] <= 0.35 * p.flops["t2i_update"]
    # XLA's count of a guided UNet call against the architecture's (norms etc. left out).
    assert 0.9 < p.unet_call / p.unet_analytic < 1.1
    # The roofline: every phase has a time; images/s and MFU follow from them.
    assert all(v > 0 for v in p.seconds.values()) and set(p.seconds) == set(plan.PHASES)
    assert p.images_per_second_per_chip == pytest.approx(16 / p.iteration_seconds / 8)
    assert 0 < p.mfu < 1
    text = plan.report(p)
    assert "t2i_rescore is" in text and "FITS" in text and "MFU" in text
    row = plan.table_row(p)
    assert len(row) == len(plan.COLUMNS) and row[0] == "v5e:2x4" and row[9] == "yes"


def test_plan_refuses_when_memory_is_short(smoke_plan):
    """Chips of 1 MiB: every phase is over the limit, and each failure names the phase, the
    bytes and the config fields to change."""
    _, p = smoke_plan
    tight = dataclasses.replace(p, chip=dataclasses.replace(p.chip, hbm_gib=1 / 1024))
    assert not tight.fits and "DOES NOT FIT" in plan.report(tight)
    assert len(tight.failures) == len(plan.PHASES)
    update = next(f for f in tight.failures if "phase t2i_update" in f)
    assert "MiB per chip, over 85% of" in update and "t2i.microbatch" in update


def test_max_images_per_chip_bisects(monkeypatch, devices):
    """The bisection probes powers of two dividing the per-chip minibatch (here 32 / 8 = 4
    images per chip: 1, 2, 4) and returns the largest that fits."""
    config = _smoke_config()
    config.num_groups, config.images_per_group, config.num_minibatches = 4, 16, 2
    probed, fitting = [], {}

    def fake_plan(probe, devices, chip, max_fraction):
        probed.append(probe.t2i.microbatch)
        assert probe.sample.microbatch == probe.t2i.microbatch
        return types.SimpleNamespace(fits=probe.t2i.microbatch <= fitting["most"])

    monkeypatch.setattr(plan, "plan", fake_plan)
    chip = plan.chip_spec(devices)
    for most, expected in ((4, 4), (2, 2), (1, 1), (0, 0)):
        probed.clear()
        fitting["most"] = most
        assert plan.max_images_per_chip(config, devices, chip, 0.85) == expected
        assert len(probed) <= 2 and set(probed) <= {1, 2, 4}


def test_cli_prints_a_row_per_topology(monkeypatch, smoke_plan, capsys):
    """Two topologies: one table row each, the chip figures used, and the failures named;
    exit 1 when one does not fit. (Each plan is the smoke plan on that topology's chip.)"""
    _, p = smoke_plan
    seen = []

    def fake_plan(config, devices, chip, topology, max_fraction):
        seen.append((topology, len(devices), chip.name, max_fraction))
        return dataclasses.replace(p, topology=topology, chip=chip, max_fraction=max_fraction,
                                   devices=len(devices))

    monkeypatch.setattr(plan, "plan", fake_plan)
    with pytest.raises(SystemExit) as exit_:
        plan.main([f"--config={ROOT}/configs/tiny.py:smoke", "--topology=v5e:2x4,v4:2x2x1",
                   "--hbm_gib=0.001", "--max_fraction=0.9"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    assert seen == [("v5e:2x4", 8, "v5e", 0.9), ("v4:2x2x1", 4, "v4", 0.9)]
    rows = [line for line in out.splitlines() if line.startswith("| v")]
    assert [r.split(" | ")[0] for r in rows] == ["| v5e:2x4", "| v4:2x2x1"]
    assert "v4: 0.001 GiB HBM, 275 TFLOP/s" in out
    assert "phase t2i_update needs" in out and "does not fit" in out
    with pytest.raises(SystemExit) as exit_:
        plan.main([f"--config={ROOT}/configs/tiny.py:smoke", "--topology=v5e:2x4"])
    assert exit_.value.code == 0 and "FITS" in capsys.readouterr().out


def test_unet_analytic_flops_match_xla_at_sd15_size():
    """The analytic count of SD 1.5's UNet at 512 px (64 x 64 latents, 77 tokens) agrees with
    XLA's cost analysis of our module within 3%: about 0.8 TFLOP per image."""
    from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
    from parrot_jax.roofline import unet_forward_flops

    cfg = UNetConfig.from_diffusers(architectures.SD15["unet"])
    module = UNet2DConditionModel(cfg)
    params = jax.eval_shape(module.init_params, jax.random.key(0))
    args = (jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, 77, 768), jnp.float32))
    xla = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(params, *args)
    xla = xla.cost_analysis()["flops"]
    analytic = unet_forward_flops(cfg, 64, 64, 77)
    assert 7.5e11 < analytic < 8.5e11 and abs(xla / analytic - 1) < 0.03


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

    compiled, stats = plan._compile("t2i_train_step", "t2i_update", Lowered(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (19.36G) exceeds available HBM (15.75G).\nmore detail"))
    assert compiled is None and stats.error.endswith("exceeds available HBM (15.75G).")
    p = plan.Plan("v5e:2x4", 8, 1, plan.CHIPS["TPU v5 lite"], 0.85, 256, 8, (32, 8),
                  {"t2i_state": 1}, [stats], {}, {"x": 1.0}, 1.0, 1.0, {})
    assert not p.fits and "NOT COMPILED: RESOURCE_EXHAUSTED" in plan.report(p)
    assert "t2i_train_step (phase t2i_update) did not compile: RESOURCE_EXHAUSTED" in p.failures[0]
    assert "t2i.microbatch" in p.failures[0]
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan._compile("rollout+decode", "rollout", Lowered("INVALID_ARGUMENT: something else"))


@pytest.mark.parametrize("tokens,heads,head_dim,dtype", [
    (4096, 8, 40, jnp.bfloat16), (1024, 8, 80, jnp.bfloat16), (256, 8, 160, jnp.bfloat16),
    (4096, 1, 512, jnp.float32)])  # SD 1.5's UNet levels at 512 px, and its VAE's attention
def test_flash_attention_compiles_for_v5e(devices, tokens, heads, head_dim, dtype):
    """The Pallas flash kernel, forward and gradient, compiles for the v5e-8 at SD 1.5's sizes,
    split over the chips (4 images each), under matmul_precision 'highest' as configs/sd15.py
    runs: no [T, T] score matrix in its temporaries."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from parrot_jax import parallel
    from parrot_jax.models.attention_ops import attend

    mesh = parallel.make_mesh({"data": -1}, devices)
    q = jax.ShapeDtypeStruct((32, tokens, heads, head_dim), dtype,
                             sharding=NamedSharding(mesh, P("data")))
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, "flash").astype(jnp.float32)),
                    argnums=(0, 1, 2))
    with parallel.traced_on(mesh), jax.default_matmul_precision("highest"):
        compiled = jax.jit(grad).lower(q, q, q).compile()
    scores = 4 * heads * tokens * tokens * 4  # one chip's float32 [4, N, T, T]
    assert compiled.memory_analysis().temp_size_in_bytes < scores / 2


def test_reward_backbone_architectures():
    """The reward models' built-in configs (ViT-L/14, PickScore's ViT-H/14, ViT-B/32) build
    transformers' parameter counts (meta device), as the planner counts them."""
    import transformers

    from parrot_jax.models.clip import CLIPConfig, CLIPModel

    counts = {"openai/clip-vit-large-patch14": 427_616_513,
              "yuvalkirstain/PickScore_v1": 986_109_441,
              "openai/clip-vit-base-patch32": 151_277_313}
    for source, expected in counts.items():
        config = architectures.CLIP_MODELS[source]
        ours = jax.eval_shape(CLIPModel(CLIPConfig.from_transformers(config, source)).init_params,
                              jax.random.key(0))
        with torch.device("meta"):
            ref = transformers.CLIPModel(transformers.CLIPConfig(
                text_config=config["text_config"], vision_config=config["vision_config"],
                projection_dim=config["projection_dim"]))
        assert _count(ours) == sum(p.numel() for p in ref.parameters()) == expected
