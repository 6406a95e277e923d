"""T5 against transformers' PyTorch ``T5ForConditionalGeneration`` on tiny random configs.

Two layouts: the original T5 (relu, tied head with the ``d_model**-0.5`` rescale, a decoder
deeper than the encoder) and FLAN-T5's (gated-gelu, untied head). Both are written with
``save_pretrained`` and read with ``hub.load_t5``. Also: cached decoding against full decoding
and ``generate``, full-size key coverage on torch's ``meta`` device, and the loader's errors.
"""

import dataclasses
import json
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_FLAN_T5, TINY_T5, tiny_t5_torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from parrot_jax import hub
from parrot_jax.convert import CheckpointError, plan_conversion
from parrot_jax.models.config import ConfigError
from parrot_jax.models.t5 import (
    T5Config,
    T5ForConditionalGeneration,
    greedy_decode,
    relative_position_bucket,
)

WEIGHTS = "model.safetensors"
# Decoder length of every call (teacher-forced and generated): > max_distance, so the causal
# buckets saturate; one length keeps one compiled apply per model.
DECODE_LEN = 33
ATOL = 1e-4
# name -> (transformers config, ff_scale of tiny_t5_torch, seed). Seeds picked so that greedy
# outputs vary and some rows (not all) emit EOS early.
CASES = {"t5": (TINY_T5, 4.0, 0), "flan": (TINY_FLAN_T5, 1.0, 5)}


class Loaded(NamedTuple):
    torch_model: Any
    folder: Any
    module: T5ForConditionalGeneration
    params: Any
    apply: Any  # jitted module.apply
    greedy: Any  # jitted greedy_decode(params, ids, mask) -> (tokens, logits)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, Loaded]:
    """Both tiny models: torch reference, save_pretrained folder, ours loaded from it, jitted."""
    out = {}
    for name, (config, scale, seed) in CASES.items():
        model = tiny_t5_torch(config, seed=seed, ff_scale=scale)
        folder = tmp_path_factory.mktemp(f"t5_{name}")
        model.save_pretrained(folder)
        module, params = hub.load_t5(folder)
        greedy = jax.jit(partial(greedy_decode, module, max_new_tokens=DECODE_LEN,
                                 return_logits=True))
        out[name] = Loaded(model, folder, module, params, jax.jit(module.apply), greedy)
    return out


def _inputs(seed: int = 0):
    """Encoder ids / mask ``[3, 45]`` (full, right-padded, left-padded rows) and decoder ids /
    mask ``[3, DECODE_LEN]`` (one right-padded row). 45 > 2 * max_distance: every bucket."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, (3, 45))
    mask = np.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, :5] = 0
    dec = rng.integers(2, 100, (3, DECODE_LEN))
    dec[:, 0] = 0
    dec_mask = np.ones_like(dec)
    dec_mask[1, 25:] = 0
    return ids, mask, dec, dec_mask


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.int64))


@pytest.mark.parametrize("buckets,distance", [(8, 20), (32, 128)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket(buckets, distance, bidirectional):
    rel = np.arange(-400, 401)
    ref = TorchT5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional=bidirectional, num_buckets=buckets,
        max_distance=distance).numpy()
    ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                    num_buckets=buckets, max_distance=distance)
    np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(loaded, name):
    model, _, _, params, apply, _ = loaded[name]
    ids, mask, dec, dec_mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=_torch(ids), attention_mask=_torch(mask),
                    decoder_input_ids=_torch(dec), decoder_attention_mask=_torch(dec_mask))
    ref = ref.logits.numpy()
    logits = np.asarray(apply({"params": params}, ids, mask, dec, dec_mask))
    assert logits.shape == (3, DECODE_LEN, 100) and logits.dtype == np.float32
    assert np.abs(ref).max() > 0.5  # non-trivial outputs
    assert np.abs(logits - ref).max() <= ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_matches_full_and_generate(loaded, name):
    model, _, _, params, apply, greedy = loaded[name]
    ids, mask, _, _ = _inputs(seed=1)
    tokens, step_logits = (np.asarray(a) for a in greedy(params, ids, mask))
    assert tokens.shape == (3, DECODE_LEN) and step_logits.shape == (3, DECODE_LEN, 100)
    # Every cached step equals the uncached decoder on the same inputs at that position.
    fed = np.concatenate([np.zeros((3, 1), np.int64), tokens[:, :-1]], axis=1)
    full = np.asarray(apply({"params": params}, ids, mask, fed, np.ones_like(fed)))
    assert np.abs(step_logits - full).max() <= ATOL
    # An explicit cache: the one generate builds from the config sizes its layer list by
    # num_layers and overflows when the decoder is deeper (transformers 5.24).
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        ref = model.generate(input_ids=_torch(ids), attention_mask=_torch(mask),
                             max_new_tokens=DECODE_LEN, do_sample=False, num_beams=1,
                             cache=cache).numpy()
    assert (ref[:, 0] == 0).all()
    ref = np.pad(ref[:, 1:], ((0, 0), (0, DECODE_LEN + 1 - ref.shape[1])))  # stopped early: pad
    np.testing.assert_array_equal(tokens, ref)
    assert len(np.unique(tokens)) > 3  # not a degenerate repetition


def test_generation_pads_after_eos(loaded):
    """A row that has emitted EOS continues with pad tokens (as generate pads finished rows)
    while the others go on: the relu model's rows 0 and 2 end at step 2, row 1 much later."""
    _, _, module, params, _, greedy = loaded["t5"]
    tokens = np.asarray(greedy(params, *_inputs(seed=1)[:2])[0])
    eos, pad = module.config.eos_token_id, module.config.pad_token_id
    ends = [list(row).index(eos) for row in tokens]  # raises if a row never ends
    assert ends[0] == ends[2] < 5 < ends[1], "test set-up: the seeds should give this pattern"
    for row, end in zip(tokens, ends):
        assert eos not in row[:end] and (row[end + 1:] == pad).all()


def test_decode_step_in_while_loop(loaded):
    """decode_step under lax.while_loop, stopping once every row has emitted EOS, gives the
    scan's tokens (rows 0 and 2 finish within a few steps)."""
    _, _, module, params, _, greedy = loaded["t5"]
    ids, mask = _inputs(seed=1)[:2]
    eos, pad = module.config.eos_token_id, module.config.pad_token_id

    @jax.jit
    def until_eos(params, ids, mask):
        v = {"params": params}
        hidden = module.apply(v, ids, mask, method=module.encode)
        cache = module.apply(v, hidden, mask, DECODE_LEN, method=module.init_cache)
        batch = ids.shape[0]

        def body(state):
            cache, token, done, out, pos = state
            logits, cache = module.apply(v, cache, token, pos, method=module.decode_step)
            nxt = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))
            return cache, nxt, done | (nxt == eos), out.at[:, pos].set(nxt), pos + 1

        def cond(state):
            return (state[4] < DECODE_LEN) & ~state[2].all()

        start = jnp.full((batch,), module.config.start_token, jnp.int32)
        out = jnp.full((batch, DECODE_LEN), pad, jnp.int32)
        state = (cache, start, jnp.zeros(batch, bool), out, jnp.int32(0))
        *_, out, steps = jax.lax.while_loop(cond, body, state)
        return out, steps

    out, steps = until_eos(params, ids[[0, 2]], mask[[0, 2]])
    tokens = np.asarray(greedy(params, ids, mask)[0])[[0, 2]]
    assert int(steps) < 5  # it stopped early
    np.testing.assert_array_equal(np.asarray(out), tokens)


def test_head_tying_and_rescale(loaded):
    t5, flan = loaded["t5"], loaded["flan"]
    assert t5.module.config.tie_word_embeddings and t5.module.config.scale_decoder_outputs
    assert "lm_head" not in t5.params and t5.params["shared"]["embedding"].shape == (100, 32)
    # transformers 5 writes tie_word_embeddings=true even for a separate head: the weights decide.
    assert json.loads((flan.folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert not flan.module.config.tie_word_embeddings
    assert not flan.module.config.scale_decoder_outputs
    np.testing.assert_array_equal(np.asarray(flan.params["lm_head"]["kernel"]),
                                  flan.torch_model.lm_head.weight.detach().numpy().T)


def test_bfloat16_activations(loaded):
    _, folder, _, params, apply, _ = loaded["flan"]
    module, bf16_params = hub.load_t5(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask, dec, dec_mask = _inputs()
    ref = np.asarray(apply({"params": params}, ids, mask, dec, dec_mask))
    out = jax.jit(module.apply)({"params": bf16_params}, ids, mask, dec, dec_mask)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() < 0.1 * np.abs(ref).max()


# --- checkpoint layouts ----------------------------------------------------------------------


def _folder(path, source, tensors=None, config_edit=None, config=None):
    """A copy of a save_pretrained folder with edited tensors and / or config."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = config or json.loads((source / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **(config_edit or {})}))
    if tensors is not False:
        save_file(load_file(source / WEIGHTS) if tensors is None else tensors, path / WEIGHTS)
    return path


def _assert_same_params(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


def test_published_flan_config(tmp_path, loaded):
    """The hub's FLAN-T5 config.json (transformers 4: tie_word_embeddings=false, no
    scale_decoder_outputs, legacy keys) loads the same model."""
    flan = loaded["flan"]
    published = dict(FLAN_T5_BASE, d_ff=64, d_kv=8, d_model=32, num_decoder_layers=2, num_heads=4,
                     num_layers=2, relative_attention_max_distance=20,
                     relative_attention_num_buckets=8, vocab_size=100)
    module, params = hub.load_t5(_folder(tmp_path, flan.folder, config=published))
    assert module.config == flan.module.config
    _assert_same_params(params, flan.params)


def test_tied_copies_checked_and_skipped(tmp_path, loaded):
    t5 = loaded["t5"]
    tensors = load_file(t5.folder / WEIGHTS)
    shared = tensors["shared.weight"]
    copies = {k: shared.copy() for k in ("encoder.embed_tokens.weight",
                                         "decoder.embed_tokens.weight", "lm_head.weight")}
    module, params = hub.load_t5(_folder(tmp_path / "copies", t5.folder, {**tensors, **copies}))
    assert module.config == t5.module.config
    _assert_same_params(params, t5.params)
    other = {**tensors, **copies, "encoder.embed_tokens.weight": shared + 1}
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight differs from shared"):
        hub.load_t5(_folder(tmp_path / "untied_input", t5.folder, other))


def test_sharded_index(tmp_path, loaded):
    flan = loaded["flan"]
    tensors = load_file(flan.folder / WEIGHTS)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    folder = _folder(tmp_path, flan.folder, tensors=False)
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    module, params = hub.load_t5(folder)
    assert not module.config.tie_word_embeddings  # the differing lm_head is found in a shard
    _assert_same_params(params, flan.params)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,match", [
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
    ({"dense_act_fn": "gelu"}, "dense_act_fn='gelu'"),
    ({"is_encoder_decoder": False}, "is_encoder_decoder=False"),
    ({"model_type": "umt5"}, "model_type='umt5'"),
    ({"relative_attention_max_distance": 4}, "relative_attention_max_distance=4"),
    ({"d_model": 0}, "d_model=0"),
    ({"some_new_option": 1}, "unknown keys: some_new_option"),
])
def test_unsupported_config_values(tmp_path, loaded, edit, match):
    folder = _folder(tmp_path, loaded["flan"].folder, tensors=False, config_edit=edit)
    with pytest.raises(ConfigError, match=match) as err:
        hub.load_t5(folder)
    assert str(folder / "config.json") in str(err.value)


def test_missing_and_misshaped_keys(tmp_path, loaded):
    tensors = load_file(loaded["flan"].folder / WEIGHTS)
    del tensors["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    tensors[bias] = np.zeros((7, 4), np.float32)
    folder = _folder(tmp_path, loaded["flan"].folder, tensors)
    with pytest.raises(CheckpointError) as err:
        hub.load_t5(folder)
    msg = str(err.value)
    assert str(folder / WEIGHTS) in msg
    assert "1 missing parameter(s)" in msg
    assert "decoder/block_1/layer_2/DenseReluDense/wo/kernel" in msg
    assert (f"{bias} (7, 4) -> encoder/block_0/layer_0/SelfAttention/relative_attention_bias/"
            "embedding (8, 4)") in msg


def test_untied_config_needs_lm_head(tmp_path, loaded):
    """A config asking for a separate head (as FLAN-T5's does) with no lm_head.weight stored."""
    folder = _folder(tmp_path, loaded["t5"].folder, config_edit={"tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match=r"missing parameter.*lm_head/kernel"):
        hub.load_t5(folder)


# --- full-size key coverage ------------------------------------------------------------------

# config.json of google/flan-t5-base, google/t5-v1_1-large and google-t5/t5-base as published.
FLAN_T5_BASE = dict(
    architectures=["T5ForConditionalGeneration"], d_ff=2048, d_kv=64, d_model=768,
    decoder_start_token_id=0, dense_act_fn="gelu_new", dropout_rate=0.1, eos_token_id=1,
    feed_forward_proj="gated-gelu", initializer_factor=1.0, is_encoder_decoder=True,
    is_gated_act=True, layer_norm_epsilon=1e-06, model_type="t5", n_positions=512,
    num_decoder_layers=12, num_heads=12, num_layers=12, output_past=True, pad_token_id=0,
    relative_attention_max_distance=128, relative_attention_num_buckets=32,
    task_specific_params={"translation_en_to_de": {"prefix": "translate English to German: "}},
    tie_word_embeddings=False, torch_dtype="float32", transformers_version="4.23.1",
    use_cache=True, vocab_size=32128,
)
T5_V1_1_LARGE = dict(
    _name_or_path="google/t5-v1_1-large", architectures=["T5ForConditionalGeneration"],
    d_ff=2816, d_kv=64, d_model=1024, decoder_start_token_id=0, dropout_rate=0.1,
    eos_token_id=1, feed_forward_proj="gated-gelu", initializer_factor=1.0,
    is_encoder_decoder=True, layer_norm_epsilon=1e-06, model_type="t5", num_decoder_layers=24,
    num_heads=16, num_layers=24, output_past=True, pad_token_id=0,
    relative_attention_num_buckets=32, tie_word_embeddings=False, vocab_size=32128,
)
T5_BASE = dict(
    architectures=["T5WithLMHeadModel"], d_ff=3072, d_kv=64, d_model=768,
    decoder_start_token_id=0, dropout_rate=0.1, eos_token_id=1, initializer_factor=1.0,
    is_encoder_decoder=True, layer_norm_epsilon=1e-06, model_type="t5", n_positions=512,
    num_heads=12, num_layers=12, output_past=True, pad_token_id=0,
    relative_attention_num_buckets=32, vocab_size=32128,
)


@pytest.mark.parametrize("name,config,n_params", [
    ("flan-t5-base", FLAN_T5_BASE, 247_577_856),
    ("t5-v1_1-large", T5_V1_1_LARGE, 783_150_080),
    ("t5-base", T5_BASE, 222_903_552),
])
def test_keys_cover_full_size(name, config, n_params):
    with torch.device("meta"):
        reference = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours_config = T5Config.from_transformers(config, name)
    tree = jax.eval_shape(T5ForConditionalGeneration(ours_config).init_params, jax.random.key(0))
    ours = {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}
    # transformers' state dict lists the tied aliases of shared.weight; load_t5 skips them.
    aliases = [r"(encoder|decoder)\.embed_tokens\.weight"]
    if ours_config.tie_word_embeddings:
        aliases.append(r"lm_head\.weight")
    plan = plan_conversion(ref, ours, source=name, ignore=aliases)
    assert len(plan) == len(ours) and {p for p, _ in plan.values()} == set(ours)
    assert plan["decoder.block.3.layer.1.EncDecAttention.k.weight"] == (
        ("decoder", "block_3", "layer_1", "EncDecAttention", "k", "kernel"), "transpose")
    assert plan["shared.weight"] == (("shared", "embedding"), "identity")
    assert sum(math.prod(s) for s in ours.values()) == n_params  # the published counts


def test_config_defaults_follow_transformers():
    """An empty config means what transformers' T5Config defaults mean (t5-small's shape)."""
    ours = T5Config.from_transformers({}, "empty")
    ref = transformers.T5Config()
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                  "num_heads", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj",
                  "scale_decoder_outputs", "pad_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert dataclasses.replace(ours, decoder_start_token_id=None).start_token == 0


# --- mT5 and the decoder-output rescale ------------------------------------------------------

# google/mt5-small's config.json as published (transformers 4), at the tiny test sizes.
MT5_SMALL_PUBLISHED = dict(
    architectures=["MT5ForConditionalGeneration"], d_ff=64, d_kv=8, d_model=32,
    decoder_start_token_id=0, dropout_rate=0.1, eos_token_id=1, feed_forward_proj="gated-gelu",
    initializer_factor=1.0, is_encoder_decoder=True, layer_norm_epsilon=1e-06, model_type="mt5",
    num_decoder_layers=2, num_heads=4, num_layers=2, pad_token_id=0,
    relative_attention_max_distance=20, relative_attention_num_buckets=8,
    tie_word_embeddings=False, tokenizer_class="T5Tokenizer", transformers_version="4.10.0.dev0",
    use_cache=True, vocab_size=100,
)


def _tiny_mt5_torch(tie: bool, seed: int) -> Any:
    """A transformers ``MT5ForConditionalGeneration`` with tiny_t5_torch's random weights (FLAN's
    layout); untied: its own ``lm_head`` parameter, which save_pretrained then stores."""
    source = tiny_t5_torch(dict(TINY_FLAN_T5, tie_word_embeddings=tie), seed=seed)
    config = {k: v for k, v in TINY_FLAN_T5.items() if k != "tie_word_embeddings"}
    model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**config))
    if not tie:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    model.load_state_dict(source.state_dict())
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mt5_logits_match_transformers(tmp_path, tie):
    """mT5 as transformers 5 writes it (tie_word_embeddings=true, no scale_decoder_outputs,
    lm_head stored only when separate) loads with transformers' scale: mT5 never rescales. The
    untied one also as transformers 4 wrote it (google/mt5-small's config) and re-saved."""
    model = _tiny_mt5_torch(tie, seed=3)
    if not tie:
        assert not torch.equal(model.lm_head.weight, model.shared.weight)
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "mt5" and written["tie_word_embeddings"] is True
    assert "scale_decoder_outputs" not in written
    ids, mask, dec, dec_mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=_torch(ids), attention_mask=_torch(mask),
                    decoder_input_ids=_torch(dec), decoder_attention_mask=_torch(dec_mask))
    ref = ref.logits.numpy()
    assert np.abs(ref).max() > 0.5
    folders = [tmp_path / "saved"]
    if not tie:  # as published (transformers 4), and that folder re-saved by transformers 5
        folders.append(_folder(tmp_path / "v4", tmp_path / "saved", config=MT5_SMALL_PUBLISHED))
        transformers.MT5ForConditionalGeneration.from_pretrained(folders[-1]).save_pretrained(
            tmp_path / "resaved")
        folders.append(tmp_path / "resaved")
        assert json.loads((folders[-1] / "config.json").read_text())["tie_word_embeddings"]
    for folder in folders:
        module, params = hub.load_t5(folder)
        assert not module.config.scale_decoder_outputs
        assert module.config.tie_word_embeddings == tie and ("lm_head" in params) != tie
        logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask, dec, dec_mask))
        assert np.abs(logits - ref).max() <= ATOL, folder.name


def _torch_rescales(config: dict) -> bool:
    """Whether the installed transformers multiplies the decoder output by d_model**-0.5 for
    this config.json dict: its logits against its lm_head applied to the final decoder state."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(
        transformers.AutoConfig.for_model(**config)).eval()
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True)
        raw = model.lm_head(out.decoder_hidden_states[-1])
    if torch.allclose(out.logits, raw, atol=1e-6):
        return False
    assert torch.allclose(out.logits, raw * config["d_model"] ** -0.5, atol=1e-6)
    return True


def test_rescale_decision_follows_transformers():
    """Every combination of model_type, tie_word_embeddings, scale_decoder_outputs and writer
    version: ours rescales exactly when the installed transformers does, or refuses with one
    line naming the key, and refuses exactly the mT5 configs that transformers 4 and 5 read
    differently (tied or unsaid, not written by 5) or that ask for a rescale mT5 ignores."""
    base = dict(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    refused = []
    for model_type in ("t5", "mt5"):
        for tie in (True, False, None):
            for scale in (True, False, None):
                for version in ("5.24.0", "4.46.3", None):
                    extra = {"tie_word_embeddings": tie, "scale_decoder_outputs": scale,
                             "transformers_version": version}
                    config = dict(base, model_type=model_type,
                                  **{k: v for k, v in extra.items() if v is not None})
                    try:
                        ours = T5Config.from_transformers(config, "x/config.json")
                    except ConfigError as e:
                        msg = str(e)
                        assert msg.startswith("x/config.json: ") and "\n" not in msg
                        assert "scale_decoder_outputs" in msg or "tie_word_embeddings" in msg
                        refused.append((model_type, tie, scale, version))
                        continue
                    assert ours.scale_decoder_outputs == _torch_rescales(config), config
    ambiguous = [("mt5", tie, scale, version)
                 for tie in (True, False, None) for scale in (True, False, None)
                 for version in ("5.24.0", "4.46.3", None)
                 if scale is True or (scale is None and tie is not False and version != "5.24.0")]
    assert refused == ambiguous


@pytest.mark.parametrize("edit,key", [
    ({"transformers_version": "4.46.3"}, "tie_word_embeddings=True"),
    ({"transformers_version": None}, "tie_word_embeddings=True"),
    ({"scale_decoder_outputs": True}, "scale_decoder_outputs=True"),
])
def test_ambiguous_mt5_config_refused(tmp_path, edit, key):
    """A tied mT5 whose config does not say which scale its weights expect: one line naming the
    file and the key, nothing guessed."""
    _tiny_mt5_torch(True, seed=3).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config = {k: v for k, v in {**config, **edit}.items() if v is not None}
    folder = _folder(tmp_path / "edited", tmp_path / "saved", config=config)
    with pytest.raises(ConfigError) as err:
        hub.load_t5(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'config.json'}: {key} on an mt5 config") and "\n" not in msg
