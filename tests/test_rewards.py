"""Reward heads and RewardSet against transformers' PyTorch CLIPModel on tiny random CLIP folders.

Two backbones: A (30 px, 24-d embeddings) carries aesthetics, PickScore, a prompt CLIP score, a
conditioning-text PickScore and zero-shot sentiment; B (24 px, 16-d) carries the CLIP score.
Both processors crop 30 x 36 inputs without resizing, so the comparison with
``CLIPImageProcessor`` + ``CLIPModel`` is exact up to float error (resizing is measured in
test_rewards_preprocess.py).
"""

import threading

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_rewards_pth import LaionMLP
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from parrot_jax.convert import CheckpointError
from parrot_jax.data.tokenizer import train_clip_tokenizer
from parrot_jax.rewards import (
    SENTIMENT_CLASSES,
    SENTIMENT_DESCRIPTIONS,
    Aesthetic,
    ClipBackbone,
    ClipScore,
    Features,
    HostReward,
    JpegCompressibility,
    ParrotRewardsConfig,
    PickScore,
    RewardSet,
    Sentiment,
    build_parrot_rewards,
    jpeg_sizes_kb,
)
from parrot_jax.rl.pareto import valid_rows

PROMPTS = ["a red circle", "a blue square on a dark background", "vivid pastel shapes",
           "a small green triangle", "bright outlined star", "a photo of a dog",
           "a sad grey sky", "a happy yellow sun"]
CONDITIONS = [f"<reward {i % 4 + 1}>, {p}, highly detailed, soft light"
              for i, p in enumerate(PROMPTS)]
CORPUS = PROMPTS + CONDITIONS + [t for ts in SENTIMENT_DESCRIPTIONS.values() for t in ts]
TEXT = dict(vocab_size=160, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
            eos_token_id=1, pad_token_id=1)
CLIP_A = dict(text_config=TEXT, projection_dim=24, vision_config=dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    image_size=30, patch_size=6))
CLIP_B = dict(text_config={**TEXT, "hidden_size": 24, "num_hidden_layers": 1,
                           "hidden_act": "gelu"},
              projection_dim=16, vision_config=dict(
                  hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                  num_attention_heads=4, image_size=24, patch_size=8, hidden_act="gelu"))
AESTHETIC_DIMS = (24, 32, 16, 8, 4, 1)


def _write_tokenizer(folder):
    """A CLIP-style BPE tokenizer (bos 0, eos 1, eos-padded), as in test_tokenizer.py."""
    fast = train_clip_tokenizer(CORPUS, TEXT["vocab_size"], model_max_length=16)
    assert len(fast) <= TEXT["vocab_size"]
    fast.save_pretrained(folder)


def _clip_folder(tmp_path_factory, name, config, scale, shortest, crop, seed):
    torch.manual_seed(seed)
    model = tf.CLIPModel(tf.CLIPConfig(**config)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(scale)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    _write_tokenizer(folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": shortest},
                                      crop_size={"height": crop, "width": crop})
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Both tiny CLIP folders, an aesthetic .pth, the backbones and the heads."""
    model_a, proc_a, folder_a = _clip_folder(tmp_path_factory, "clip_a", CLIP_A, 2.3, 30, 30, 0)
    model_b, proc_b, folder_b = _clip_folder(tmp_path_factory, "clip_b", CLIP_B, 1.7, 30, 24, 1)
    torch.manual_seed(2)
    mlp = LaionMLP(AESTHETIC_DIMS).eval()
    pth = folder_a / "aesthetic.pth"
    torch.save(mlp.state_dict(), pth)
    a = ClipBackbone.load("A", folder_a)
    b = ClipBackbone.load("B", folder_b)
    heads = [Aesthetic.from_pth(pth, a, dims=AESTHETIC_DIMS), JpegCompressibility(),
             PickScore(a), ClipScore(b), Sentiment.zero_shot(a),
             PickScore(a, name="hp_condition", text="condition"),
             ClipScore(a, name="alignment_a")]
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (8, 30, 36, 3)).astype(np.uint8)
    u8[::2] = np.sort(u8[::2], axis=2)  # half of them smoother, so JPEG sizes differ
    return dict(model_a=model_a, model_b=model_b, proc_a=proc_a, proc_b=proc_b, a=a, b=b,
                folder_a=folder_a, folder_b=folder_b, mlp=mlp, pth=pth, heads=heads, u8=u8,
                images=u8.astype(np.float32) / 255)


@pytest.fixture(scope="module")
def reward_set(world):
    rs = RewardSet(world["heads"])
    yield rs
    rs.close()


@pytest.fixture(scope="module")
def values(world, reward_set):
    inputs = reward_set.inputs(world["images"], PROMPTS, CONDITIONS)
    return inputs, np.asarray(reward_set(inputs))


def _torch_features(model, processor, u8, tokens=None):
    """Projected image (and text) features from transformers, as PyTorch scorers compute them."""
    pixels = torch.from_numpy(processor(images=list(u8), return_tensors="np")["pixel_values"])
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = None if tokens is None else model.get_text_features(
            input_ids=torch.from_numpy(np.asarray(tokens.ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(tokens.mask, np.int64))).pooler_output
    return image, text


def _cos(x, y):
    return torch.nn.functional.cosine_similarity(x, y, dim=-1).numpy()


def _close(ours, ref, atol=1e-4):
    assert np.ptp(ref) > 1e-3, "reference values must vary across the batch"
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def test_heads_match_transformers_clip(world, reward_set, values):
    inputs, out = values
    assert reward_set.names == ("aesthetics", "jpeg_compressibility", "human_preference",
                                "alignment", "sentiment", "hp_condition", "alignment_a")
    assert out.shape == (8, 7) and out.dtype == np.float32
    col = dict(zip(reward_set.names, out.T))
    model_a, model_b, u8 = world["model_a"], world["model_b"], world["u8"]
    img_a, prompt_a = _torch_features(model_a, world["proc_a"], u8, inputs.prompt["A"])
    _, cond_a = _torch_features(model_a, world["proc_a"], u8, inputs.condition["A"])
    img_b, prompt_b = _torch_features(model_b, world["proc_b"], u8, inputs.prompt["B"])
    scale_a = model_a.logit_scale.exp().item()
    # PickScore: the diagonal of CLIPModel's logits_per_image.
    with torch.no_grad():
        logits = model_a(input_ids=torch.from_numpy(np.asarray(inputs.prompt["A"].ids, np.int64)),
                         attention_mask=torch.from_numpy(np.asarray(inputs.prompt["A"].mask,
                                                                    np.int64)),
                         pixel_values=torch.from_numpy(world["proc_a"](
                             images=list(u8), return_tensors="np")["pixel_values"]))
    _close(col["human_preference"], torch.diagonal(logits.logits_per_image).numpy())
    _close(col["hp_condition"], scale_a * _cos(img_a, cond_a))
    _close(col["alignment_a"], _cos(img_a, prompt_a))
    _close(col["alignment"], _cos(img_b, prompt_b))
    with torch.no_grad():
        ref = world["mlp"](img_a / img_a.norm(dim=-1, keepdim=True))[:, 0].numpy()
    _close(col["aesthetics"], ref, atol=1e-5)
    # Zero-shot sentiment: softmax over CLIP logits of the three class-mean text embeddings.
    means = []
    for c in SENTIMENT_CLASSES:
        toks = world["a"].tokenize(SENTIMENT_DESCRIPTIONS[c])
        _, t = _torch_features(model_a, world["proc_a"], u8[:1], toks)
        m = (t / t.norm(dim=-1, keepdim=True)).mean(0)
        means.append(m / m.norm())
    logits = scale_a * (img_a / img_a.norm(dim=-1, keepdim=True)) @ torch.stack(means).T
    _close(col["sentiment"], torch.softmax(logits, -1)[:, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(col["jpeg_compressibility"], -jpeg_sizes_kb(world["images"]))


def test_sentiment_probe_from_file(world, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 24)).astype(np.float32) * 4
    bias = np.array([0.5, 0.0, -0.2], np.float32)
    save_file({"weight": weight, "bias": bias}, tmp_path / "probe.safetensors")
    head = Sentiment.from_file(tmp_path / "probe.safetensors", world["a"])
    emb = rng.standard_normal((6, 24)).astype(np.float32)
    feats = Features(jnp.asarray(emb), None, None, jnp.float32(0))
    x = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    logits = x @ weight.T + bias
    ref = np.exp(logits[:, 0]) / np.exp(logits).sum(-1)
    _close(np.asarray(head.apply(head.params, feats)), ref, atol=1e-6)
    save_file({"weight": weight[:, :20], "bias": bias}, tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match=r"narrow.safetensors: weight has shape \(3, 20\), "
                                              r"expected \(3, 24\)"):
        Sentiment.from_file(tmp_path / "narrow.safetensors", world["a"])
    save_file({"weight": weight}, tmp_path / "nobias.safetensors")
    with pytest.raises(CheckpointError, match=r"keys \['weight'\], expected exactly"):
        Sentiment.from_file(tmp_path / "nobias.safetensors", world["a"])
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        Sentiment.from_file(tmp_path / "missing.safetensors", world["a"])


def _count_ops(jaxpr, name):
    """Occurrences of primitive ``name`` in a (closed) jaxpr, sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_ops(sub, name)
    return count


def test_each_backbone_runs_once(world, reward_set, values, monkeypatch):
    """6 device heads on 2 backbones: 2 vision towers (one patch conv each) in the traced call,
    and each (backbone, text) encoded once although two heads on A read the prompt."""
    inputs, _ = values
    calls = []
    for method in ("encode_images", "encode_text"):
        original = getattr(ClipBackbone, method)

        def counted(self, *args, _original=original, _method=method):
            calls.append((self.name, _method))
            return _original(self, *args)

        monkeypatch.setattr(ClipBackbone, method, counted)
    # A fresh function: jax reuses cached traces of reward_set.apply, which would skip the counting.
    jaxpr = jax.make_jaxpr(lambda p, x: reward_set.apply(p, x))(reward_set.params, inputs)
    assert _count_ops(jaxpr.jaxpr, "conv_general_dilated") == 2
    assert sorted(calls) == [("A", "encode_images"), ("A", "encode_text"), ("A", "encode_text"),
                             ("B", "encode_images"), ("B", "encode_text")]
    assert reward_set.texts_read == {"A": ("prompt", "condition"), "B": ("prompt",)}
    # One head per set instead: the same 6 heads would run a vision tower 6 times.
    single = RewardSet([world["heads"][2]])
    assert _count_ops(jax.make_jaxpr(single.apply)(single.params, inputs).jaxpr,
                      "conv_general_dilated") == 1


def test_8_devices_equal_1(world, values):
    assert jax.device_count() == 8
    inputs, expected = values
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))  # Auto axes
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    rs = RewardSet(world["heads"], sharding=sharding)
    out = rs(inputs)
    assert out.sharding.is_equivalent_to(sharding, 2)
    assert len(out.addressable_shards) == 8 and out.addressable_shards[0].data.shape == (1, 7)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
    # jax.make_mesh's default Explicit axes are run as Auto (same devices, same spec).
    explicit = NamedSharding(jax.make_mesh((4, 2), ("data", "fsdp")), P(("data", "fsdp")))
    converted = RewardSet(world["heads"][:1], sharding=explicit).sharding
    assert all(t == AxisType.Auto for t in converted.mesh.axis_types)
    assert converted.is_equivalent_to(explicit, 2)


class _Gated(HostReward):
    """A host reward that cannot finish until the test opens its gate."""

    name = "gated"

    def __init__(self):
        super().__init__(workers=1)
        self.gate, self.started = threading.Event(), threading.Event()

    def compute(self, images):
        self.started.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("gate never opened")
        return images.mean(axis=(1, 2, 3))


def test_submit_returns_before_host_work_is_done(world):
    """The loop must be able to start the next rollout while host rewards run."""
    gated = _Gated()
    rs = RewardSet([JpegCompressibility(quality=80), gated])
    try:
        pending = rs.submit(rs.inputs(world["images"]))  # no head reads text: no prompts needed
        assert gated.started.wait(timeout=30)  # running on its thread, and submit has returned
        assert not pending.done()
        gated.gate.set()
        out = np.asarray(pending.result(timeout=30))
    finally:
        gated.gate.set()
        rs.close()
    assert pending.done() and out.shape == (8, 2)
    np.testing.assert_array_equal(out[:, 0], -jpeg_sizes_kb(world["images"], quality=80))
    np.testing.assert_allclose(out[:, 1], world["images"].mean(axis=(1, 2, 3)), rtol=1e-6)


def test_jpeg_compressibility_values():
    """-kB at quality 95: a flat image compresses far better than noise; sizes are PIL's."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    images = np.stack([np.full((32, 32, 3), 0.4), rng.random((32, 32, 3))]).astype(np.float32)
    with JpegCompressibility() as reward:
        values = reward.submit(images).result(timeout=30)
    buffer = io.BytesIO()
    Image.fromarray(np.round(images[1] * 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert values[1] == pytest.approx(-len(buffer.getvalue()) / 1000)
    assert values[0] > values[1] + 1  # flat: well over 1 kB smaller
    assert JpegCompressibility(incompressible=True).compute(images)[1] == -values[1]
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        JpegCompressibility().submit(images[0]).result(timeout=30)


def test_jpeg_non_finite_images_score_nan():
    """An image with any NaN / inf pixel scores NaN (an invalid sample for the loop), silently
    (no RuntimeWarning from casting NaN to uint8); the finite images keep their own scores."""
    import io
    import warnings

    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.random((5, 16, 16, 3)).astype(np.float32)
    images[1] = np.nan  # all NaN: the cast made it a black image, scored about -2.1
    images[2, 3, 4, 1] = np.nan
    images[3, 0, 0, 0] = np.inf
    images[4, 5, 5, 2] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with JpegCompressibility() as reward:
            values = reward.submit(images).result(timeout=30)
        sizes = jpeg_sizes_kb(images)
    assert values.dtype == np.float32 and values.shape == (5,)
    assert np.isfinite(values[0]) and np.isnan(values[1:]).all() and np.isnan(sizes[1:]).all()
    buffer = io.BytesIO()  # the finite image scores as before: PIL's size of round(255 x)
    Image.fromarray(np.round(images[0] * 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert values[0] == pytest.approx(-len(buffer.getvalue()) / 1000)
    assert np.asarray(valid_rows(jnp.stack([values, np.zeros(5)], -1))).tolist() == [
        True, False, False, False, False]
    assert jpeg_sizes_kb(np.zeros((0, 16, 16, 3))).shape == (0,)


def test_clear_errors(world, tmp_path):
    a, b = world["a"], world["b"]
    rs = RewardSet([PickScore(a)])
    with pytest.raises(ValueError, match=r"rewards \['human_preference'\] read the prompt text; "
                                         "pass prompts="):
        rs.inputs(world["images"])
    with pytest.raises(ValueError, match="3 prompts for 8 images"):
        rs.inputs(world["images"], PROMPTS[:3])
    bare = rs.inputs(world["images"], PROMPTS).replace(prompt={})
    with pytest.raises(ValueError, match="inputs lack prompt tokens for backbone 'A'"):
        jax.eval_shape(rs.apply, rs.params, bare)
    with pytest.raises(ValueError, match=r"repeated: \['alignment'\]"):
        RewardSet([ClipScore(a), ClipScore(b)])
    twin = ClipBackbone("A", b.module, b.params, b.processor, b.tokenizer)
    with pytest.raises(ValueError, match="two different backbones are both named 'A'"):
        RewardSet([PickScore(a), ClipScore(twin)])
    with pytest.raises(ValueError, match="the MLP takes 24-d embeddings but backbone 'B' gives 16"):
        Aesthetic.from_pth(world["pth"], b, dims=None)
    with pytest.raises(CheckpointError, match=r"layer widths \(24, 32, 16, 8, 4, 1\), expected "
                                              r"\(768, 1024"):
        Aesthetic.from_pth(world["pth"], a)
    with pytest.raises(ValueError, match="text must be one of"):
        PickScore(a, text="caption")
    with pytest.raises(ValueError, match=r"probe shapes .*expected weight \(3, 16\)"):
        Sentiment(b, {"weight": jnp.zeros((3, 24)), "bias": jnp.zeros(3)})
    # A folder without preprocessor_config.json, and a processor that does not fit the tower.
    (tmp_path / "noproc").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "noproc" / f).write_bytes((world["folder_a"] / f).read_bytes())
    with pytest.raises(CheckpointError, match="noproc: missing preprocessor_config.json"):
        ClipBackbone.load("X", tmp_path / "noproc")
    with pytest.raises(ValueError, match=r"produces \(30, 30\) images but the vision tower "
                                         "takes 24 x 24"):
        ClipBackbone.load("X", world["folder_b"], processor=world["folder_a"])


def test_build_parrot_rewards_from_local_folders(world, values):
    """The paper-scale builder on tiny folders: backbones shared where the models coincide,
    values equal to the hand-built set's."""
    config = ParrotRewardsConfig(
        aesthetic_clip=str(world["folder_a"]), aesthetic_weights=str(world["pth"]),
        aesthetic_dims=AESTHETIC_DIMS, pickscore=str(world["folder_a"]),
        pickscore_processor=None, clip_score=str(world["folder_b"]),
        sentiment_clip=str(world["folder_a"]))
    rs = build_parrot_rewards(config)
    assert rs.names == ("aesthetics", "human_preference", "alignment", "sentiment")
    assert list(rs.backbones) == [str(world["folder_a"]), str(world["folder_b"])]
    inputs, expected = values
    out = np.asarray(rs(rs.inputs(world["images"], PROMPTS)))
    np.testing.assert_allclose(out, expected[:, [0, 2, 3, 4]], atol=1e-5, rtol=0)
    missing = ParrotRewardsConfig(aesthetic_clip=str(world["folder_a"]),
                                  aesthetic_weights=str(world["folder_a"] / "nope.pth"),
                                  pickscore=str(world["folder_a"]), pickscore_processor=None,
                                  clip_score=str(world["folder_b"]),
                                  sentiment_clip=str(world["folder_a"]))
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        build_parrot_rewards(missing)


class _Mean(HostReward):
    name = "mean"

    def compute(self, images):
        return images.mean(axis=(1, 2, 3))


def test_submit_builds_the_shard_list_on_the_calling_thread():
    """jaxlib builds a sharded array's shard list lazily, running Python per shard, and a
    second thread reading it mid-build sees a partial list: two host rewards copying one fresh
    batch failed in CI with IndexError inside ``device_get``. ``submit`` must build the list
    before its workers run. The hook reads the list from inside every per-shard Python call a
    worker makes: a worker that builds the list itself sees it partial there."""
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    images = jax.jit(lambda x: x * 0.5, out_shardings=sharding)(jnp.ones((8, 4, 4, 3)))
    seen: list[int] = []  # len(images._arrays) as the workers saw it
    inside = threading.local()

    def hook(frame, event, arg):
        if (event == "call" and frame.f_code.co_name == "make_single_device_sharding"
                and threading.current_thread() is not threading.main_thread()
                and not getattr(inside, "on", False)):
            inside.on = True
            try:
                seen.append(len(images._arrays))
            finally:
                inside.on = False

    threading.setprofile(hook)  # the pools' threads start inside submit, after this
    try:
        with _Mean(workers=2) as a, _Mean(workers=2) as b:
            values = [a.submit(images), b.submit(images)]
            values = [v.result(timeout=30) for v in values]
    finally:
        threading.setprofile(None)
    # Empty: jaxlib no longer calls this function per shard, and the test no longer observes
    # the build; find the new name, or drop the priming if the build became atomic.
    assert seen
    assert set(seen) == {8}, seen
    np.testing.assert_allclose(values, 0.5)
