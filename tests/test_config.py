"""The config schema (``parrot_jax.config``), the command-line convention (``parrot_jax.cli``) and
the plugin registry (``parrot_jax.plugins``)."""

import importlib.util
import json
from pathlib import Path

import pytest
from absl import flags

from parrot_jax import cli, config_files, plugins
from parrot_jax import config as schema
from parrot_jax.workdir import config_dict

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["configs/tiny.py", "configs/tiny.py:smoke,no_pareto", "configs/toy.py",
         "configs/toy.py:smoke,weighted_sum", "configs/sd15.py", "configs/sd15.py:single"]


@pytest.mark.parametrize("spec", SPECS)
def test_shipped_configs_hold_every_field_and_pass_the_checks(spec):
    config = schema.check(config_files.load(ROOT / spec))
    names = set(schema.flat(config_dict(config)))
    for f in schema.FIELDS:
        assert f.name in names or any(n.startswith(f.name) for n in names), f.name


def test_defaults_are_the_papers_and_sd15_is_the_defaults():
    c = schema.check(schema.defaults())
    assert (c.num_groups * c.images_per_group, c.num_minibatches) == (256, 4)
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.eta) == (50, 5.0, 1.0)
    assert (c.t2i.trainable, c.t2i.learning_rate, c.t2i.clip_range) == (
        "cross_attention", 1e-5, 1e-4)
    sd15 = config_files.load(ROOT / "configs/sd15.py")
    diff = {k: v for k, v in schema.flat(config_dict(sd15)).items()
            if schema.flat(config_dict(c))[k] != v}
    # The paper's settings, run in bfloat16, in chunks a v5e chip holds with room to spare.
    assert diff == {"model.dtype": "bfloat16", "sample.microbatch": 8, "t2i.microbatch": 2}


def test_presets_and_variants():
    c = schema.defaults()
    schema.apply_presets(c, ["smoke", "no_pareto", "t2i_only"])  # 'smoke' is not a preset
    assert not c.advantage.pareto and not c.pen.train and c.t2i.train
    with pytest.raises(schema.ConfigError, match=r"unknown configs/x.py variant\(s\) \['nope'\]"):
        schema.variants("no_pareto,nope", ("no_pareto",), "configs/x.py")
    with pytest.raises(schema.ConfigError, match="config.t2i.nope: not a config field"):
        schema.apply(c, {"t2i.nope": 1})


@pytest.mark.parametrize("field, value, message", [
    ("t2i.learning_rate", -1.0, r"config\.t2i\.learning_rate=-1\.0: a positive number"),
    ("num_groups", 0, r"config\.num_groups=0: a positive integer"),
    ("num_groups", True, r"config\.num_groups=True: a positive integer"),
    ("advantage.mode", "pareto", r"config\.advantage\.mode='pareto': one of \('paper'"),
    ("mesh", {"data": -1, "model": 2}, r"config\.mesh=.*axis sizes of \('data'"),
    ("eval_prompts", ("a", ""), r"config\.eval_prompts=.*non-empty prompts"),
    ("num_minibatches", 3, r"num_minibatches=3 must divide the 256 images"),
    ("pen.expansions_per_prompt", 3, r"expansions_per_prompt=3 must divide num_groups=4"),
])
def test_bad_values_name_the_field(field, value, message):
    c = schema.defaults()
    if field == "mesh":
        c.mesh = value
    else:
        schema.apply(c, {field: value})
    with pytest.raises(schema.ConfigError, match=message):
        schema.check(c)


def test_unknown_and_missing_fields_are_refused():
    c = schema.defaults()
    c.t2i.learning_rates = 1e-5
    with pytest.raises(schema.ConfigError,
                       match=r"unknown config field\(s\) \['t2i\.learning_rates'\]"):
        schema.check(c)
    c = schema.defaults()
    del c.sample["eta"]
    with pytest.raises(schema.ConfigError, match=r"config\.sample\.eta is missing"):
        schema.check(c)
    c = schema.defaults()
    c.model.tiny.unet.anything = 1  # free-form subtrees take any key
    schema.check(c)


def test_an_older_config_json_upgrades():
    """Fields added since take the value their absence meant; final_eval.oracle became
    final_eval.image_metrics; lists are tuples again; the result passes the checks."""
    saved = config_dict(config_files.load(ROOT / "configs/toy.py"))
    for name in schema.ADDED:
        *parents, leaf = name.split(".")
        section = saved
        for p in parents:
            section = section[p]
        del section[leaf]
    saved["final_eval"]["oracle"] = True
    c = schema.upgrade(json.loads(json.dumps(saved)))
    assert c.final_eval.image_metrics == "toy_oracle" and "oracle" not in c.final_eval
    assert c.matmul_precision == "default" and c.t2i.warmup_steps == 0 and c.t2i.remat
    assert isinstance(c.eval_prompts, tuple) and isinstance(c.advantage.weights, tuple)
    assert schema.resumable("final_eval.prompts") and schema.resumable("mesh.data")
    assert not schema.resumable("t2i.learning_rate") and not schema.resumable("nope")


def test_markdown_lists_every_field():
    text = schema.markdown()
    assert all(f"| `{f.name.rstrip('.')}` |" in text for f in schema.FIELDS)
    assert schema.main(["--markdown"]) == text


def _define(values, argv):
    flags.DEFINE_string("workdir", None, "where", flag_values=values, required=True)
    flags.DEFINE_integer("num_images", 4, "how many", flag_values=values)


@pytest.mark.parametrize("argv, message", [
    (["--num_images", "2"], "Flag --workdir must have a value other than None"),
    (["--workdir=w", "--num-images=2"], "Unknown command line flag 'num-images'"),
    (["--workdir=w", "--num_images=two"], "flag --num_images=two"),
    (["--workdir=w", "extra"], "unexpected arguments ['extra']"),
])
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.parse(_define, argv, prog="tool", doc="A tool.")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("tool: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_help_and_values(capsys):
    values = cli.parse(_define, ["--workdir=w", "--num_images", "3"], prog="tool", doc="A tool.")
    assert (values.workdir, values.num_images) == ("w", 3)
    with pytest.raises(SystemExit) as e:
        cli.parse(_define, ["--help"], prog="tool", doc="A tool.")
    out = capsys.readouterr().out
    assert e.value.code == 0 and "A tool." in out and "--num_images" in out


def _train_main():
    """train.py's ``main`` (the repository root is not on sys.path under plain pytest)."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
@pytest.mark.parametrize("tool, argv, key, near", [
    ("train", ["--config.sample.num_stepz=3"], "sample.num_stepz", "sample.num_steps"),
    ("train", ["--config.sampel.num_steps", "3"], "sampel.num_steps", "sample.num_steps"),
    ("train", ["--config", "configs/tiny.py:smoke", "--config.num_steps=3"], "num_steps",
     "sample.num_steps"),
    ("train", ["--config.no_such_key=1"], "no_such_key",
     "no close match; config has: advantage, "),
    ("train", ["--noconfig.pen.trainn"], "pen.trainn", "pen.train"),
    ("pen_sft", ["--config", "configs/pen_sft.py:tiny", "--config.optim.learning_ratez=1"],
     "optim.learning_ratez", "optim.learning_rate"),
])
def test_unknown_config_key_is_one_line_naming_the_nearest(tool, argv, key, near, capsys,
                                                           tmp_path, monkeypatch):
    """An unknown --config.KEY (top-level, nested, a typo of a section) is refused by the tool's
    main with one stderr line naming the key and the nearest known keys, status 2, and nothing
    is written (no workdir)."""
    from parrot_jax.training import pen_sft

    monkeypatch.chdir(ROOT)  # the relative config paths, as typed in a shell
    main = _train_main() if tool == "train" else pen_sft.main
    with pytest.raises(SystemExit) as e:
        main([*argv, f"--workdir={tmp_path / 'w'}"])
    captured = capsys.readouterr()
    prog = "python train.py" if tool == "train" else pen_sft.PROG
    assert e.value.code == 2 and captured.out == ""
    assert captured.err.startswith(f"{prog}: error: unknown config key {key!r} (")
    assert near in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "w").exists()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_config_file_errors_are_one_line(capsys):
    """A config file that raises (here: a variant it does not have) is refused with the line
    that names the problem, not the traceback ml_collections wraps around it; a known override
    with a bad value keeps absl's message."""
    main = _train_main()
    for argv, message in [
        (["--config", str(ROOT / "configs/toy.py:nope")],
         "ConfigError: unknown configs/toy.py variant(s) ['nope']"),
        (["--config.num_groups=abc"],
         "flag --config.num_groups=abc: invalid literal for int() with base 10: 'abc'"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("python train.py: error: ")
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_plugins_are_found_by_name():
    assert {"parrot", "toy"} <= set(plugins.registered(plugins.REWARD_SETS))
    (oracle,) = plugins.image_metrics("toy_oracle")
    assert oracle.__module__ == "parrot_jax.toyworld.oracle"
    assert plugins.image_metrics("") == []
    with pytest.raises(plugins.PluginError, match=r"no installed package registers 'nope' .*"
                                                  r"registered: \[.*'toy'"):
        plugins.reward_set("nope")
    with pytest.raises(plugins.PluginError, match=r"config\.final_eval\.image_metrics='x':"):
        plugins.image_metrics("x")


def test_update_settings_from_the_schema():
    """``t2i.rescore='auto'`` re-scores exactly when activations are narrower than float32;
    ``t2i.microbatch`` (per device) becomes the update's chunk count, and must divide."""
    from parrot_jax.training.settings import t2i_update

    c = schema.defaults()  # 256 images, 4 minibatches: 64 per minibatch
    assert not t2i_update(c).rescore and t2i_update(c).microbatches == 1
    c.model.dtype = "bfloat16"
    assert t2i_update(c).rescore
    c.t2i.rescore = "off"
    assert not t2i_update(c).rescore
    c.t2i.microbatch = 2
    assert t2i_update(c, devices=8).microbatches == 4  # 8 images per device, 2 at a time
    c.t2i.microbatch = 3
    with pytest.raises(schema.ConfigError, match="config.t2i.microbatch=3"):
        t2i_update(c, devices=8)
    c.t2i.microbatch = 16  # more than the 8 a device holds: all at once
    assert t2i_update(c, devices=8).microbatches == 1


def test_rollout_chunks_frozen_dtype_and_attention_from_the_schema():
    """``sample.microbatch`` (per device) becomes the rollout's chunk count and must divide;
    ``model.frozen_dtype='auto'`` follows ``model.dtype``; ``model.attention='auto'`` is the
    platform's kernel, and an explicit one that cannot run there is refused naming the field."""
    import jax.numpy as jnp

    from parrot_jax import loading
    from parrot_jax.training.settings import rollout_chunks

    c = schema.defaults()  # 256 images per iteration
    assert rollout_chunks(c, devices=8) == 1
    c.sample.microbatch = 8
    assert rollout_chunks(c, devices=8) == 4  # 32 images per device, 8 at a time
    c.sample.microbatch = 5
    with pytest.raises(schema.ConfigError, match="config.sample.microbatch=5 does not divide"):
        rollout_chunks(c, devices=8)
    c.sample.microbatch = 8
    assert rollout_chunks(c, devices=64) == 1  # a v5e-64 holds 4 per chip: all at once
    assert loading.frozen_dtype(c) == jnp.float32
    c.model.dtype = "bfloat16"
    assert loading.frozen_dtype(c) == jnp.bfloat16
    c.model.frozen_dtype = "float32"
    assert loading.frozen_dtype(c) == jnp.float32
    assert [loading.attention_impl(c, p) for p in ("tpu", "gpu", "cpu")] == [
        "flash", "cudnn", "xla"]
    c.model.attention = "flash"
    with pytest.raises(ValueError, match="config.model.attention: attention 'flash' is a TPU"):
        loading.attention_impl(c, "cpu")
