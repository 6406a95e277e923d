"""Workdir files in a bucket (``parrot_jax.storage``), against a local GCS server
(conftest ``gcs_bucket``): appends that keep what was there, atomic replaces, folders moved,
saved and copied back, logs cut back to a checkpoint, TensorBoard files uploaded whole and
rolled, a damaged checkpoint set aside, all in ``gs://``, and workdirs this process cannot
write in refused at once."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.compat.proto.event_pb2 import Event

from parrot_jax import cli, policy, storage, workdir
from parrot_jax.training import tensorboard as tb
from parrot_jax.training.metrics import read_metrics, truncate_metrics


@pytest.fixture
def bucket(gcs_bucket, request):
    """A fresh folder of the test bucket for each test."""
    folder = storage.path(f"{gcs_bucket}/{request.node.name}")
    storage.remove_tree(folder)
    return folder


def _steps(data: bytes) -> list[int]:
    return [Event.FromString(r[12:-4]).step for r in tb._records(data)]


def test_paths_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert storage.path("run") == storage.path(tmp_path / "run")  # local: absolute
    assert not storage.is_remote("run") and storage.is_remote("gs://b/run")
    assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    with pytest.raises(storage.StorageError, match=r"^s3://b/run: s3:// is not supported"):
        storage.path("s3://b/run")
    import fsspec

    def no_gcsfs(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    with monkeypatch.context() as m:  # gcsfs not installed: the error names the extra
        m.setattr(fsspec, "get_filesystem_class", no_gcsfs)
        with pytest.raises(storage.StorageError, match=r"^gs://b/run: gs:// paths need the "
                           r"gcsfs package \(pip install 'parrot-jax\[gcs\]'\)$"):
            storage.path("gs://b/run")
    # The tools say so in one line naming the flag, before JAX starts (exit 2).
    with pytest.raises(SystemExit) as exit_:
        cli.check_workdir("train.py", "s3://b/run")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "train.py: error: --workdir: s3://b/run: s3:// is not supported (a local path or gs://)")
    with pytest.raises(policy.RunError, match=r"^--workdir s3://b/run: s3:// is not supported"):
        policy.read_config("s3://b/run")


def test_a_workdir_it_cannot_write_is_refused_before_jax_starts(bucket, tmp_path, capsys):
    def refusal(workdir):
        with pytest.raises(SystemExit) as exit_:
            cli.check_workdir("train.py", workdir)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.strip()

    assert cli.check_workdir("train.py", str(bucket)) is None
    assert not bucket.exists()  # the probe object is gone: nothing under the folder
    err = refusal("gs://parrot-read-only/run")  # an account without storage.objects.create
    assert err.startswith("train.py: error: --workdir gs://parrot-read-only/run: cannot write "
                          "there (OSError: Forbidden: "), err
    assert "does not have storage.objects.create access" in err
    err = refusal("gs://parrot-no-such-bucket/run")
    assert err.startswith("train.py: error: --workdir gs://parrot-no-such-bucket/run: cannot "
                          "write there (FileNotFoundError: ") and err.endswith(
                              "; does the bucket exist?)"), err
    (tmp_path / "file").write_text("")
    assert refusal(str(tmp_path / "file" / "run")) == (
        f"train.py: error: --workdir {tmp_path}/file/run: {tmp_path}/file is not a folder")
    assert cli.check_workdir("train.py", str(tmp_path / "new" / "run")) is None
    assert not (tmp_path / "new").exists()  # a local check writes nothing


def test_files_in_a_bucket(bucket):
    log = bucket / "metrics.jsonl"
    storage.append(log, "a\n")
    storage.append(log, "b\n")  # gcsfs's own append would have left "b\n" alone
    assert log.read_text() == "a\nb\n"
    storage.replace(log, b"c\n")
    assert log.read_text() == "c\n"

    def save(folder: str) -> None:
        os.makedirs(os.path.join(folder, "sub"))
        for name, text in (("x.json", "{}"), ("sub/y.txt", "y")):
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)

    storage.save_folder(save, bucket / "tok")
    local = storage.local_copy(bucket / "tok")
    assert not storage.is_remote(local)
    assert open(os.path.join(local, "sub", "y.txt")).read() == "y"
    assert storage.local_copy(bucket / "tok") == local  # copied once per process
    storage.move(bucket / "tok", bucket / "aside" / "tok")
    assert not (bucket / "tok").exists()
    assert (bucket / "aside" / "tok" / "sub" / "y.txt").read_text() == "y"
    storage.remove_tree(bucket / "aside")
    assert not (bucket / "aside").exists()


def test_logs_cut_back_in_a_bucket(bucket, monkeypatch):
    for step in (1, 2, 3):
        storage.append(bucket / "metrics.jsonl", json.dumps({"step": step}) + "\n")
    storage.append(bucket / "metrics.jsonl", '{"step": 4, "cut sh')  # a kill mid-write
    assert truncate_metrics(bucket, 2) == 2
    assert [r["step"] for r in read_metrics(bucket)] == [1, 2]

    monkeypatch.setattr(tb, "ROLL_BYTES", 300)  # a new events file every few records
    writer = tb.TensorBoardWriter(bucket / "tb")
    for step in range(1, 9):
        writer.scalars(step, {"loss": float(step), "reward": -float(step)})
        writer.flush()
    writer.close()
    files = sorted((bucket / "tb").iterdir())
    assert len(files) > 1  # rolled; each file whole
    steps = [s for f in files for s in _steps(f.read_bytes()) if s]
    assert sorted(steps) == list(range(1, 9))
    assert tb.truncate_events(bucket / "tb", 5) == 3
    steps = [s for f in sorted((bucket / "tb").iterdir()) for s in _steps(f.read_bytes()) if s]
    assert sorted(steps) == list(range(1, 6))


def test_damaged_checkpoint_set_aside_in_a_bucket(bucket):
    state = {"w": jnp.arange(6.0), "b": jnp.ones((2, 3))}
    manager = workdir.checkpoint_manager(bucket)
    for step in (1, 2):
        workdir.save(manager, step, jax_tree_scale(state, step))
    manager.wait_until_finished()
    manager.close()
    # Damage checkpoint 2: every file of its state emptied.
    for file, _ in storage.files(bucket / "checkpoints" / "2" / "state"):
        file.write_bytes(b"")
    manager = workdir.checkpoint_manager(bucket)
    restored, step = workdir.restore_latest(manager, state)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    assert manager.all_steps() == [1]
    assert (bucket / "checkpoints.damaged" / "2" / "state").is_dir()
    manager.close()


def jax_tree_scale(tree, factor):
    return {k: v * factor for k, v in tree.items()}
