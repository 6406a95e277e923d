"""``python -m parrot_jax.sample`` / ``parrot_jax.evaluate`` and ``parrot_jax.policy`` on a smoke
training run (tiny random models, 8 simulated devices): files and shapes, determinism per seed,
identifiers in the conditioning text, ``--w2 0`` = plain CFG on the prompt, rewards of the
original prompt, a checkpoint read without its optimizer, and clear errors."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from parrot_jax import evaluate, policy, sample, scoring
from parrot_jax.data.promptist import read_prompts
from parrot_jax.diffusion.guidance import PromptCentredGuidance
from parrot_jax.rl.pareto import front_hypervolume
from parrot_jax.training import train_and_evaluate
from parrot_jax.training.final_eval import table as final_table

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a white background"


def _smoke_config():
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    config = _smoke_config()
    if "eval_every" in config:  # no evaluation grids: this module needs only the checkpoint
        config.eval_every = 1000
    held_out = path.parent / "held_out.txt"
    held_out.write_text("a castle on a hill\n" + PROMPT + "\n")
    config.final_eval.prompts = str(held_out)
    config.final_eval.num_images = 2
    config.final_eval.batch_prompts = 1
    config.final_eval.identifiers = "1,3"  # all four do not fit the tiny 16-token context
    result = train_and_evaluate(config, path)
    assert result["final_eval"] == json.loads((path / "final_eval.json").read_text())
    return path


def _images(out: Path, record: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / f)) for f in record["files"]])


def _sample(workdir, out, *extra):
    record = sample.main(["--workdir", str(workdir), "--prompt", PROMPT, "--out", str(out),
                          "--num_images", "2", "--identifiers", "1,3", *extra])
    return record, _images(out, record)


def test_sample_writes_pngs_and_record(workdir, tmp_path):
    record, images = _sample(workdir, tmp_path / "a", "--seed", "3")
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    assert len(set(map(bytes, images))) == 2  # the two draws differ
    saved = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert saved == record
    assert record["model"] == "step_2" and record["seed"] == 3 and record["prompt"] == PROMPT
    assert record["identifiers"] == [1, 3]
    assert record["conditioning_text"].startswith("<reward 1>, <reward 3>, ")
    assert record["expansion"] and record["pen_decoding"] == "greedy"
    # same seed: same images (and greedy expansion); another seed: other images
    again, same = _sample(workdir, tmp_path / "b", "--seed", "3")
    np.testing.assert_array_equal(images, same)
    assert again["expansion"] == record["expansion"]
    _, other = _sample(workdir, tmp_path / "c", "--seed", "4")
    assert not np.array_equal(images, other)


def test_identifiers_change_the_conditioning_text(workdir, tmp_path):
    one, a = _sample(workdir, tmp_path / "a", "--identifiers", "2")
    none, b = _sample(workdir, tmp_path / "b", "--identifiers", "none")
    assert one["identifiers"] == [2]
    assert one["conditioning_text"] == "<reward 2>, " + one["expansion"]
    assert none["conditioning_text"] == none["expansion"]
    assert not np.array_equal(a, b)  # the UNet sees the identifiers


def test_w2_zero_is_plain_cfg_on_the_prompt(workdir):
    loaded = policy.load(workdir)[0]
    try:
        centred = loaded.sample([PROMPT], identifiers=[0, 1], w1=5.0, w2=0.0, num_images=2,
                                seed=1)
        cfg = loaded.sample([PROMPT], identifiers=[], w1=5.0, w2=5.0, expand_prompt=False,
                            num_images=2, seed=1)
        full = loaded.sample([PROMPT], identifiers=[0, 1], w1=5.0, w2=5.0, num_images=2,
                             seed=1)
    finally:
        loaded.models.rewards.close()
    assert cfg.conditions == [PROMPT] and cfg.expansions == [""]
    np.testing.assert_allclose(centred.images, cfg.images, atol=1e-5)
    assert np.abs(full.images - cfg.images).max() > 1e-3  # the expansion does matter


def test_w1_zero_skips_the_original_branch_exactly(workdir):
    """``w1 = 0`` runs CFG(w2) on (null, expansion) instead of Eq. 5's three branches; the
    result equals Eq. 5 computed with all three."""
    loaded = policy.load(workdir)[0]
    try:
        short = loaded.sample([PROMPT], identifiers=[0, 1], w1=0.0, w2=5.0, num_images=2,
                              seed=1)
        m = loaded.models
        null = loaded.clip_ids([""], "null prompt")[0]
        original = loaded.clip_ids([PROMPT], "prompt")
        expanded = loaded.clip_ids(short.conditions, "conditioning")
        branches = np.stack([np.broadcast_to(null, original.shape), original, expanded], axis=1)
        key_images = jax.random.split(jax.random.key(1))[1]
        three = policy.draw(m.unet, m.text_encoder, m.vae, 2, m.latent_shape,
                            float(loaded.config.sample.eta), m.scaling_factor,
                            loaded.unet_params, m.text_params, m.vae_params, m.schedule,
                            PromptCentredGuidance(0.0, 5.0), branches, key_images)
    finally:
        loaded.models.rewards.close()
    np.testing.assert_allclose(short.images, np.asarray(three), atol=1e-5)


def test_base_differs_from_the_checkpoint(workdir, tmp_path):
    base, _ = _sample(workdir, tmp_path / "a", "--base")
    assert base["model"] == "base"
    loaded = policy.load(workdir, base=True)
    try:
        unet = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(r.unet_params)])
                for r in loaded]
    finally:
        loaded[0].models.rewards.close()
    assert [r.label for r in loaded] == ["step_2", "base"]
    assert not np.array_equal(*unet)  # two T2I updates moved the cross-attention


def test_evaluate_scores_original_prompts(workdir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    texts = [PROMPT, "a castle on a hill"]
    prompts.write_text("\n".join(texts) + "\n")
    out = tmp_path / "eval"
    record = evaluate.main(["--workdir", str(workdir), "--prompts", str(prompts), "--out",
                            str(out), "--base", "--num_images", "2", "--batch_prompts", "1",
                            "--seed", "7", "--identifiers", "1,3"])
    assert json.loads((out / "eval.json").read_text()) == record
    names = record["rewards"]
    assert names == ["aesthetics", "human_preference", "alignment", "sentiment"]
    assert set(record["models"]) == {"step_2", "base"}
    table = (out / "eval.md").read_text().splitlines()
    assert table[2] == ("| model | " + " | ".join(names)
                        + " | hypervolume | hypervolume_per_prompt |")
    assert [line.split(" | ")[0] for line in table[4:]] == ["| step_2", "| base"]
    # Recompute the checkpoint's rewards: 2 prompts in chunks of 1 (2 images padded to the 8
    # devices), rewards of the ORIGINAL prompt (conditions are the identified expansions).
    loaded = policy.load(workdir)[0]
    rewards = loaded.models.rewards
    try:
        rows, conditions = [], []
        for i, chunk in enumerate([texts[:1], texts[1:]]):
            s = loaded.sample(chunk, identifiers=[0, 2], w1=5.0, w2=5.0, num_images=2,
                              seed=scoring.chunk_seed(7, i))
            originals = [p for p in chunk for _ in range(2)]
            conds = [c for c in s.conditions for _ in range(2)]
            pad = -len(originals) % 8
            images = np.concatenate([s.images, np.repeat(s.images[-1:], pad, axis=0)])
            value = rewards(rewards.inputs(images, prompts=originals + originals[-1:] * pad,
                                           conditions=conds + conds[-1:] * pad))
            swapped = rewards(rewards.inputs(images, prompts=conds + conds[-1:] * pad,
                                             conditions=conds + conds[-1:] * pad))
            rows.append(np.asarray(value)[:len(originals)])
            conditions.append(np.asarray(swapped)[:len(originals)])
    finally:
        rewards.close()
    values = np.concatenate(rows)
    stats = record["models"]["step_2"]
    for k, name in enumerate(names):
        assert stats[name]["mean"] == pytest.approx(values[:, k].mean(), rel=1e-4, abs=1e-6)
        assert stats[name]["std"] == pytest.approx(values[:, k].std(), rel=1e-3, abs=1e-6)
    # Hypervolume of the checkpoint's images from the reference shared with the base model
    # (each reward's minimum over both models' images).
    reference = np.asarray(record["hypervolume_reference"])
    assert np.all(reference <= values.min(axis=0) + 1e-5)
    assert np.any(reference < values.min(axis=0) - 1e-7)  # the base model set some minimum
    assert stats["hypervolume"] == pytest.approx(front_hypervolume(values, reference), rel=1e-3)
    assert record["models"]["base"]["hypervolume"] > 0
    alignment = names.index("alignment")
    assert not np.allclose(np.concatenate(conditions)[:, alignment], values[:, alignment])


def test_per_prompt_hypervolume_weighs_every_prompt():
    """Two prompts of two images, two models, 2 rewards. Pooled from (0, 0), b's one far image
    (11, 11) wins; per prompt (references (0, 0) and (10, 10)), a's prompt-0 front wins."""
    a = np.array([[2.0, 1.0], [1.0, 2.0], [10.0, 10.0], [10.0, 10.0]])
    b = np.array([[0.0, 0.0], [0.5, 0.5], [11.0, 11.0], [10.0, 10.0]])
    results, reference = scoring.with_hypervolumes({"a": a, "b": b}, ["r", "s"],
                                                    num_images=2)
    assert reference == [0.0, 0.0]
    assert (results["a"]["hypervolume"], results["b"]["hypervolume"]) == (100.0, 121.0)
    # a: (3 + 0) / 2; b: (0.25 + 1) / 2.
    assert results["a"]["hypervolume_per_prompt"] == pytest.approx(1.5)
    assert results["b"]["hypervolume_per_prompt"] == pytest.approx(0.625)
    assert "hypervolume_per_prompt" not in scoring.with_hypervolumes({"a": a}, ["r", "s"])[0]["a"]
    with pytest.raises(ValueError, match="a: 4 reward rows do not split into prompts of 3"):
        scoring.per_prompt_hypervolumes({"a": a}, 3)
    with pytest.raises(ValueError, match="different numbers of prompts"):
        scoring.per_prompt_hypervolumes({"a": a, "b": b[:2]}, 2)


@pytest.mark.parametrize("spec, message", [("0,2", "expected integers 1..4"),
                                           ("1,1", "repeated"), ("1,x", "'x'"), ("", "''")])
def test_bad_identifiers_are_usage_errors(capsys, spec, message):
    with pytest.raises(SystemExit) as e:
        sample.identifiers_arg(sample.PROG, spec, 4)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_identifier_specs():
    assert sample.identifiers_arg(sample.PROG, "all", 4) == [0, 1, 2, 3]
    assert sample.identifiers_arg(sample.PROG, "none", 4) == []
    assert sample.identifiers_arg(sample.PROG, "3, 1", 4) == [2, 0]


@pytest.mark.parametrize("args, message", [
    (["--identifiers", "all"], "alone take 18 tokens"),  # 4 identifiers > the tiny context 16
    (["--step", "1"], "no such checkpoint"),
    (["--base", "--step", "2"], "exclude"),
    (["--num_images", "0"], "must be positive"),
    (["--num-images", "2"], "Unknown command line flag 'num-images'"),
    (["extra"], "unexpected arguments ['extra']"),
])
def test_sample_errors(workdir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sample.main(["--workdir", str(workdir), "--prompt", PROMPT, "--out", str(tmp_path),
                     *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "samples.json").exists()


def test_workdir_errors(workdir, tmp_path, capsys):
    cases = [(tmp_path / "missing", "no such directory"), (tmp_path, "config.json: missing")]
    bare = tmp_path / "untrained"
    bare.mkdir()
    shutil.copy(workdir / "config.json", bare)
    shutil.copytree(workdir / "tokenizers", bare / "tokenizers")
    cases.append((bare, "no checkpoint"))
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["--workdir", str(path), "--prompt", PROMPT, "--out",
                         str(tmp_path / "o")])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, path
    prompts = tmp_path / "blank.txt"
    prompts.write_text("a cat\n\na dog\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--workdir", str(workdir), "--prompts", str(prompts), "--out",
                       str(tmp_path / "o")])
    assert e.value.code == 2 and f"{prompts}:2: blank line" in capsys.readouterr().err


def test_final_evaluation_matches_evaluate(workdir, tmp_path):
    """train.py's closing base-vs-trained table is parrot_jax.evaluate on the held-out file with
    the same settings (identifiers, seed 0, paired noise)."""
    final = json.loads((workdir / "final_eval.json").read_text())
    names = final["details"]["rewards"]
    assert set(final) == {"base", "trained", "details"}
    assert list(final["trained"]) == names + ["hypervolume", "hypervolume_per_prompt"]
    record = evaluate.main(["--workdir", str(workdir), "--prompts",
                            final["details"]["prompts"], "--out", str(tmp_path), "--base",
                            "--num_images", "2", "--batch_prompts", "1", "--identifiers", "1,3"])
    for label, model in (("trained", "step_2"), ("base", "base")):
        for name in names:
            assert final[label][name] == pytest.approx(record["models"][model][name]["mean"],
                                                       rel=1e-5, abs=1e-7)
        for key in ("hypervolume", "hypervolume_per_prompt"):
            assert final[label][key] == pytest.approx(record["models"][model][key], rel=1e-5)
    assert final["details"]["hypervolume_reference"] == pytest.approx(
        record["hypervolume_reference"])
    text = final_table(final)
    assert text.count("\n") == len(names) + 3 and "| hypervolume |" in text
    # Each model's greedy PEN expansion of each held-out prompt, and how many differ.
    trained, base = policy.load(workdir, base=True)
    try:
        prompts = read_prompts(final["details"]["prompts"])
        want = {"trained": trained.expand(prompts), "base": base.expand(prompts)}
    finally:
        trained.models.rewards.close()
    assert final["details"]["expansions"] == want
    assert final["details"]["expansions_changed"] == sum(
        b != t for b, t in zip(want["base"], want["trained"]))


def test_sampling_and_scoring_compile_under_the_runs_matmul_precision(workdir, monkeypatch):
    """sample / evaluate compile as training did, under ``config.matmul_precision`` ('highest'
    in the smoke config; on a GPU or TPU the default would differ from final_eval.json): the
    PEN, the diffusion sampler and the reward heads all see it, and it is undone afterwards."""
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, jax.config.jax_default_matmul_precision))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(policy, "pen_sample", spy("pen", policy.pen_sample))
    monkeypatch.setattr(policy, "draw", spy("images", policy.draw))
    (loaded,) = policy.load(workdir)
    reward_set = type(loaded.models.rewards)
    monkeypatch.setattr(reward_set, "__call__", spy("rewards", reward_set.__call__))
    try:
        values = scoring.score(loaded, [PROMPT], identifiers=[1], w1=5.0, w2=5.0,
                               expand_prompt=True, greedy=True, num_images=2, seed=0,
                               batch_prompts=1)
    finally:
        loaded.models.rewards.close()
    assert values.shape == (2, len(loaded.models.rewards.names))
    assert loaded.config.matmul_precision == "highest"
    assert sorted({name for name, _ in seen}) == ["images", "pen", "rewards"]
    assert {precision for _, precision in seen} == {"highest"}
    assert jax.config.jax_default_matmul_precision is None


def test_a_policy_loads_without_its_optimizer(workdir, monkeypatch):
    """``policy.load`` reads only the checkpoint's trained T2I weights and PEN LoRA: it builds
    no training state and restores no optimizer moment, and its weights are the checkpoint's."""
    import orbax.checkpoint as ocp

    from parrot_jax import workdir as workdirs
    from parrot_jax.training import state as training_state
    from parrot_jax.training import step

    def refuse(*args, **kwargs):
        raise AssertionError("policy.load built training state")

    monkeypatch.setattr(step, "init_train_state", refuse)
    monkeypatch.setattr(training_state, "initial_state", refuse)
    restored = []
    original = ocp.PyTreeCheckpointer.restore

    def spy(self, path, *args, **kwargs):
        out = original(self, path, *args, **kwargs)
        restored.append(out)
        return out

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    (loaded,) = policy.load(workdir)
    loaded.models.rewards.close()
    (parts,) = restored
    assert set(parts) == {"t2i", "pen"}
    assert set(parts["t2i"]) == {"trainable"} and set(parts["pen"]) == {"lora"}
    # The trained cross-attention is the checkpoint's; every other UNet weight is the base's.
    whole = workdirs.restore_parts(workdir, 2, ("t2i/trainable",))["t2i"]["trainable"]
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(loaded.unet_params, sep="/")
    assert whole and all(np.array_equal(flat[k], v) for k, v in whole.items())
    with pytest.raises(ValueError, match="the checkpoint has no"):
        workdirs.restore_parts(workdir, 2, ("t2i/no_such_part",))
