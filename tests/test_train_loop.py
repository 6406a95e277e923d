"""The Parrot loop end to end on tiny random models and 8 simulated devices: a smoke run writes
metrics (ratio 1 before the first update) and a checkpoint; 2 iterations + resume + 2 equal 4
uninterrupted; SIGTERM saves and exits cleanly; bad configs and workdirs fail clearly."""

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from parrot_jax import architectures, loading
from parrot_jax import config as schema
from parrot_jax.data.promptist import DatasetError
from parrot_jax.data.prompts import draw_prompts
from parrot_jax.models import attention
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig
from parrot_jax.rl.pareto import front_hypervolume
from parrot_jax.training import loop, train_and_evaluate
from parrot_jax.training.loop import group_prompts
from parrot_jax.training.metrics import check_iteration, read_metrics
from parrot_jax.training.settings import Settings
from parrot_jax.workdir import (
    CONFIG_FILE,
    IncompatibleWorkdirError,
    check_workdir,
    config_dict,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("step", "reward/aesthetics/mean", "reward/aesthetics/std",
            "reward/human_preference/mean", "reward/alignment/mean", "reward/sentiment/std",
            "pareto/selected_fraction", "pareto/hypervolume", "t2i/loss", "t2i/approx_kl",
            "t2i/clipfrac", "t2i/ratio_first", "t2i/clipfrac_first", "t2i/approx_kl_first",
            "t2i/grad_norm", "pen/loss", "reward/invalid_count",
            "reward/aesthetics/invalid_count")


def tiny_config(arg: str = "smoke"):
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _no_timings(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run, recording the matmul precision each iteration was traced under, and the
    mesh axes and implementation every self-attention was traced with."""
    workdir = tmp_path_factory.mktemp("smoke")
    seen, traced = [], []
    iteration = loop.parrot_iteration
    attend = attention.attend

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return iteration(*args, **kwargs)

    def attend_spy(q, k, v, implementation="xla"):
        traced.append((jax.sharding.get_abstract_mesh().axis_names, implementation))
        return attend(q, k, v, implementation)

    class Compiles(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                self.records.append(record)

    compiles = Compiles()
    logging.getLogger("jax").addHandler(compiles)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "parrot_iteration", spy)
        patch.setattr(attention, "attend", attend_spy)
        jax.config.update("jax_log_compiles", True)
        try:
            result = train_and_evaluate(tiny_config("smoke"), workdir)
        finally:
            jax.config.update("jax_log_compiles", False)
            logging.getLogger("jax").removeHandler(compiles)
    return workdir, {**result, "precisions": seen, "compiles": compiles.records,
                     "attention": traced}


def test_smoke_run_writes_metrics_and_a_checkpoint(smoke):
    workdir, result = smoke
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        # Before the first update of an iteration the policy is the one that sampled.
        assert abs(r["t2i/ratio_first"] - 1.0) <= 1e-5
        # In float32 on CPU the rollout's log-probs are reproduced to well inside the clip.
        assert r["t2i/clipfrac_first"] == 0.0 and r["t2i/approx_kl_first"] < 1e-10
        assert 0 < r["pareto/selected_fraction"] <= 1
        assert r["reward/invalid_count"] == 0
        assert r["pareto/hypervolume"] >= 0
    assert "perf/samples_per_sec" in records[-1] and "perf/iteration_seconds" in records[-1]
    assert result["step"] == 2 and not result["preempted"]
    # configs/tiny.py's matmul_precision, for every iteration and only inside the run.
    assert result["precisions"] == ["highest", "highest"]
    assert jax.config.jax_default_matmul_precision is None
    # Every program that ran attention (rollout, update, re-scoring, pictures) traced it on
    # the run's mesh, with model.attention='auto' resolved for the CPU; before them only the
    # set-up's shape evaluation of the random models traced without one. How many programs
    # trace here depends on what earlier tests in this process left in jax's caches.
    traced = result["attention"]
    first = traced.index((("data", "fsdp"), "xla"))
    assert set(traced[first:]) == {(("data", "fsdp"), "xla")}
    assert set(traced[:first]) <= {((), "xla")}
    assert (workdir / "checkpoints" / "2").is_dir()
    # The T2I step was compiled ahead, in a thread, for exactly the arguments the iterations
    # passed: never in the main thread (at its first call), at most once (none when an
    # earlier run in this process compiled the same step).
    compiles = [r for r in result["compiles"] if "jit(train_step)" in r.getMessage()]
    assert len(compiles) <= 1 and all(r.threadName == "compile_t2i_step" for r in compiles)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["num_iterations"] == 2 and saved["advantage"]["mode"] == "paper"
    # eval_every=2: the pictures of iteration 2, as PNG files and TensorBoard images.
    grid = Image.open(workdir / "eval" / "grid_000002.png")
    assert grid.size == (8 * 64 + 7 * 2, 2 * 64 + 2)  # G=2 rows of N=8 8x8 images shown at 64
    assert Image.open(workdir / "eval" / "pareto_000002.png").size[0] > 0
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("t2i/loss")] == [
        (r["step"], pytest.approx(r["t2i/loss"])) for r in records]
    assert [e.step for e in events.Images("eval/grid")] == [2]
    assert [e.step for e in events.Images("pareto/scatter")] == [2]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The smoke run for 6 iterations, uninterrupted (checkpoints 4 and 6 kept)."""
    workdir = tmp_path_factory.mktemp("straight")
    config = tiny_config("smoke")
    config.num_iterations = 6
    train_and_evaluate(config, workdir)
    return workdir


def _checkpoint(workdir, step):
    """Every array of checkpoint ``step`` (optimizer moments and all), on the host, by path."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_resume_is_exact(smoke, straight, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(smoke[0], resumed)
    config = tiny_config("smoke")
    config.num_iterations = 6
    train_and_evaluate(config, resumed)
    a, b = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert _no_timings(a) == _no_timings(b)
    assert sorted(os.listdir(resumed / "checkpoints")) == ["4", "6"]  # max_to_keep=2


def test_kill_9_after_a_checkpoint_resumes_to_the_uninterrupted_run(straight, tmp_path):
    """train.py killed with SIGKILL once checkpoint 2 is on disk and iteration 3 is logged,
    then rerun: metrics.jsonl and TensorBoard hold each step once, and every metric and every
    array of the final checkpoint equal the uninterrupted run's."""
    workdir = tmp_path / "w"
    proc = _train_py(workdir, "--config.num_iterations=6")
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 400
    while not ((workdir / "checkpoints" / "2").is_dir() and metrics.is_file()
               and len(read_metrics(workdir)) >= 3):  # orbax finalises checkpoints async
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint 2 and iteration 3 after 400 s"
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    logged = [r["step"] for r in read_metrics(workdir)]
    assert logged[:3] == [1, 2, 3] and logged == list(range(1, len(logged) + 1))
    assert sorted(p for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == ["2"]
    proc = _train_py(workdir, "--config.num_iterations=6")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    dropped = re.search(r"Dropped (\d+) metrics.jsonl records and (\d+) TensorBoard events "
                        r"after iteration 2 ", out)
    assert dropped and int(dropped[1]) == len(logged) - 2 <= int(dropped[2]), out[-3000:]
    records, expected = read_metrics(workdir), read_metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert _no_timings(records) == _no_timings(expected)
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("t2i/loss")] == [
        (r["step"], pytest.approx(r["t2i/loss"])) for r in records]
    assert [e.step for e in events.Images("eval/grid")] == [2, 4, 6]
    got, want = _checkpoint(workdir, 6), _checkpoint(straight, 6)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_damaged_checkpoint_is_skipped_with_one_warning(straight, tmp_path, capfd, caplog):
    """The latest checkpoint's data files truncated: resume warns once, naming it and the
    iteration it falls back to, sets it aside, and repeats the iterations to the same result;
    TensorStore's hundreds of lines stay out of the output. With no readable checkpoint left,
    train.py stops in one line and moves nothing."""
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    for f in (workdir / "checkpoints" / "6" / "state" / "d").iterdir():
        os.truncate(f, 100)
    config = tiny_config("smoke")
    config.num_iterations = 6
    caplog.set_level(logging.WARNING)
    train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # asyncio's abandoned-task errors filtered out too
    assert re.fullmatch(rf"checkpoint {workdir}/checkpoints/6 cannot be restored \(ValueError: "
                        r".{20,300}\); falling back to iteration 4", warnings[0]), warnings[0]
    assert warnings[1] == (f"checkpoint {workdir}/checkpoints/6 moved to "
                           f"{workdir}/checkpoints.damaged/6")
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err
    assert _no_timings(read_metrics(workdir)) == _no_timings(read_metrics(straight))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    assert os.listdir(workdir / "checkpoints.damaged") == ["6"]

    (workdir / "checkpoints" / "6" / "state" / "_METADATA").write_text("")
    (workdir / "checkpoints" / "4" / "state" / "_METADATA").write_text("")
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", f"{ROOT}/configs/tiny.py:smoke", f"--workdir={workdir}",
                    "--config.num_iterations=8", "--noretain_host_memory"])
    assert exit_.value.code == 1
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"python train.py: stopped: {workdir}/checkpoints: no checkpoint can "
                           "be restored (6: JSONDecodeError: Expecting value: line 1 column 1 "
                           "(char 0); 4: JSONDecodeError: "), line
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_the_whole_loop_on_one_device_equals_eight(smoke, tmp_path):
    """train.py on 1 CPU device vs the smoke run on 8: the same metrics (the batch split and
    every reduction's order differ, so to 1e-5 relative) and the same trained weights, to the
    size of float32 rounding carried through two Adam steps."""
    proc = _train_py(tmp_path, devices=1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "1 devices (cpu); mesh {'data': 1, 'fsdp': 1}" in out
    one, eight = _no_timings(read_metrics(tmp_path)), _no_timings(read_metrics(smoke[0]))
    assert [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, eight):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    got, want = _checkpoint(tmp_path, 2), _checkpoint(smoke[0], 2)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_non_finite_rewards_and_a_diverged_state(smoke, tmp_path, monkeypatch, caplog):
    """An +inf reward at iteration 1 (log_every=2, checkpoint_every=1): its sample is invalid,
    counted and named, and the run goes on with finite weights; a NaN in the trained weights
    at iteration 3 stops the run before anything of iteration 3 is written, truthfully."""
    from parrot_jax.rewards.reward_set import PendingRewards

    result, calls = PendingRewards.result, []

    def one_inf(self, timeout=None):
        rewards = result(self, timeout)
        calls.append(1)
        return rewards.at[5, 0].set(np.inf) if len(calls) == 1 else rewards

    iteration = loop.parrot_iteration

    def diverge(run, state, *args):
        new, *rest = iteration(run, state, *args)
        if int(new["step"]) == 3:
            new["t2i"]["trainable"] = jax.tree.map(lambda x: x * np.nan,
                                                   new["t2i"]["trainable"])
        return (new, *rest)

    monkeypatch.setattr(PendingRewards, "result", one_inf)
    monkeypatch.setattr(loop, "parrot_iteration", diverge)
    config = tiny_config("smoke")
    config.num_iterations, config.log_every, config.checkpoint_every = 4, 2, 1
    caplog.set_level(logging.WARNING)
    with pytest.raises(FloatingPointError) as error:
        train_and_evaluate(config, tmp_path)
    assert str(error.value) == (
        "iteration 3: non-finite values in the state's t2i/trainable; stopping before anything "
        "of iteration 3 is written (the last checkpoint, iteration 2, holds finite weights)")
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]  # a record at every checkpoint
    assert records[0]["reward/invalid_count"] == 1
    assert records[0]["reward/aesthetics/invalid_count"] == 1
    assert records[0]["reward/alignment/invalid_count"] == 0
    assert records[1]["reward/invalid_count"] == 0
    assert all(np.isfinite(v) for r in records for v in r.values())
    warnings = [r.getMessage() for r in caplog.records if "non-finite reward" in r.getMessage()]
    assert warnings == ["iteration 1: 1 samples have a non-finite reward (NaN or inf: "
                        "aesthetics (1)); they are left out of the selection and the updates"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    for step in (1, 2):
        assert all(np.isfinite(v).all() for v in _checkpoint(tmp_path, step).values()
                   if np.issubdtype(v.dtype, np.floating))
    assert sorted(os.listdir(tmp_path / "eval")) == ["grid_000002.png", "pareto_000002.png"]


def test_incompatible_workdir_is_refused_and_untouched(smoke, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(smoke[0], workdir)
    before = {p: (workdir / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
    config = tiny_config("smoke")
    config.sample.num_steps = 5
    config.advantage.mode = "normalized"
    with pytest.raises(IncompatibleWorkdirError, match=r"sample\.num_steps: saved 3, now 5"):
        train_and_evaluate(config, workdir)
    assert {p: (workdir / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_a_workdir_from_before_an_added_field_resumes(tmp_path):
    """A saved config without a field the schema marks as added later (``config.ADDED``)
    agrees with that field's stated value and with nothing else; a renamed field counts by its
    new name."""
    config = tiny_config("smoke")
    saved = config_dict(config)
    assert {"pen.lora_targets", "t2i.warmup_steps", "matmul_precision"} <= set(schema.ADDED)
    for field in schema.ADDED:
        *parents, name = field.split(".")
        section = saved
        for p in parents:
            section = section[p]
        del section[name]
    saved["matmul_precision"] = "highest"  # added as 'default'; this run's is 'highest'
    saved["final_eval"]["oracle"] = False  # renamed final_eval.image_metrics ('' = none)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    check_workdir(config, tmp_path)  # the defaults: accepted
    config.pen.lora_targets = "lm_head/kernel$"
    with pytest.raises(IncompatibleWorkdirError,
                       match=r"pen\.lora_targets: saved <absent, meaning '\(Self.*, now 'lm_head"):
        check_workdir(config, tmp_path)


def test_clear_errors(tmp_path):
    config = tiny_config("smoke")
    config.model.pretrained = str(tmp_path / "no_such_pipeline")
    with pytest.raises(FileNotFoundError, match=r"config\.model\.pretrained=.*no_such_pipeline"):
        train_and_evaluate(config, tmp_path / "a")
    assert not (tmp_path / "a" / "config.json").exists()  # a corrected rerun is not blocked

    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    config = tiny_config("smoke")
    config.data.prompts = str(empty)
    with pytest.raises(DatasetError, match="prompts.txt"):
        train_and_evaluate(config, tmp_path / "b")

    config = tiny_config("smoke")
    config.num_minibatches = 4  # 16 images / 4 = 4 per step, fewer than the 8 devices
    with pytest.raises(ValueError, match="change images_per_group or num_minibatches"):
        train_and_evaluate(config, tmp_path / "c")

    config = tiny_config("smoke")
    config.advantage.modes = "paper"  # a typo in a config file
    with pytest.raises(ValueError, match=r"advantage\.modes"):
        train_and_evaluate(config, tmp_path / "d")

    config = tiny_config("smoke")
    config.pen.advantage = "zscore"
    with pytest.raises(ValueError, match=r"config\.pen\.advantage='zscore'"):
        train_and_evaluate(config, tmp_path / "e")
    assert not (tmp_path / "e" / "config.json").exists()

    config = tiny_config("smoke")
    config.pen.expansions_per_prompt = 3  # 2 groups
    with pytest.raises(ValueError, match=r"expansions_per_prompt=3 .* num_groups=2"):
        train_and_evaluate(config, tmp_path / "f")
    assert not (tmp_path / "f" / "config.json").exists()

    config = tiny_config("smoke")
    config.pen.lora_targets = "(lm_head"  # not a regex
    with pytest.raises(ValueError, match=r"config\.pen: .*lora_targets='\(lm_head' \(bad regex"):
        train_and_evaluate(config, tmp_path / "g")
    config.pen.lora_targets = "lm_heads/kernel$"  # a regex that names no PEN kernel
    with pytest.raises(ValueError, match=r"config\.pen\.lora_targets: .*match no kernel"):
        train_and_evaluate(config, tmp_path / "g")
    assert not (tmp_path / "g" / "config.json").exists()

    config = tiny_config("smoke")
    config.matmul_precision = "fast"
    with pytest.raises(ValueError, match=r"config\.matmul_precision='fast': one of"):
        train_and_evaluate(config, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_pen_lora_targets_reach_the_reinforce_config():
    """``pen.lora_targets`` picks the PEN kernels REINFORCE trains; a saved config without the
    field (a workdir from before it existed) means the attention q / v default."""
    from parrot_jax.expansion.reinforce import DEFAULT_LORA_TARGETS

    def targets(config):
        return Settings.of(config, 8, 4).pen_rl.lora_targets

    config = tiny_config("smoke")
    assert targets(config) == DEFAULT_LORA_TARGETS
    config.pen.lora_targets = "lm_head/kernel$"
    assert targets(config) == "lm_head/kernel$"
    saved = config_dict(config)
    del saved["pen"]["lora_targets"]
    assert targets(schema.upgrade(saved)) == DEFAULT_LORA_TARGETS


def test_group_prompts_share_a_prompt_and_its_identifier():
    """With E expansions per prompt an iteration draws G / E prompts, each in E consecutive
    groups with one identifier; identifiers keep cycling over prompts across iterations; E = 1
    is the plain draw of G prompts."""
    import jax

    prompts = [f"prompt {i}" for i in range(50)]
    config = tiny_config("")  # 4 groups
    config.num_groups = 8

    def settings(expansions_per_prompt):
        config.pen.expansions_per_prompt = expansions_per_prompt
        return Settings.of(schema.check(config), 8, 4)

    key = jax.random.key(0)
    ids, k = group_prompts(prompts, settings(2), position=3, step=5, num_rewards=4, key=key)
    np.testing.assert_array_equal(ids, np.repeat(draw_prompts(prompts, config.seed, 3, 4), 2))
    assert len(set(ids.tolist())) == 4
    np.testing.assert_array_equal(k, np.repeat([0, 1, 2, 3], 2))  # start 5 * 4 = 20 = 0 mod 4
    _, k = group_prompts(prompts, settings(4), position=3, step=1, num_rewards=4, key=key)
    np.testing.assert_array_equal(k, [2, 2, 2, 2, 3, 3, 3, 3])  # prompts 2 and 3 of the cycle
    ids, k = group_prompts(prompts, settings(1), position=3, step=1, num_rewards=4, key=key)
    np.testing.assert_array_equal(ids, draw_prompts(prompts, config.seed, 3, 8))
    np.testing.assert_array_equal(k, [0, 1, 2, 3, 0, 1, 2, 3])


def _train_py(workdir, *overrides, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", f"{ROOT}/configs/tiny.py:smoke",
         "--workdir", str(workdir), *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_cli_rejects_an_unknown_config_key(tmp_path):
    proc = _train_py(tmp_path / "w", "--config.no_such_field=1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "no_such_field" in out
    assert not (tmp_path / "w").exists()


def test_cli_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "w"
    proc = _train_py(workdir, "--config.num_iterations=200", "--config.checkpoint_every=100")
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no metrics after 400 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal" in out
    step = read_metrics(workdir)[-1]["step"]
    saved = sorted(int(p) for p in os.listdir(workdir / "checkpoints"))
    assert saved == [step] and 1 <= step < 200


@pytest.mark.parametrize("preset", ["no_pareto", "t2i_only", "pen_only"])
def test_presets_change_what_trains(preset, tmp_path):
    config = tiny_config(f"smoke,{preset}")
    config.num_iterations = 1
    train_and_evaluate(config, tmp_path)
    (record,) = read_metrics(tmp_path)
    assert ("pen/loss" in record) == (preset != "t2i_only")
    assert ("t2i/loss" in record) == (preset != "pen_only")
    if preset == "no_pareto":  # no Pareto filter: every (valid) sample drives the update
        assert record["pareto/selected_fraction"] == 1.0


def test_scalarised_presets_drop_the_pareto_filter():
    for preset, mode in (("weighted_sum", "weighted_sum"), ("single", "single"), ("", "paper")):
        adv = Settings.of(tiny_config(f"smoke,{preset}"), 8, 4).advantage
        assert adv.mode == mode and adv.uses_pareto == (mode == "paper")
    with pytest.raises(ValueError, match="unknown configs/tiny.py variant"):
        tiny_config("smoke,nonsense")


def test_nan_loss_stops_naming_iteration_and_metric():
    check_iteration(7, {"t2i/loss": np.float32(0.5), "pen/loss": np.float32(1.0)}, ())
    with pytest.raises(FloatingPointError, match="iteration 8: pen/loss is nan"):
        check_iteration(8, {"t2i/loss": np.float32(0.5), "pen/loss": np.float32(np.nan)}, ())
    with pytest.raises(FloatingPointError, match="iteration 9: t2i/grad_norm is inf"):
        check_iteration(9, {"t2i/grad_norm": np.float32(np.inf)}, ())


def test_front_hypervolume():
    # Front {(1, 2), (2, 1)} from the batch minimum (0.5, 0.5): two 0.5 x 1.5 boxes overlapping
    # in a 0.5 x 0.5 square; the dominated (0.8, 0.8) and the NaN row add nothing.
    rewards = np.array([[1, 2], [2, 1], [0.5, 0.5], [0.8, 0.8], [np.nan, 9]])
    assert front_hypervolume(rewards, None) == pytest.approx(1.25)
    assert front_hypervolume(rewards, np.array([0.0, 0.0])) == pytest.approx(3.0)


def sd15_config(arg: str = ""):
    spec = importlib.util.spec_from_file_location("sd15_config", ROOT / "configs" / "sd15.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_sd15_config_builds_and_checks(tmp_path):
    config = sd15_config("no_pareto")
    sizes = Settings.of(schema.check(config), 8, 4).sizes
    assert (sizes.batch, sizes.minibatch) == (256, 64) and not config.advantage.pareto
    assert config.sample.num_steps == 50 and config.t2i.clip_range == 1e-4
    # Offline, the hub ids cannot be fetched: the error names the field.
    with pytest.raises(Exception, match=r"config\.model\.pretrained='stable-diffusion-v1-5/"):
        train_and_evaluate(config, tmp_path)


def _architecture_folders(root: Path, tiny: dict) -> tuple[Path, Path]:
    """A diffusers pipeline folder and a T5 folder holding only config.json files (no weights),
    in the tiny models' shapes but with their own vocabulary sizes."""
    pipeline, t5 = root / "pipeline", root / "t5"
    files = {
        pipeline / "unet" / "config.json": {
            "_class_name": "UNet2DConditionModel", **tiny["unet"], "in_channels": 4,
            "out_channels": 4, "cross_attention_dim": tiny["text"]["hidden_size"],
            "sample_size": tiny["latent_size"]},
        pipeline / "vae" / "config.json": {"_class_name": "AutoencoderKL", **tiny["vae"]},
        pipeline / "text_encoder" / "config.json": {
            "model_type": "clip_text_model", **tiny["text"], "vocab_size": 1000,
            "max_position_embeddings": tiny["context_length"]},
        pipeline / "scheduler" / "scheduler_config.json": {"_class_name": "DDIMScheduler",
                                                           **schema.SD_SCHEDULER},
        t5 / "config.json": {"model_type": "t5", **tiny["t5"], "vocab_size": 300},
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return pipeline, t5


def test_random_weights_build_the_named_architectures(tmp_path):
    """model.random_weights: the T2I model and PEN of folders without weights, random, with
    stand-in tokenizers of the folders' vocabulary sizes (saved in the workdir and read back
    on resume); model.resolution sets the image side. (configs/sd15.py:random does this for
    the real SD 1.5, FLAN-T5 and reward CLIPs: tests/test_full_size_cpu.py, -m slow.)"""
    config = tiny_config("smoke")
    pipeline, t5 = _architecture_folders(tmp_path, config.model.tiny.to_dict())
    config.model.random_weights = True
    config.model.pretrained, config.model.pen = str(pipeline), str(t5)
    config.model.resolution = 4  # the smoke VAE does not downsample: 4 x 4 latents
    config.num_iterations = 1
    workdir = tmp_path / "run"
    result = train_and_evaluate(config, workdir)
    assert result["step"] == 1
    from parrot_jax import hub

    assert len(hub.load_tokenizer(workdir / "tokenizers" / "clip")) == 1000
    assert len(hub.load_tokenizer(workdir / "tokenizers" / "pen")) == 300
    run, _ = loop.setup(config, workdir)
    assert run.models.latent_shape == (4, 4, 4)
    assert run.models.text_encoder.config.vocab_size == 1000
    assert run.models.pen.config.vocab_size == 300
    # SD 1.5: 8x in the VAE, 8x in the UNet.
    sd15 = sd15_config("random")
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(architectures.SD15["unet"]))
    vae = AutoencoderKL(VAEConfig.from_diffusers(architectures.SD15["vae"]))
    assert loading.latent_shape(sd15, unet, vae, 64) == (64, 64, 4)
    sd15.model.resolution = 128
    assert loading.latent_shape(sd15, unet, vae, 64) == (16, 16, 4)
    sd15.model.resolution = 100
    with pytest.raises(ValueError, match=r"config\.model\.resolution=100 must be a multiple "
                                         r"of 64"):
        loading.latent_shape(sd15, unet, vae, 64)
