"""Tokenizers built offline with the ``tokenizers`` library round-trip through load_tokenizer."""

import json

import pytest
import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from parrot_jax import hub
from parrot_jax.convert import CheckpointError
from parrot_jax.data.tokenizer import train_clip_tokenizer

CORPUS = ["a photo of a red circle", "a blue square on a dark background",
          "vivid pastel shapes", "a small green triangle, soft focus",
          "bright outlined star on a light background"] * 10


def _save(tok: Tokenizer, folder, tokenizer_class: str, **special) -> None:
    """Write tokenizer.json + tokenizer_config.json naming the tokenizer class, as hub repos do."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=16,
                                                **special)
    fast.save_pretrained(folder)
    _set_class(folder, tokenizer_class)


def _set_class(folder, tokenizer_class: str) -> None:
    """Name the tokenizer class in tokenizer_config.json, as hub repos do."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def clip_bpe(tmp_path_factory):
    """A CLIP-style byte-pair tokenizer: lower-cased words with an end-of-word suffix."""
    folder = tmp_path_factory.mktemp("pipeline") / "tokenizer"
    folder.mkdir()
    train_clip_tokenizer(CORPUS, 120, model_max_length=16).save_pretrained(folder)
    _set_class(folder, "CLIPTokenizer")
    return folder


@pytest.fixture(scope="module")
def t5_unigram(tmp_path_factory):
    """A T5-style unigram tokenizer: metaspace pieces, ``</s>`` appended, ``<pad>`` = 0."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("t5tok")
    _save(tok, folder, "T5Tokenizer", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return folder


def test_clip_bpe_round_trip(clip_bpe):
    tokenizer = hub.load_tokenizer(clip_bpe.parent, subfolder="tokenizer")
    text = ["a red circle", "A Blue square on a dark background"]
    enc = tokenizer(text, padding="max_length", max_length=16, truncation=True)
    ids = enc["input_ids"]
    assert all(len(row) == 16 for row in ids)
    assert ids[0][0] == 0 and ids[0][4] == 1 and ids[0][5:] == [1] * 11  # bos, eos, eos-padding
    assert enc["attention_mask"][0] == [1] * 5 + [0] * 11
    decoded = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert decoded == ["a red circle", "a blue square on a dark background"]


def test_t5_unigram_round_trip(t5_unigram):
    tokenizer = hub.load_tokenizer(t5_unigram)
    enc = tokenizer(["a small green triangle", "vivid shapes"], padding=True)
    assert enc["input_ids"][0][-1] == 1  # </s>
    assert enc["input_ids"][1][-1] == 0 and enc["attention_mask"][1][-1] == 0  # <pad>
    decoded = tokenizer.batch_decode(enc["input_ids"], skip_special_tokens=True)
    assert decoded == ["a small green triangle", "vivid shapes"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        hub.load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "CLIPTokenizer"}')
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no tokenizer vocabulary"):
        hub.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: cannot load a tokenizer"):
        hub.load_tokenizer(tmp_path)
