"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere, and one
persistent compilation cache for the session: the train.py processes that tests start (kill and
resume, several processes) reuse what the test process compiled instead of compiling it again."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # a fresh one: never another version's code
    _CACHE = tempfile.mkdtemp(prefix="parrot_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    # Every program, not only those over 1 s to compile: the launched processes compile many
    # small ones (measured: the kill and SIGTERM tests 86 s -> 77 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny diffusers configs in the shape of the real ones (kwargs of the torch constructors).
SD1_LIKE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)
# SD 2.x traits: linear projections, per-block head counts, upcast attention; plus a deeper
# transformer, a mid block with three levels and a non-default freq_shift.
SD2_LIKE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=[2, 4, 8], use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8, transformer_layers_per_block=[1, 2, 1],
    flip_sin_to_cos=False, freq_shift=1,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=16,
)


def perturbed(model, seed: int = 0):
    """Random non-zero weights everywhere (diffusers zero-initialises some output convs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _saved(tmp_path_factory, name: str, cls_name: str, config: dict):
    import diffusers

    model = perturbed(getattr(diffusers, cls_name)(**config))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def sd1_unet(tmp_path_factory):
    """(torch model, folder written by save_pretrained) for an SD-1-like tiny UNet."""
    return _saved(tmp_path_factory, "sd1_unet", "UNet2DConditionModel", SD1_LIKE_UNET)


@pytest.fixture(scope="session")
def sd2_unet(tmp_path_factory):
    return _saved(tmp_path_factory, "sd2_unet", "UNet2DConditionModel", SD2_LIKE_UNET)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return _saved(tmp_path_factory, "vae", "AutoencoderKL", TINY_VAE)


@pytest.fixture(scope="module")
def fast_compiles():
    """Unoptimised XLA for one test module (tiny models: compiling dominates the run time).
    Use with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``; restored after it."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# Tiny transformers T5 configs (kwargs of transformers.T5Config): 8 buckets up to distance 20, so
# sequences of ~40 tokens reach the logarithmic and the clipped buckets. The first is the original
# T5 (relu, tied head, rescaled output; deeper decoder than encoder), the second FLAN-T5's layout.
TINY_T5 = dict(
    vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
)
TINY_FLAN_T5 = dict(TINY_T5, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False)


def tiny_t5_torch(config: dict, seed: int = 0, ff_scale: float = 1.0):
    """A transformers ``T5ForConditionalGeneration`` with non-trivial random weights, in eval mode.

    Layer norms ~ 1 + 0.2 N(0, 1) and relative-position tables ~ N(0, 1) (so the bias matters),
    the rest T5's init plus noise, feed-forward and attention-output weights times ``ff_scale``.
    ``tie_word_embeddings=False`` gets its own ``lm_head`` (transformers 5 ties it regardless).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
    if not config.get("tie_word_embeddings", True):
        model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(model.lm_head.weight.shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape))
            elif name == "shared.weight":
                p.mul_(0.3)
            elif name != "lm_head.weight":
                p.add_(0.05 * torch.randn(p.shape))
                if "DenseReluDense" in name or name.endswith(".o.weight"):
                    p.mul_(ff_scale)
    return model.eval()


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://parrot-test``: a bucket on a local GCS server (tests/fake_gcs.py) that gcsfs,
    etils.epath and orbax / TensorStore reach in this process and in the processes tests
    start (the variables are set in os.environ for the session). The same server has
    ``gs://parrot-read-only``, where every write is refused (403)."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its log goes to a file: a pipe nobody reads would fill with the tracebacks of requests
    # cut off by killed clients and block the server.
    log = Path(tempfile.mkdtemp(prefix="parrot_jax_fake_gcs_")) / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_gcs.py")),
                                   str(port), "parrot-test", "parrot-read-only"],
                                  stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"tests/fake_gcs.py did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
    patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's TensorStore
    patch.setenv("NO_GCE_CHECK", "True")  # google-auth: no metadata server to ask
    yield "gs://parrot-test"
    patch.undo()
    server.kill()
    server.wait()
    shutil.rmtree(log.parent, ignore_errors=True)
