"""PEN supervised fine-tuning on a tiny random T5 and synthetic pairs (8 simulated devices): the
held-out loss falls, checkpoints restore the trained parameters exactly, LoRA leaves the base
untouched, a resumed run equals an uninterrupted one, the CLI runs, bad data fails clearly."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from parrot_jax import hub
from parrot_jax.data import DatasetError, synthetic_pairs
from parrot_jax.data.pipeline import PairEncoder
from parrot_jax.expansion.template import InstructionTemplate
from parrot_jax.training import pen_sft

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "configs" / "pen_sft.py"


def _get_config(arg):
    spec = importlib.util.spec_from_file_location("pen_sft_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(**overrides):
    """configs/pen_sft.py:tiny shrunk for a test: 20 steps, batch 16 (2 per device)."""
    c = _get_config("tiny")
    c.data.synthetic_size = 384
    c.data.heldout_size = 64
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_train_steps = 20
    c.log_every = 5
    c.eval_every = 20
    c.checkpoint_every = 10
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / pen_sft.METRICS_FILE).read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest: unoptimised XLA


def restored_heldout_loss(config, workdir, step=None):
    """(held-out loss, params) of the checkpoint, evaluated afresh from the restored params."""
    module, params, tokenizer, _ = pen_sft.restore(config, workdir, step)
    _, heldout = pen_sft.load_data(config.data, config.seed)
    encoder = PairEncoder(tokenizer, config.data.max_input_length, config.data.max_target_length,
                          InstructionTemplate(config.data.template))
    loss = pen_sft.heldout_loss(module, None, params, heldout, encoder, config.eval_batch_size,
                                pen_sft.data_mesh())
    return loss, params


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_full")
    config = tiny_config()
    return config, workdir, pen_sft.train_and_evaluate(config, workdir)


def test_sft_lowers_heldout_loss(full_run):
    config, workdir, result = full_run
    assert result["step"] == 20
    assert result["eval_loss"] < 0.9 * result["initial_eval_loss"], result
    metrics = _metrics(workdir)
    assert metrics[0] == {"step": 0, "eval_loss": result["initial_eval_loss"]}
    assert [m["step"] for m in metrics[1:]] == [5, 10, 15, 20]
    assert all(np.isfinite(m["train_loss"]) for m in metrics[1:])
    assert metrics[-1]["train_loss"] < metrics[1]["train_loss"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["name"] == "tiny" and saved["num_train_steps"] == 20
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]


def test_checkpoint_restores_trained_params(full_run):
    config, workdir, result = full_run
    # The restored parameters are the trained ones: they give the held-out loss the run logged.
    loss, params = restored_heldout_loss(config, workdir)
    np.testing.assert_allclose(loss, result["eval_loss"], rtol=1e-6)
    earlier_loss, earlier = restored_heldout_loss(config, workdir, step=10)
    assert earlier_loss > loss
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                        jax.tree.leaves(earlier)))


def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    config, workdir, result = full_run
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(workdir / "checkpoints" / "10", tmp_path / "checkpoints" / "10")
    shutil.copytree(workdir / "tokenizer", tmp_path / "tokenizer")
    resumed = pen_sft.train_and_evaluate(config, tmp_path)
    assert "initial_eval_loss" not in resumed  # it went on from step 10, it did not restart
    assert [m["step"] for m in _metrics(tmp_path)] == [15, 20]
    np.testing.assert_allclose(resumed["eval_loss"], result["eval_loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed["train_loss"], result["train_loss"], rtol=1e-6)


def test_cli_lora_on_jsonl_files(tmp_path):
    """The command line, on JSONL files given by a glob, with LoRA: the held-out loss falls and
    only the attention kernels change (the rest is the base model, bit for bit)."""
    data = tmp_path / "pairs"
    data.mkdir()
    pairs = synthetic_pairs(96, seed=5)
    for name, part in [("a.jsonl", pairs[:50]), ("b.jsonl", pairs[50:])]:
        (data / name).write_text("".join(json.dumps({"prompt": p.prompt, "expansion": p.expansion})
                                         + "\n" for p in part))
    workdir = tmp_path / "w"
    overrides = {"data.format": "jsonl", "data.train_files": f"{data}/*.jsonl",
                 "data.heldout_size": 16, "batch_size": 16, "eval_batch_size": 16,
                 "num_train_steps": 10, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
                 "finetune": "lora", "lora.rank": 4, "lora.alpha": 4.0,
                 "optim.learning_rate": 1e-2, "optim.warmup_steps": 0}
    cmd = [sys.executable, "-m", "parrot_jax.training.pen_sft", f"--config={CONFIG_FILE}:tiny",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    # One CPU device and unoptimised XLA: this checks the command line, not the sharding.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics] == [0, 5, 10]
    assert metrics[-1]["eval_loss"] < 0.95 * metrics[0]["eval_loss"], metrics
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10"]
    config = tiny_config(**overrides)
    _, params, _, step = pen_sft.restore(config, workdir)
    assert step == 10
    base = flatten_dict(pen_sft.load_model(config, workdir)[1])
    changed = {"/".join(k) for k, v in flatten_dict(params).items()
               if not np.array_equal(v, base[k])}
    assert changed and all(k.endswith(("q/kernel", "k/kernel", "v/kernel", "o/kernel"))
                           and "Attention" in k for k in changed), changed
    # The export CLI writes the merged PEN as a transformers T5 folder that our loaders (the
    # ones config.model.pen goes through) read back exactly, with its tokenizer.
    out = tmp_path / "pen"
    done = subprocess.run([sys.executable, "-m", "parrot_jax.export_pen", f"--workdir={workdir}",
                           f"--out={out}"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    _, exported = hub.load_t5(out)
    exported = flatten_dict(exported)
    assert set(exported) == set(flatten_dict(params))
    for k, v in flatten_dict(params).items():
        np.testing.assert_array_equal(exported[k], v, err_msg="/".join(k))
    text = "a red cat sitting on a mat"
    assert hub.load_tokenizer(out)(text)["input_ids"] == pen_sft.load_model(
        config, workdir)[2](text)["input_ids"]
    again = subprocess.run([sys.executable, "-m", "parrot_jax.export_pen",
                            f"--workdir={workdir}", f"--out={out}"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_tfds_data_for_sft(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    pairs = synthetic_pairs(30, seed=6)
    (manual / "train.tsv").write_text("".join(f"{p.prompt}\t{p.expansion}\n" for p in pairs))
    c = tiny_config(**{"data.format": "tfds", "data.tfds_manual_dir": str(manual),
                       "data.tfds_data_dir": str(tmp_path / "tfds"), "data.heldout_size": 5})
    train, heldout = pen_sft.load_data(c.data, c.seed)
    assert (len(train), len(heldout)) == (25, 5)
    got = sorted(train[i]["prompt"].decode() for i in range(25))
    got += [heldout[i]["prompt"].decode() for i in range(5)]
    assert sorted(got) == sorted(p.prompt for p in pairs)
    c.data.eval_split = "validation"
    with pytest.raises(DatasetError, match="no split 'validation'"):
        pen_sft.load_data(c.data, c.seed)


def test_bad_setups_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the 8"):
        pen_sft.train_and_evaluate(tiny_config(batch_size=12), tmp_path / "w")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    jsonl = {"data.format": "jsonl", "data.train_files": str(empty)}
    with pytest.raises(DatasetError, match="empty.jsonl: no pairs"):
        pen_sft.train_and_evaluate(tiny_config(**jsonl), tmp_path / "w")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "expansion": "b"}\n{"prompt": "a" "expansion": "b"}\n')
    with pytest.raises(DatasetError, match=f"{bad}:2: invalid JSON"):
        pen_sft.train_and_evaluate(tiny_config(**{**jsonl, "data.train_files": str(bad)}),
                                   tmp_path / "w")
    with pytest.raises(DatasetError, match="matches no file"):
        pen_sft.train_and_evaluate(
            tiny_config(**{**jsonl, "data.train_files": str(tmp_path / "*.tsv")}), tmp_path / "w")
    with pytest.raises(DatasetError, match="heldout_size=384 must be in"):
        pen_sft.train_and_evaluate(tiny_config(**{"data.heldout_size": 384}), tmp_path / "w")
    with pytest.raises(DatasetError, match=r"records do not fit .*max_target_length=8"):
        pen_sft.train_and_evaluate(tiny_config(**{"data.max_target_length": 8}), tmp_path / "t")
    with pytest.raises(ValueError, match="finetune='half'"):
        pen_sft.train_and_evaluate(tiny_config(finetune="half"), tmp_path / "t")
    with pytest.raises(ValueError, match="unknown pen_sft variant"):
        _get_config("huge")
