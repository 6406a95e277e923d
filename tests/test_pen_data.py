"""Promptist-format readers, the TFDS ArrayRecord builder read back through grain, and the SFT
batch pipeline: contents, order, sources, and the errors for malformed / empty data."""

import json
import sys

import grain
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from parrot_jax.data import (
    DatasetError,
    PromptPair,
    read_pairs,
    read_prompts,
    read_rephrase,
    read_tsv,
    synthetic_pairs,
    tfds_promptist,
)
from parrot_jax.data.pipeline import PairEncoder, eval_batches, train_dataset
from parrot_jax.expansion.template import InstructionTemplate

PAIRS = [("a red cat", "a red cat, oil painting, golden hour"),
         ("Ünïcode café", "Ünïcode café, watercolor"),
         ("two  spaces", "two  spaces, highly detailed")]


def _jsonl(path, pairs, extra=None):
    path.write_text("".join(json.dumps({"prompt": p, "expansion": e, **(extra or {})}) + "\n"
                            for p, e in pairs), encoding="utf-8")
    return path


def _tsv(path, pairs, header=False):
    lines = (["prompt\texpansion"] if header else []) + [f"{p}\t{e}" for p, e in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_readers_agree_and_keep_sources(tmp_path):
    j = _jsonl(tmp_path / "a.jsonl", PAIRS, extra={"score": 1.5})
    t = _tsv(tmp_path / "b.tsv", PAIRS, header=True)
    r = tmp_path / "c.txt"
    r.write_text("".join(f"{p} Rephrase: {e}\n" for p, e in PAIRS), encoding="utf-8")
    from_jsonl = read_pairs(j)
    assert [(p.prompt, p.expansion) for p in from_jsonl] == PAIRS
    assert [p.source for p in from_jsonl] == [f"{j}:{i}" for i in (1, 2, 3)]
    from_tsv = read_tsv(t)  # the header is line 1
    assert [(p.prompt, p.expansion) for p in from_tsv] == PAIRS
    assert [p.source for p in from_tsv] == [f"{t}:{i}" for i in (2, 3, 4)]
    assert [(p.prompt, p.expansion) for p in read_rephrase(r)] == PAIRS
    both = read_pairs([j, t])
    assert len(both) == 6 and both[3].source == f"{t}:2"
    # Custom JSONL field names; CRLF line ends are not part of the text.
    k = tmp_path / "k.jsonl"
    k.write_bytes(b'{"plain": " a dog ", "engineered": "a dog, 8k"}\r\n')
    assert read_pairs(k, prompt_key="plain", expansion_key="engineered") == [
        PromptPair("a dog", "a dog, 8k", f"{k}:1")]


MALFORMED = [
    ("x.jsonl", '{"prompt": "a", "expansion": "b"}\n{"prompt": "a", "expansion": \n', 2,
     "invalid JSON"),
    ("x.jsonl", '{"prompt": "a", "expansion": "b"}\n{"prompt": "a"}\n', 2, "missing key"),
    ("x.jsonl", '{"prompt": "a", "expansion": "b"}\n[1, 2]\n', 2, "expected a JSON object"),
    ("x.jsonl", '{"prompt": "a", "expansion": 3}\n', 1, "must be a string"),
    ("x.jsonl", '{"prompt": "a", "expansion": "b"}\n{"prompt": "a", "expansion": "  "}\n', 2,
     "empty 'expansion'"),
    ("x.jsonl", '{"prompt": "a", "expansion": "b"}\n\n{"prompt": "c", "expansion": "d"}\n', 2,
     "blank line"),
    ("x.tsv", "a\tb\nc\td\te\n", 2, "expected 2 tab-separated columns"),
    ("x.tsv", "a\tb\nc d\n", 2, "found 1"),
    ("x.tsv", "a\tb\n\t d\n", 2, "empty prompt"),
    ("x.rephrase", "a Rephrase: b\nc d\n", 2, "found 0"),
    ("x.rephrase", "a Rephrase: b Rephrase: c\n", 1, "found 2"),
]


@pytest.mark.parametrize("name,text,line,message", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, name, text, line, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    fmt = "rephrase" if name.endswith(".rephrase") else None
    with pytest.raises(DatasetError, match=f"{path}:{line}: .*{message}"):
        read_pairs(path, format=fmt)


def test_not_utf8_and_unknown_format(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"a\tb\n" + b"\xff\xfe\tc\n")
    with pytest.raises(DatasetError, match=f"{path}:2: not UTF-8"):
        read_pairs(path)
    with pytest.raises(DatasetError, match="cannot tell the pair format"):
        read_pairs(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="unknown pair format 'csv'"):
        read_pairs(path, format="csv")
    with pytest.raises(DatasetError, match="no such file"):
        read_pairs(tmp_path / "absent.jsonl")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "h.tsv").write_text("prompt\texpansion\n")
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(DatasetError, match="e.jsonl: no pairs"):
        read_pairs(tmp_path / "e.jsonl")
    with pytest.raises(DatasetError, match="h.tsv: no pairs"):
        read_pairs(tmp_path / "h.tsv")
    with pytest.raises(DatasetError, match="p.txt: no prompts"):
        read_prompts(tmp_path / "p.txt")
    with pytest.raises(DatasetError, match="no pair files"):
        read_pairs([])


def test_read_prompts(tmp_path):
    path = tmp_path / "filtered_mix_train.txt"
    path.write_text("A rabbit in a space suit \n  cats dancing\nthe roof is wet", encoding="utf-8")
    assert read_prompts(path) == ["A rabbit in a space suit", "cats dancing", "the roof is wet"]
    path.write_text("one\n\nthree\n")
    with pytest.raises(DatasetError, match=f"{path}:2: blank line"):
        read_prompts(path)


def test_synthetic_pairs_are_deterministic():
    a, b = synthetic_pairs(50, seed=3), synthetic_pairs(50, seed=3)
    assert a == b and a != synthetic_pairs(50, seed=4)
    assert all(p.expansion.startswith(p.prompt + ", ") for p in a)
    with pytest.raises(ValueError, match="positive"):
        synthetic_pairs(0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A manual dir with train.jsonl + validation.tsv, prepared to ArrayRecord once."""
    root = tmp_path_factory.mktemp("tfds")
    manual = root / "manual"
    manual.mkdir()
    train = synthetic_pairs(37, seed=1)
    _jsonl(manual / "train.jsonl", [(p.prompt, p.expansion) for p in train])
    _tsv(manual / "validation.tsv", PAIRS)
    data_dir = root / "data"
    builder = tfds_promptist.build(manual, data_dir)
    return manual, data_dir, builder


def test_tfds_round_trip_through_grain(prepared):
    manual, data_dir, builder = prepared
    files = sorted(p.name for p in (data_dir / tfds_promptist.NAME / "1.0.0").iterdir())
    assert any(".array_record-" in f for f in files), files
    for split, name in [("train", "train.jsonl"), ("validation", "validation.tsv")]:
        path = manual / name
        expected = [p._asdict() for p in read_pairs(path)]
        source = tfds_promptist.data_source(data_dir, split)
        assert len(source) == len(expected)
        loader = grain.DataLoader(
            data_source=source, worker_count=0,
            sampler=grain.samplers.IndexSampler(len(source), shuffle=False, num_epochs=1, seed=0))
        got = [{k: v.decode() for k, v in r.items()} for r in loader]
        assert got == expected  # same records, same order, sources point at the manual files
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow
    # Building again reuses the prepared data.
    assert tfds_promptist.build(manual, data_dir).info.splits["train"].num_examples == 37


def test_tfds_errors(prepared, tmp_path):
    _, data_dir, _ = prepared
    with pytest.raises(DatasetError, match=r"does not exist\. Place .*train\.jsonl"):
        tfds_promptist.build(tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "validation.jsonl").write_text('{"prompt": "a", "expansion": "b"}\n')
    with pytest.raises(DatasetError, match=f"{tmp_path}: no train file"):
        tfds_promptist.build(tmp_path, tmp_path / "data")
    _jsonl(tmp_path / "train.jsonl", PAIRS)
    _tsv(tmp_path / "train.tsv", PAIRS)
    with pytest.raises(DatasetError, match="several files for split 'train'"):
        tfds_promptist.build(tmp_path, tmp_path / "data")
    (tmp_path / "train.tsv").unlink()
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "expansion": "b"}\n{"prompt": 1}\n')
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: missing key"):
        tfds_promptist.build(tmp_path, tmp_path / "data")
    with pytest.raises(DatasetError, match="not prepared"):
        tfds_promptist.data_source(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="no split 'test'"):
        tfds_promptist.data_source(data_dir, "test")


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whole-word T5-style tokenizer over a fixed vocabulary: pad 0, eos 1, unk 2."""
    pairs = PAIRS + [(p.prompt, p.expansion) for p in synthetic_pairs(300)]
    texts = [f"{InstructionTemplate().format(p)} {e}" for p, e in pairs]
    words = ["<pad>", "</s>", "<unk>"] + sorted(set(" ".join(texts).split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def test_pair_encoder(word_tokenizer):
    encoder = PairEncoder(word_tokenizer, 32, 12)
    out = encoder(PromptPair("a red cat", "a red cat, oil painting, golden hour", "f:1"))
    words = InstructionTemplate().format("a red cat").split()
    assert out["input_ids"].shape == (32,) and out["input_ids"].dtype == np.int32
    ids = word_tokenizer.convert_tokens_to_ids(words) + [1]
    np.testing.assert_array_equal(out["input_ids"][:len(ids)], ids)
    assert out["input_ids"][len(ids):].tolist() == [0] * (32 - len(ids))
    assert out["attention_mask"].tolist() == [1] * len(ids) + [0] * (32 - len(ids))
    target = word_tokenizer.convert_tokens_to_ids("a red cat, oil painting, golden hour".split())
    np.testing.assert_array_equal(out["targets"], target + [1] + [0] * (12 - len(target) - 1))
    assert out["target_mask"].sum() == len(target) + 1
    # bytes records (tfds) decode to the same arrays
    same = encoder({"prompt": b"a red cat", "expansion": b"a red cat, oil painting, golden hour"})
    for k in out:
        np.testing.assert_array_equal(out[k], same[k])
    with pytest.raises(DatasetError, match=r"data\.jsonl:7: .*do not fit in 3 tokens"):
        PairEncoder(word_tokenizer, 32, 3)(PromptPair("a", "a red cat", "data.jsonl:7"))


def test_check_lengths_reports_every_misfit(word_tokenizer):
    pairs = [PromptPair("a red cat", "x " * n, f"f:{n}") for n in (2, 20, 3, 30)]
    with pytest.raises(DatasetError, match=r"2 of 4 records .* first: f:20 .*; f:30"):
        PairEncoder(word_tokenizer, 32, 12).check_lengths(pairs)
    PairEncoder(word_tokenizer, 32, 31).check_lengths(pairs)


def test_train_and_eval_batches(word_tokenizer):
    pairs = list({p.prompt: p for p in synthetic_pairs(40, seed=2)}.values())[:10]  # distinct
    assert len(pairs) == 10
    encoder = PairEncoder(word_tokenizer, 32, 24)
    ds = train_dataset(pairs, encoder, 4, seed=0)
    first = ds[0]
    assert first["targets"].shape == (4, 24)
    np.testing.assert_array_equal(ds[0]["targets"], first["targets"])  # random access: resumable
    # Steps 0..4 of batch 4 cover two epochs of 10: each record exactly twice.
    seen = np.concatenate([ds[s]["input_ids"] for s in range(5)])
    rows = {tuple(encoder(p)["input_ids"]) for p in pairs}
    counts = {r: sum(tuple(s) == r for s in seen) for r in rows}
    assert set(counts.values()) == {2}
    batches = list(eval_batches(pairs, encoder, 4))
    assert len(batches) == 3 and all(b["targets"].shape == (4, 24) for b in batches)
    total = sum(int(b["target_mask"].sum()) for b in batches)
    assert total == sum(int(encoder(p)["target_mask"].sum()) for p in pairs)
    assert batches[-1]["target_mask"][2:].sum() == 0
    with pytest.raises(DatasetError, match="training set is empty"):
        train_dataset([], encoder, 4, seed=0)
    with pytest.raises(DatasetError, match="held-out set is empty"):
        next(eval_batches([], encoder, 4))


def test_processes_split_each_global_batch(word_tokenizer):
    """Two processes together hold exactly the rows one process holds alone, step by step, and
    yield the same number of held-out batches (padding rows carry no tokens)."""
    pairs = list({p.prompt: p for p in synthetic_pairs(60, seed=4)}.values())[:13]
    encoder = PairEncoder(word_tokenizer, 32, 24)
    rows = lambda b: sorted(map(tuple, b["input_ids"]))  # noqa: E731
    alone = train_dataset(pairs, encoder, 4, seed=1)
    split = [train_dataset(pairs, encoder, 4, seed=1, process_index=p, process_count=2)
             for p in (0, 1)]
    for step in (0, 3, 7):
        assert split[0][step]["input_ids"].shape == (2, 32)
        assert rows(alone[step]) == sorted(rows(split[0][step]) + rows(split[1][step]))
    single = list(eval_batches(pairs, encoder, 4))
    halves = [list(eval_batches(pairs, encoder, 4, process_index=p, process_count=2))
              for p in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 4
    real = lambda b: [r for r in rows(b) if any(r)]  # noqa: E731
    for one, h0, h1 in zip(single, *halves):
        assert one["target_mask"].sum() == h0["target_mask"].sum() + h1["target_mask"].sum()
        assert real(one) == sorted(real(h0) + real(h1))
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        train_dataset(pairs, encoder, 3, seed=0, process_count=2)


def test_tfds_as_the_rl_prompt_source(prepared):
    """``data.prompts='tfds:<dir>[:<split>]'``: the split's distinct user prompts, in order."""
    from parrot_jax.data.prompts import load_prompts

    manual, data_dir, _ = prepared
    train = [p.prompt for p in read_pairs(manual / "train.jsonl")]
    assert load_prompts(f"tfds:{data_dir}") == list(dict.fromkeys(train))
    assert load_prompts(f"tfds:{data_dir}:validation") == list(dict.fromkeys(p for p, _ in PAIRS))
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_prompts(f"tfds:{data_dir}:test")
