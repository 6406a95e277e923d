"""Tokenizers trained offline on a small corpus, for tiny random models (a T5-style one for the
PEN, a CLIP-style one for text encoders).

T5's conventions: pieces after a metaspace pre-tokenizer (``▁word``), ``<pad>`` = 0, ``</s>`` = 1
appended to every text, ``<unk>`` = 2. The pieces are byte-pair merges rather than T5's unigram
model: on a small repetitive corpus ``tokenizers``' unigram trainer keeps single characters only.
Built with the ``tokenizers`` library (a transformers dependency), so nothing is downloaded;
``save_pretrained`` writes it so that ``hub.load_tokenizer`` reads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def train_t5_tokenizer(corpus: Iterable[str], vocab_size: int, *,
                       model_max_length: int = 512) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` trained on ``corpus`` (at most ``vocab_size``
    pieces including the three special tokens)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [t for t in corpus if t.strip()]
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, pad_token="<pad>",
        eos_token="</s>", unk_token="<unk>")


def train_clip_tokenizer(corpus: Iterable[str], vocab_size: int, *,
                         model_max_length: int = 77) -> Any:
    """A CLIP-style ``transformers.PreTrainedTokenizerFast`` trained on ``corpus``: lower-cased
    byte-pair words ending in ``</w>``, ``<|startoftext|>`` (id 0) first, ``<|endoftext|>``
    (id 1) last and as padding and unknown; at most ``vocab_size`` entries."""
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    texts = [t for t in corpus if t.strip()]
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[bos, eos], end_of_word_suffix="</w>",
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, bos_token=bos, eos_token=eos,
        pad_token=eos, unk_token=eos)


def pad_vocabulary(tokenizer: Any, size: int) -> Any:
    """``tokenizer`` with unused special tokens added until it has ``size`` entries (a
    stand-in for a real tokenizer of that vocabulary size: ids up to ``size - 1`` exist)."""
    missing = size - len(tokenizer)
    if missing < 0:
        raise ValueError(f"the tokenizer already has {len(tokenizer)} entries, more than {size}")
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(missing)], special_tokens=True)
    return tokenizer


def build_clip_tokenizer(corpus: Sequence[str], context: int) -> Any:
    """CLIP's conventions on a word-level vocabulary: lower-cased words and punctuation runs of
    ``corpus`` (sorted, so the same corpus always gives the same ids), ``<|startoftext|>``
    (id 0) first, ``<|endoftext|>`` (id 1) last and as padding, ``<|unk|>`` (id 2) for unknown
    words, ``context`` tokens. (``tokenizers``' BPE trainer breaks count ties differently from
    one process to the next; a tiny run must rebuild the same vocabulary to resume exactly.)"""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus
                    for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))})
    special = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {t: i for i, t in enumerate(special + [w for w in words if w not in special])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=context, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|unk|>")
