"""The restricted .pth reader and the LAION aesthetic MLP against torch."""

import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch

from parrot_jax.convert import CheckpointError
from parrot_jax.rewards import LAION_AESTHETIC_DIMS, aesthetic_mlp, load_state_dict
from parrot_jax.rewards.aesthetic import mlp_from_state_dict


class LaionMLP(torch.nn.Module):
    """The published predictor's architecture (improved-aesthetic-predictor's ``MLP``)."""

    def __init__(self, dims):
        super().__init__()
        d = dims
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2), torch.nn.Linear(d[1], d[2]),
            torch.nn.Dropout(0.2), torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(d[3], d[4]), torch.nn.Linear(d[4], d[5]))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def laion_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = LaionMLP(LAION_AESTHETIC_DIMS).eval()
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_full_size_aesthetic_mlp_matches_torch(laion_pth):
    model, path = laion_pth
    state = load_state_dict(path)
    assert list(state) == list(model.state_dict())  # every key, in order
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(state[key], value.numpy())
    layers = mlp_from_state_dict(state, str(path))
    emb = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32) * 3
    ours = jax.jit(aesthetic_mlp)(layers, emb)
    with torch.no_grad():
        x = torch.from_numpy(emb)
        ref = model(x / x.norm(dim=-1, keepdim=True))[:, 0].numpy()
    assert ours.shape == (5,) and np.ptp(ref) > 1e-3
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_dtypes_views_and_shared_storage(tmp_path):
    """Half / bfloat16 / int storages, a transposed view and two tensors on one storage."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "half": torch.randn(2, 3).half(),
             "bf16": torch.randn(4).bfloat16(), "long": torch.tensor([1, -2, 3])}
    torch.save(state, tmp_path / "m.pth")
    out = load_state_dict(tmp_path / "m.pth")
    for key, value in state.items():
        assert out[key].shape == tuple(value.shape), key
        np.testing.assert_array_equal(out[key].astype(np.float64),
                                      value.to(torch.float64).numpy(), err_msg=key)
    assert out["half"].dtype == np.float16 and out["long"].dtype == np.int64


class _Call:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn, name", [(os.system, "posix.system"), (eval, "__builtin__.eval"),
                                      (getattr, "__builtin__.getattr")])
def test_refuses_any_other_global(tmp_path, fn, name):
    marker = tmp_path / "ran"
    torch.save({"layers.0.weight": torch.zeros(2, 2),
                "layers.0.bias": _Call(fn, f"touch {marker}" if fn is os.system else "1")},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=f"global {name}, which is forbidden"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_refuses_a_torch_global_that_is_not_storage(tmp_path):
    """Even torch's own callables other than _rebuild_tensor_v2 are refused (nn.Parameter)."""
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, tmp_path / "param.pth")
    with pytest.raises(CheckpointError, match=r"torch\._utils\._rebuild_parameter"):
        load_state_dict(tmp_path / "param.pth")


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.pth")
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy pre-1.6 format is not supported"):
        load_state_dict(tmp_path / "legacy.pth")
    torch.save({"a": torch.ones(2), "note": "text"}, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="entry 'note' is a str, not a tensor"):
        load_state_dict(tmp_path / "str.pth")
    # A storage entry cut short: the tensor would read past it.
    torch.save({"a": torch.ones(64)}, tmp_path / "full.pth")
    with zipfile.ZipFile(tmp_path / "full.pth") as src, \
            zipfile.ZipFile(tmp_path / "cut.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:16] if info.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="data/0 holds 16 bytes, fewer than 64 x 4"):
        load_state_dict(tmp_path / "cut.pth")
    # A zip without data.pkl.
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
        z.writestr("x/notes.txt", "hello")
    with pytest.raises(CheckpointError, match="expected one data.pkl"):
        load_state_dict(tmp_path / "other.pth")
    # A truncated pickle.
    with zipfile.ZipFile(tmp_path / "trunc.pth", "w") as z:
        z.writestr("x/data.pkl", pickle.dumps({"a": 1})[:-3])
    with pytest.raises(CheckpointError, match="cannot read data.pkl"):
        load_state_dict(tmp_path / "trunc.pth")


def test_mlp_shape_errors():
    rng = np.random.default_rng(0)

    def linear(i, o):
        return rng.standard_normal((o, i)).astype(np.float32), np.zeros(o, np.float32)

    def state(*pairs):
        out = {}
        for idx, (w, b) in pairs:
            out[f"layers.{idx}.weight"], out[f"layers.{idx}.bias"] = w, b
        return out

    ok = state((0, linear(8, 4)), (2, linear(4, 1)))
    assert [layer["kernel"].shape for layer in mlp_from_state_dict(ok, "f", None)] == \
        [(8, 4), (4, 1)]
    with pytest.raises(CheckpointError, match=r"f: layer widths \(8, 4, 1\), expected \(768"):
        mlp_from_state_dict(ok, "f")  # the LAION widths by default
    with pytest.raises(CheckpointError, match="layers.2.weight has shape .*expected input width 4"):
        mlp_from_state_dict(state((0, linear(8, 4)), (2, linear(5, 1))), "f", None)
    with pytest.raises(CheckpointError, match="missing layers.2.bias"):
        mlp_from_state_dict({k: v for k, v in ok.items() if k != "layers.2.bias"}, "f", None)
    with pytest.raises(CheckpointError, match="last layer has 4 outputs"):
        mlp_from_state_dict(state((0, linear(8, 4))), "f", None)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['head.weight'\]"):
        mlp_from_state_dict({**ok, "head.weight": np.ones((1, 1))}, "f", None)


def test_fetch_uses_the_cache_and_never_downloads_offline(tmp_path, monkeypatch):
    from parrot_jax.rewards.configs import LAION_AESTHETIC_URL, fetch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in .* and HF_HUB_OFFLINE is set"):
        fetch(LAION_AESTHETIC_URL, tmp_path)
    cached = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"  # the URL's file name, unquoted
    cached.write_bytes(b"x")
    assert fetch(LAION_AESTHETIC_URL, tmp_path) == cached
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        fetch(str(tmp_path / "nope.pth"))
