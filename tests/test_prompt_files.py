"""Every prompt list is checked whole when it is loaded, against the limits of where it is used:
the RL prompts (``data.prompts``) and ``eval_prompts`` through the PEN (the templated prompt in
``data.max_prompt_length`` tokens), the held-out prompts (``final_eval.prompts``,
``parrot_jax.evaluate --prompts``, ``parrot_jax.sample --prompt``) also through the text
encoder's context. One one-line ``DatasetError`` names the first prompt over a limit
(``file:line``, ``config.eval_prompts[i]``, a TFDS record), its count, the limit and how many
prompts are over; a run fails at set-up, before any iteration, leaving its workdir empty.

Tiny smoke models (configs/tiny.py): the PEN reads 48 tokens (``data.max_prompt_length``), the
text encoder 16 (``model.tiny.context_length``). Nothing here compiles a training step.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from parrot_jax import evaluate, sample
from parrot_jax.data import prompts as prompt_lists
from parrot_jax.data.promptist import DatasetError
from parrot_jax.training import loop, train_and_evaluate
from parrot_jax.workdir import checkpoint_manager, save

ROOT = Path(__file__).resolve().parents[1]
FITS = list(prompt_lists.BUILTIN_PROMPTS[:12])  # 12 short prompts: each fits every limit
LONG = " ".join(["a tall stone castle on a green hill under a cloudy sky at dawn"] * 6)
WORDY = " ".join(["a red circle on a white background"] * 3)  # 21 words: 23 CLIP tokens
PEN = r"(\d+) PEN tokens \(templated\), more than config\.data\.max_prompt_length=48"


def _config(**fields):
    """The tiny smoke config with ``fields`` set (dotted names as keywords' ``__``)."""
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    for name, value in fields.items():
        *path, last = name.split("__")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def _file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _with(lines: list[str], **replaced: str) -> list[str]:
    """``lines`` with 1-based line ``_<n>`` replaced."""
    out = list(lines)
    for key, text in replaced.items():
        out[int(key[1:]) - 1] = text
    return out


def _message(error: pytest.ExceptionInfo, pattern: str) -> re.Match:
    text = str(error.value)
    assert "\n" not in text, text
    match = re.fullmatch(pattern, text)
    assert match, text
    return match


def test_an_overlong_rl_prompt_stops_the_run_before_its_first_iteration(tmp_path):
    """Lines 9 and 11 of the RL prompt file are too long. The old code drew line 11 first, at
    iteration 2 (``prompt 1 has ...``: its place in the batch), and would have met line 9 at
    iteration 8; now the run stops at set-up naming line 9, and writes nothing."""
    path = _file(tmp_path / "prompts.txt", _with(FITS, _9=LONG, _11=LONG))
    workdir = tmp_path / "run"
    config = _config(data__prompts=str(path), num_iterations=10)
    with pytest.raises(DatasetError) as error:
        train_and_evaluate(config, workdir)
    match = _message(error, re.escape(f"{path}:9: ") + PEN
                     + re.escape(" (2 of 12 prompts too long; nothing is truncated)"))
    assert int(match[1]) > 48
    # No config.json, metrics or checkpoints, and not the tokenizers built from these prompts.
    assert sorted(workdir.iterdir()) == []


def test_an_overlong_eval_prompt_fails_at_setup(tmp_path):
    config = _config(eval_prompts=("a castle on a hill", LONG))
    with pytest.raises(DatasetError) as error:
        loop.setup(config, tmp_path)
    _message(error, re.escape("config.eval_prompts[1]: ") + PEN
             + re.escape(" (1 of 2 prompts too long; nothing is truncated)"))
    assert sorted(tmp_path.iterdir()) == []


def test_an_overlong_heldout_prompt_fails_at_setup(tmp_path):
    """The closing evaluation feeds each held-out prompt to the PEN and, as itself, to the text
    encoder (Eq. 5's original-prompt branch): both limits, checked at set-up."""
    held_out = _file(tmp_path / "held_out.txt",
                     ["a castle on a hill", LONG, "a cat", WORDY, "a dog"])
    config = _config(final_eval__prompts=str(held_out))
    with pytest.raises(DatasetError) as error:
        loop.setup(config, tmp_path / "a")
    _message(error, re.escape(f"{held_out}:2: ") + PEN + r"; (\d+) CLIP tokens, more than the "
             r"text encoder's context length 16 \(2 of 5 prompts too long; nothing is "
             r"truncated\)")
    assert not (tmp_path / "a").exists() or sorted((tmp_path / "a").iterdir()) == []
    # Within the PEN's limit, line 4 is still longer than the text encoder's context.
    config = _config(final_eval__prompts=str(held_out), data__max_prompt_length=512)
    with pytest.raises(DatasetError) as error:
        loop.setup(config, tmp_path / "b")
    _message(error, re.escape(f"{held_out}:2: ") + r"\d+ CLIP tokens, more than the text "
             r"encoder's context length 16 \(2 of 5 prompts too long; nothing is truncated\)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir whose prompt files all fit (set-up passes and writes config.json), with the
    untrained state saved as checkpoint 1 (for sample / evaluate, without training)."""
    root = tmp_path_factory.mktemp("fits")
    config = _config(data__prompts=str(_file(root / "prompts.txt", FITS)),
                     final_eval__prompts=str(_file(root / "held_out.txt", FITS[:4])))
    workdir = root / "run"
    _, state = loop.setup(config, workdir)
    assert (workdir / "config.json").is_file()
    manager = checkpoint_manager(workdir, 1)
    save(manager, 1, state)
    manager.wait_until_finished()
    manager.close()
    return workdir


def test_evaluate_and_sample_name_the_prompt_before_sampling(run_dir, tmp_path, capsys):
    path = _file(tmp_path / "eval.txt", ["a cat", "a dog", LONG, WORDY])
    common = ["--workdir", str(run_dir), "--out", str(tmp_path / "out")]
    expected = [  # (argv, the one line after "<tool>: error: ")
        (["--prompts", str(path)], re.escape(f"--prompts: {path}:3: ") + PEN
         + r"; \d+ CLIP tokens, more than the text encoder's context length 16 "
         r"\(2 of 4 prompts too long; nothing is truncated\)"),
        (["--prompts", str(path), "--noexpand"],  # the PEN does not read them
         re.escape(f"--prompts: {path}:3: ") + r"\d+ CLIP tokens, more than the text encoder's "
         r"context length 16 \(2 of 4 prompts too long; nothing is truncated\)"),
    ]
    for argv, pattern in expected:
        with pytest.raises(SystemExit) as e:
            evaluate.main([*common, *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(re.escape(f"{evaluate.PROG}: error: ") + pattern, err), err
    with pytest.raises(SystemExit) as e:
        sample.main([*common, "--prompt", LONG])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(f"{sample.PROG}: error: --prompt: ") + PEN
                        + r"; \d+ CLIP tokens, more than the text encoder's context length 16 "
                        r"\(nothing is truncated\)", err), err
    assert not (tmp_path / "out").exists()


def test_the_check_counts_what_tokenisation_refuses(run_dir):
    """At the limit passes, one token over fails: exactly where ``tokenize_prompts`` (the PEN)
    and ``Policy.clip_ids`` (the text encoder) would refuse the prompt later."""
    from parrot_jax import policy
    from parrot_jax.expansion import tokenize_prompts
    from parrot_jax.expansion.template import prompt_token_counts

    (base,) = policy.load(run_dir, base=True, trained=False)
    base.models.rewards.close()
    m = base.models
    texts = ["a cat", FITS[0], WORDY, LONG]
    counts = prompt_token_counts(m.pen_tokenizer, texts)
    for text, n in zip(texts, counts):
        listed = prompt_lists.PromptList([text], ["x.txt:1"])
        prompt_lists.check_prompt_lengths(listed, [prompt_lists.pen_limit(m.pen_tokenizer, n)])
        tokenize_prompts(m.pen_tokenizer, [text], n)  # fits: both agree
        with pytest.raises(DatasetError, match=rf"^x\.txt:1: {n} PEN tokens \(templated\), "
                           rf"more than config\.data\.max_prompt_length={n - 1} "):
            prompt_lists.check_prompt_lengths(
                listed, [prompt_lists.pen_limit(m.pen_tokenizer, n - 1)])
        with pytest.raises(ValueError, match=f"has {n}"):
            tokenize_prompts(m.pen_tokenizer, [text], n - 1)
    clip = [prompt_lists.clip_limit(m.clip_tokenizer, m.context_length)]
    for text in texts:
        listed = prompt_lists.PromptList([text], ["x.txt:1"])
        try:
            base.clip_ids([text], "prompt")
        except policy.RunError:
            with pytest.raises(DatasetError, match="CLIP tokens"):
                prompt_lists.check_prompt_lengths(listed, clip)
        else:
            prompt_lists.check_prompt_lengths(listed, clip)


def test_prompt_origins_are_real_lines_and_tfds_records(tmp_path):
    """A file's origins are its own line numbers; a TFDS split's distinct prompts name their
    first record (and the line it was built from)."""
    from parrot_jax.data import tfds_promptist

    path = _file(tmp_path / "p.txt", ["a cat", "a dog"])
    assert prompt_lists.load_prompts(str(path)).origins == (f"{path}:1", f"{path}:2")
    assert prompt_lists.config_prompt_list(("x", "y"), "eval_prompts").origins == (
        "config.eval_prompts[0]", "config.eval_prompts[1]")
    manual = tmp_path / "manual"
    manual.mkdir()
    rows = [("a cat", "a cat, art"), ("a cat", "a cat, 4k"), ("a dog", "a dog, art"),
            (LONG, "x")]
    (manual / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "expansion": e}) + "\n" for p, e in rows))
    tfds_promptist.build(manual, tmp_path / "data")
    spec = f"tfds:{tmp_path / 'data'}"
    listed = prompt_lists.load_prompts(spec)
    assert listed == ["a cat", "a dog", LONG]
    assert listed.origins == tuple(f"{spec} record {i} (from {manual / 'train.jsonl'}:{i + 1})"
                                   for i in (0, 2, 3))
    limit = prompt_lists.TokenLimit("words", 10, "ten words", lambda t: [len(s.split()) for s in t])
    with pytest.raises(DatasetError) as error:
        prompt_lists.check_prompt_lengths(listed, [limit])
    assert str(error.value) == (f"{spec} record 3 (from {manual / 'train.jsonl'}:4): "
                                f"{len(LONG.split())} words, more than ten words (1 of 3 "
                                "prompts too long; nothing is truncated)")


def test_final_evaluation_of_a_workdir_checks_its_file_first(run_dir, tmp_path):
    """``final_evaluation_of`` (a finished workdir, its config's held-out file) checks the
    whole file before either model samples, and writes no final_eval.json."""
    import shutil

    from parrot_jax.training.final_eval import FINAL_EVAL_FILE, final_evaluation_of

    held_out = _file(tmp_path / "held_out.txt", ["a cat", "a dog", "a cup of coffee", LONG])
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["final_eval"]["prompts"] = str(held_out)
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DatasetError) as error:
        final_evaluation_of(workdir)
    _message(error, re.escape(f"{held_out}:4: ") + PEN + r"; \d+ CLIP tokens, more than the "
             r"text encoder's context length 16 \(1 of 4 prompts too long; nothing is "
             r"truncated\)")
    assert not (workdir / FINAL_EVAL_FILE).exists()
