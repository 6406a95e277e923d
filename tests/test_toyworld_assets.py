"""The shipped toy-world assets: they match their manifest and the current build config, load
through the same loaders as real checkpoints, behave like trained models, and drive
``train.py``'s default config end to end; the build itself runs (in its quick form)."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parrot_jax import hub
from parrot_jax.toyworld import assets, build, captions, render, world

ROOT = Path(__file__).resolve().parents[1]


def _toy_config(arg):
    spec = importlib.util.spec_from_file_location("toy_config", ROOT / "configs" / "toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_shipped_assets_match_manifest_and_build_config():
    manifest = assets.verify()
    # Built by the current code's defaults: a changed default without a rebuild fails here.
    config = build._plain(build.BuildConfig())
    assert manifest["build_config"] == json.loads(json.dumps(config))
    assert manifest["config_hash"] == assets.config_hash(config)
    m = manifest["metrics"]
    assert set(m) == {"clip", "heads", "pen", "vae", "unet"}
    # What the models reached at build time (their trainers compute these on held-out data).
    assert m["clip"]["zero_shot_colour"] > 0.9 and m["clip"]["zero_shot_shape"] > 0.5
    assert m["heads"]["preference_eval_accuracy"] > m["heads"]["preference_initial_accuracy"]
    assert m["heads"]["sentiment_eval_accuracy"] > m["heads"]["sentiment_majority_accuracy"]
    assert m["pen"]["eval_loss"] < 0.5 * m["pen"]["initial_eval_loss"]
    assert m["pen"]["expansion_ok"] > 0.9
    assert m["vae"]["eval_psnr"] > 20.0
    assert m["unet"]["sample_colour_acc"] > 0.5
    assert sum(manifest["seconds"].values()) < 3600


def test_tampering_is_detected(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(assets.ASSETS, copy)
    path = copy / assets.REWARDS / "sentiment.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    (copy / assets.HELDOUT).unlink()
    (copy / "extra.txt").write_text("x")
    with pytest.raises(assets.AssetError) as e:
        assets.verify(copy)
    message = str(e.value)
    assert "rewards/sentiment.safetensors: contents differ" in message
    assert f"{assets.HELDOUT}: missing" in message and "extra.txt: not in the manifest" in message


@pytest.fixture(scope="module")
def rewards():
    reward_set = assets.load_rewards()
    yield reward_set
    reward_set.close()


def test_rewards_are_trained_models(rewards):
    """On rendered scenes, the learned heads rank as their labels do: alignment prefers the
    prompt's own image, human preference too, aesthetics follows contrast."""
    rng = np.random.default_rng(0)
    scenes = world.sample_scenes(rng, 48)
    images = render.render(scenes, rng)
    prompts = captions.user_prompts(scenes, rng, p_background=0.0)
    shuffled = prompts[1:] + prompts[:1]  # each image with another scene's prompt
    names = list(rewards.names)
    assert names == ["aesthetics", "human_preference", "alignment", "sentiment"]
    own = np.asarray(rewards(rewards.inputs(images, prompts=prompts, conditions=prompts)))
    other = np.asarray(rewards(rewards.inputs(images, prompts=shuffled, conditions=shuffled)))
    differs = np.array([p != s for p, s in zip(prompts, shuffled)])
    for name in ("alignment", "human_preference"):
        k = names.index(name)
        assert np.mean(own[differs, k] > other[differs, k]) > 0.8, name
    from parrot_jax.toyworld import labels

    aesthetic = own[:, names.index("aesthetics")]
    assert np.corrcoef(aesthetic, labels.aesthetic_label(scenes))[0, 1] > 0.5


def test_shipped_models_load_as_real_checkpoints():
    """The pipeline and PEN folders are ordinary diffusers / transformers folders."""
    root = assets.ASSETS
    unet, _ = hub.load_unet(root / assets.PIPELINE, subfolder="unet")
    vae, _ = hub.load_vae(root / assets.PIPELINE, subfolder="vae")
    text, _ = hub.load_clip_text(root / assets.PIPELINE, subfolder="text_encoder")
    assert set(unet.config.cross_attention_dim) == {text.config.hidden_size}
    assert unet.config.in_channels == vae.config.latent_channels
    tokenizer = hub.load_tokenizer(root / assets.PIPELINE, subfolder="tokenizer")
    ids = tokenizer("<reward 1>, a red circle")["input_ids"]
    assert len(ids) == 2 + 1 + 1 + 3  # start, identifier, comma, three words, end
    pen, _ = hub.load_t5(root / assets.PEN)
    assert pen.config.vocab_size >= len(hub.load_tokenizer(root / assets.PEN))
    held = assets.read_prompt_file(root, assets.HELDOUT)
    train = set(assets.read_prompt_file(root, assets.PROMPTS))
    assert held and not train & set(held)
    pairs = {(captions.parse(p)["colour"], captions.parse(p)["shape"]) for p in held}
    assert not any((captions.parse(p)["colour"], captions.parse(p)["shape"]) in pairs
                   for p in train)  # held-out (colour, shape) pairs never appear in RL


@pytest.fixture(scope="module")
def toy_smoke(tmp_path_factory):
    """train.py's default (configs/toy.py), smoke-sized: (workdir, train_and_evaluate's result)."""
    from parrot_jax.training import train_and_evaluate

    workdir = tmp_path_factory.mktemp("toy_smoke")
    return workdir, train_and_evaluate(_toy_config("smoke"), workdir)


def test_default_config_runs_parrot_and_the_final_evaluation(toy_smoke):
    """train.py's default (configs/toy.py), smoke-sized, on 8 simulated devices: two
    iterations, then base vs trained on the held-out prompts with the pixel oracle."""
    tmp_path, result = toy_smoke
    assert result["step"] == 2 and result["t2i/ratio_first"] == pytest.approx(1.0)
    final = json.loads((tmp_path / "final_eval.json").read_text())
    assert final == result["final_eval"]
    names = ["aesthetics", "human_preference", "alignment", "sentiment"]
    for label in ("base", "trained"):
        assert set(names + ["hypervolume", "hypervolume_per_prompt"]) <= set(final[label])
        assert {k for k in final[label] if k.startswith("oracle/")} == {
            f"oracle/{m}" for m in ("contrast", "saturation", "hue_error", "shape_iou", "area",
                                    "centroid_offset", "sharpness")}
        assert all(np.isfinite(v) for v in final[label].values())
    assert final["details"]["identifiers"] == [1, 2, 3, 4]
    assert (tmp_path / "eval" / "grid_000002.png").is_file()


def test_modifier_landscape_cli_on_a_toy_run(toy_smoke, capsys):
    """``python -m parrot_jax.toyworld.modifiers``: sampled PEN expansions rendered under each
    identifier; the table has a row per measured modifier value, each effect finite."""
    from parrot_jax.analysis import modifiers

    workdir, _ = toy_smoke
    effects = modifiers.main(["--workdir", str(workdir), "--trained", "--num_prompts", "3",
                              "--repeats", "2", "--min_count", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("24 images (trained models)")  # 3 prompts x 2 x 4 identifiers
    assert out[1] == ("| modifier | share | aesthetics | human_preference | alignment | "
                      "sentiment | own | equal |")
    assert effects and len(out) == 3 + len(effects)
    for e in effects:
        assert e.attribute in captions.OPTIONAL and 2 <= e.count <= 22
        assert np.all(np.isfinite(e.rewards)) and np.isfinite(e.own) and np.isfinite(e.equal)


def test_conflict_cli_on_a_toy_run(toy_smoke, capsys):
    """``python -m parrot_jax.analysis.conflict --oracle``: groups sampled as training samples
    them, one per prompt and identifier; shares in [0, 1], correlations in [-1, 1] with a unit
    diagonal; a row per pixel-oracle metric."""
    from parrot_jax.analysis import conflict

    workdir, _ = toy_smoke
    c = conflict.main(["--workdir", str(workdir), "--num_prompts", "3", "--num_images", "4",
                       "--oracle"])
    out = capsys.readouterr().out
    assert out.startswith("12 groups of 4 images (untrained models)")  # 3 prompts x 4 ids
    oracle_rows = [line for line in out.splitlines()[out.splitlines().index("Pixel oracle:"):]
                   if line.startswith("| ") and not line.startswith("| metric")]
    assert [row.split(" | ")[0][2:] for row in oracle_rows] == [
        "contrast", "saturation", "hue_error", "shape_iou", "area", "centroid_offset",
        "sharpness"]
    assert np.all((c.within_share > 0) & (c.within_share < 1))
    for m in (c.within_corr, c.between_corr):
        np.testing.assert_allclose(np.diag(m), 1.0)
        assert np.all(np.abs(m) <= 1 + 1e-9)
    assert 0.25 <= c.non_dominated <= 1.0  # at least one image of four survives per group


def test_transfer_cli_on_a_toy_run(toy_smoke, capsys, monkeypatch):
    """``python -m parrot_jax.analysis.transfer``: a step per identifier on the toy UNet's
    cross-attention; a finite row per reward, a column per identifier and one for all of them,
    and each row's ratios to its own identifier's change (1 on the diagonal). The text contexts
    and the table
    are computed under the run's matmul_precision ('highest'), as training was."""
    import jax

    from parrot_jax import policy
    from parrot_jax.analysis import transfer

    seen = []
    for module, name in ((transfer, "transfer_table"), (policy, "group_contexts")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, jax.config.jax_default_matmul_precision))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    workdir, _ = toy_smoke
    table = transfer.main(["--workdir", str(workdir), "--trained", "--num_prompts", "2",
                           "--num_images", "4"])
    assert {n for n, _ in seen} == {"transfer_table", "group_contexts"}
    assert all(p == "highest" for _, p in seen), seen
    assert jax.config.jax_default_matmul_precision is None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 prompts x 4 images per text, step 0.05 (trained models)"
    assert table.shape == (4, 5) and np.all(np.isfinite(table))
    assert np.any(table != 0)
    header = "| step for | <reward 1> | <reward 2> | <reward 3> | <reward 4> | all |"
    assert out.count(header) == 2
    ratios = out[out.index(header, out.index(header) + 1) + 2:]
    names = ["aesthetics", "human_preference", "alignment", "sentiment"]
    for k, (name, row) in enumerate(zip(names, ratios)):
        cells = row.split(" | ")
        assert cells[0] == f"| {name}"
        assert table[k, k] == 0 or cells[1 + k] == "1.00"


def test_parrot_improves_the_toy_rewards(tmp_path):
    """The end-to-end check: a short Parrot run on the toy world moves
    the held-out front out (hypervolume up), with paired noise against the base model. Measured
    when this test was written (seed 0): 32.35 -> 33.93; with every advantage's sign flipped,
    39.04 -> 37.68 (reward means alone did not tell the two apart at this size)."""
    from parrot_jax.training import train_and_evaluate

    config = _toy_config("")
    config.num_groups = 4  # 32 images per iteration, 2 minibatches of 16 on 8 devices
    config.num_iterations = 12
    config.sample.num_steps = 10
    config.checkpoint_every = 12
    config.eval_every = 12
    config.final_eval.num_images = 4
    config.final_eval.image_metrics = ""
    final = train_and_evaluate(config, tmp_path)["final_eval"]
    assert final["trained"]["hypervolume"] > final["base"]["hypervolume"], final


def test_quick_build_writes_loadable_verified_assets(tmp_path, capsys):
    out = tmp_path / "assets"
    manifest = build.main(["--quick", "--out", str(out)])
    assert assets.verify(out) == manifest
    assert manifest["build_config"] == json.loads(json.dumps(build._plain(
        build.BuildConfig.quick())))
    assert set(manifest["seconds"]) == {"tokenizers", "clip", "heads", "pen", "vae", "unet"}
    reward_set = assets.load_rewards(out)
    reward_set.close()
    # A second build into the same folder is refused without --overwrite; nothing changes.
    before = assets.file_hashes(out)
    with pytest.raises(SystemExit) as e:
        build.main(["--quick", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert assets.file_hashes(out) == before


def test_build_config_is_recorded_field_by_field():
    quick = build.BuildConfig.quick()
    plain = build._plain(quick)
    assert plain["clip"]["steps"] == quick.clip.steps == 3
    assert set(plain) == {f.name for f in dataclasses.fields(build.BuildConfig)}
