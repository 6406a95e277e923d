"""What a run leaves behind when it is killed or diverges, on its own files: logs cut back to
the checkpoint a resume starts from (a line or record cut short by the kill included), a
non-finite state refused before anything is written, and damaged checkpoints skipped and set
aside. The loop-level cases (kill -9 and resume, a damaged checkpoint, a diverged state) are in
test_train_loop.py."""

import gc
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from parrot_jax.training.metrics import read_metrics, truncate_metrics
from parrot_jax.training.tensorboard import TensorBoardWriter, truncate_events
from parrot_jax.workdir import (
    CheckpointError,
    checkpoint_manager,
    nonfinite_parts,
    restore_latest,
    save,
)


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    lines = [json.dumps({"step": s, "t2i/loss": 0.1 * s}) + "\n" for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 6, "t2i/lo')  # killed
    assert truncate_metrics(tmp_path, 3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
    assert truncate_metrics(tmp_path, 3) == 0
    assert truncate_metrics(tmp_path, -1) == 3  # no checkpoint: every record goes
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert truncate_metrics(tmp_path / "nothing_here", 3) == 0
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def test_tensorboard_events_are_cut_back_to_the_restored_step(tmp_path):
    first = TensorBoardWriter(tmp_path)  # the run that was killed after step 5
    for step in range(1, 6):
        first.scalars(step, {"t2i/loss": 0.1 * step})
    first.image(4, "eval/grid", np.zeros((4, 4, 3), np.uint8))
    first.close()
    (name,) = os.listdir(tmp_path)
    with open(tmp_path / name, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # a record cut short by the kill
    assert truncate_events(tmp_path, 3) == 3  # steps 4 and 5, and the image at 4
    second = TensorBoardWriter(tmp_path)  # the resumed run
    for step in (4, 5):
        second.scalars(step, {"t2i/loss": 1.0 + step})
    second.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("t2i/loss")] == [
        (1, 0.1), (2, 0.2), (3, 0.3), (4, 5.0), (5, 6.0)]
    assert events.Tags()["images"] == []
    assert truncate_events(tmp_path, 5) == 0
    assert truncate_events(tmp_path / "nothing_here", 3) == 0


def _state(scale=1.0):
    return {"step": jnp.int32(3), "t2i": {"trainable": {"w": jnp.ones((4, 2)) * scale},
                                          "opt_state": [jnp.zeros(3), jnp.zeros(())]},
            "pen": {"lora": {"a": jnp.ones(5)}}, "key": jnp.zeros(2, jnp.uint32)}


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = _state()
    assert nonfinite_parts(state) == []
    state["t2i"]["trainable"]["w"] = state["t2i"]["trainable"]["w"].at[1, 1].set(jnp.nan)
    state["pen"]["lora"]["a"] = state["pen"]["lora"]["a"].at[0].set(-jnp.inf)
    assert nonfinite_parts(state) == ["pen/lora", "t2i/trainable"]
    manager = checkpoint_manager(tmp_path)
    with pytest.raises(FloatingPointError, match=r"^checkpoint 3 not written: non-finite values "
                       r"in the state's pen/lora, t2i/trainable$"):
        save(manager, 3, state)
    manager.wait_until_finished()
    assert manager.all_steps() == [] and os.listdir(tmp_path / "checkpoints") == []
    manager.close()


def _saved(tmp_path, steps):
    manager = checkpoint_manager(tmp_path, max_to_keep=None)
    for step in steps:
        save(manager, step, _state(step))
    manager.wait_until_finished()
    return manager


@pytest.mark.parametrize("damage", ["truncated_data", "empty_metadata", "missing_state"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    manager = _saved(tmp_path, (2, 4, 6))
    state_dir = tmp_path / "checkpoints" / "6" / "state"
    if damage == "truncated_data":
        for f in (state_dir / "d").iterdir():
            os.truncate(f, 10)
    elif damage == "empty_metadata":
        (state_dir / "_METADATA").write_text("")
    else:
        for f in sorted(state_dir.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        state_dir.rmdir()
    caplog.set_level(logging.WARNING)
    state, step = restore_latest(manager, _state(0.0), unit="step")
    assert step == 4 and float(state["t2i"]["trainable"]["w"][0, 0]) == 4.0
    gc.collect()  # asyncio logs abandoned reads when collected: let that happen in the test
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and "orbax" not in r.pathname]
    assert len(warnings) == 2 and len(warnings[0]) < 400, warnings
    assert warnings[0].startswith(f"checkpoint {tmp_path}/checkpoints/6 cannot be restored (")
    assert warnings[0].endswith("); falling back to step 4")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert os.listdir(tmp_path / "checkpoints.damaged") == ["6"]
    assert manager.all_steps() == [2, 4]  # the manager forgot it: step 6 can be saved again
    save(manager, 6, _state(6.0))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 6]
    manager.close()


def test_only_abandoned_restore_reads_are_silenced():
    """asyncio logs a failed restore's abandoned reads when it collects them, at any time later;
    the filter drops those records and keeps every other unretrieved error."""
    from parrot_jax.workdir import _AbandonedTasks

    def record(message, error):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, message, None,
                                 (type(error), error, None))

    read = ValueError('OUT_OF_RANGE: Error opening "zarr" driver [tensorstore_spec=\'{}\']')
    quiet = _AbandonedTasks()
    assert not quiet.filter(record("Task exception was never retrieved\nfuture: <Task>", read))
    assert not quiet.filter(record("Future exception was never retrieved\nfuture: <F>", read))
    assert not quiet.filter(record("Future exception was never retrieved",
                                   RuntimeError("Event loop is closed")))
    assert quiet.filter(record("Future exception was never retrieved", ValueError("other")))
    assert quiet.filter(record("Unclosed client session", read))


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    manager = _saved(tmp_path, (1, 2))
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoints: no checkpoint can be restored \(2: "
                       r"JSONDecodeError: .*; 1: JSONDecodeError: .*\)\. Move .* aside"):
        restore_latest(manager, _state())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "checkpoints.damaged").exists()
    manager.close()
    empty = checkpoint_manager(tmp_path / "fresh")
    state = _state()
    assert restore_latest(empty, state) == (state, None)
    empty.close()


def test_restored_arrays_keep_the_target_shardings(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    manager = checkpoint_manager(tmp_path)
    target = {"x": jax.device_put(jnp.arange(16.0), sharding)}
    save(manager, 1, target)
    manager.wait_until_finished()
    state, step = restore_latest(manager, {"x": jax.device_put(jnp.zeros(16), sharding)})
    assert step == 1 and state["x"].sharding == sharding
    np.testing.assert_array_equal(state["x"], np.arange(16.0))
    manager.close()
