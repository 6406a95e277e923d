"""Several JAX processes, as pod workers run: 2 processes x 4 CPU devices on 127.0.0.1 (gloo
collectives) sharing one workdir in a bucket (``gs://`` on a local GCS server, as pod workers
share one), against 1 process x 8 devices in this one on a local folder. The same metrics,
files written once, a checkpoint that resumes in another layout, a killed worker that stops the
other with its name, a restart that resumes; for train.py and for PEN SFT."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from test_pen_sft import tiny_config as sft_config
from test_train_loop import tiny_config

from parrot_jax import sample, storage
from parrot_jax.export_pen import export_pen
from parrot_jax.training import pen_sft, train_and_evaluate
from parrot_jax.training.metrics import read_metrics
from parrot_jax.training.tensorboard import _records

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.py", "--config", "configs/tiny.py:smoke"]
# configs/pen_sft.py:tiny as test_pen_sft.tiny_config shrinks it.
SFT = ["-m", "parrot_jax.training.pen_sft", "--config", "configs/pen_sft.py:tiny",
       "--config.data.synthetic_size=384", "--config.data.heldout_size=64",
       "--config.batch_size=16", "--config.eval_batch_size=32", "--config.num_train_steps=20",
       "--config.log_every=5", "--config.eval_every=20", "--config.checkpoint_every=10"]
TIMEOUT = 300  # seconds a launch may take here before the test gives up on it
HEARTBEAT = 10  # --heartbeat_timeout of the launches

pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest; the launches set it too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``processes`` processes of ``command`` x ``devices`` CPU devices each on one workdir,
    each logging to ``<logs>/<name>_<i>.log``."""

    def __init__(self, command: list[str], workdir: Path | str, logs: Path, name: str,
                 processes: int = 2, devices: int = 4, extra: tuple[str, ...] = ()):
        port = _free_port()
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
        self.logs = [logs / f"{name}_{i}.log" for i in range(processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            launch = ([] if processes == 1 else [
                "--config.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}", f"--process_id={i}",
                f"--heartbeat_timeout={HEARTBEAT}"])
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, *command, f"--workdir={workdir}", *launch, *extra],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self) -> list[int]:
        """Exit statuses; kills every process when one outlives ``TIMEOUT``."""
        deadline = time.monotonic() + TIMEOUT
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def succeed(self) -> None:
        codes = self.wait()
        assert codes == [0] * len(codes), "\n".join(
            f"process {i} exited {c}:\n{self.output(i)[-3000:]}" for i, c in enumerate(codes))


def kill_process_1_when_resuming(launch: Launch) -> None:
    """SIGKILL process 1 once it logs that it resumes; process 0 must then stop, non-zero,
    within 2 minutes, its log naming task 1 (JAX's coordinator notices the missing heartbeats
    after --heartbeat_timeout; the wording depends on where process 0 waits)."""
    deadline = time.monotonic() + TIMEOUT
    while "Resuming" not in launch.output(1) and time.monotonic() < deadline:
        assert launch.procs[1].poll() is None, launch.output(1)[-3000:]
        time.sleep(0.2)
    launch.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = launch.wait()
    stopped_after = time.monotonic() - killed_at
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, codes
    assert stopped_after <= 120, stopped_after
    assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\s",
                     launch.output(0)), launch.output(0)[-3000:]


def copy_tree(source, target, skip: tuple[str, ...] = ()) -> None:
    """Copy a workdir between a bucket and a local folder (either way), leaving out the
    ``skip`` paths (relative, ``/``-joined)."""
    source, target = storage.path(source), storage.path(target)
    for file, relative in storage.files(source):
        if not any(relative == s or relative.startswith(s + "/") for s in skip):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_bytes(file.read_bytes())


def _by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in records}


def _steps_of(workdir: Path) -> list[int]:
    """The step of every event in a local workdir's TensorBoard files."""
    return [Event.FromString(r[12:-4]).step for f in (workdir / "tensorboard").iterdir()
            for r in _records(f.read_bytes())]


def assert_same_metrics(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """Equal keys; values equal to ``rtol`` relative difference (rounding-level values, under
    1e-6 in size such as a KL of 1e-12, to 1e-6 absolute)."""
    assert got.keys() == want.keys(), got.keys() ^ want.keys()
    for key, w in want.items():
        g = got[key]
        assert abs(g - w) <= max(rtol * max(abs(g), abs(w)), 1e-6 * (abs(w) < 1e-6)), (key, g, w)


# --- train.py ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, gcs_bucket):
    """``(tmp, two, one)``: the smoke run as 2 processes x 4 devices in a bucket (``two``) and
    as 1 x 8 in this process in a local folder (``one``)."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    two, one = storage.path(f"{gcs_bucket}/multiprocess/two"), tmp / "one"
    storage.remove_tree(two.parent)
    launch = Launch(TRAIN, two, tmp, "two")
    train_and_evaluate(tiny_config("smoke"), one)  # meanwhile, here
    launch.succeed()
    return tmp, two, one


def test_two_processes_equal_one(train_runs):
    _, two, one = train_runs
    got, want = _by_step(read_metrics(two)), _by_step(read_metrics(one))
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        assert_same_metrics(got[step], want[step])
    # Written once, by process 0: one record per step, one TensorBoard events file, the same
    # pictures and checkpoints as one process writes.
    assert [r["step"] for r in read_metrics(two)] == [1, 2]
    files = lambda w, d: sorted(p.name for p in (w / d).iterdir())  # noqa: E731
    assert len(files(two, "tensorboard")) == len(files(one, "tensorboard")) == 1
    assert files(two, "eval") == files(one, "eval") and files(two, "eval")
    assert files(two, "checkpoints") == files(one, "checkpoints")
    assert json.loads((two / "config.json").read_text())["distributed"] is True
    # TensorBoard's file in the bucket holds each step once (uploaded whole, never appended).
    (events,) = (two / "tensorboard").iterdir()
    steps = [Event.FromString(r[12:-4]).step for r in _records(events.read_bytes())]
    assert sorted(s for s in steps if s) == sorted(s for s in _steps_of(one) if s)
    # Nothing of it landed on the workers' disks as a local "gs:" folder.
    assert not (ROOT / "gs:").exists()


def test_sample_reads_a_bucket_workdir(train_runs, tmp_path):
    """``parrot_jax.sample`` reads the 2 x 4 run from its bucket (config, tokenizers,
    checkpoint) as it reads the 1 x 8 run from a local folder: the same expansion and
    conditioning, and images within rounding of each other."""
    _, two, one = train_runs
    args = ["--prompt", "a cat", "--num_images", "2", "--identifiers", "1,3", "--seed", "3"]
    got = sample.main(["--workdir", str(two), "--out", str(tmp_path / "two"), *args])
    want = sample.main(["--workdir", str(one), "--out", str(tmp_path / "one"), *args])
    assert got["model"] == want["model"] == "step_2"
    assert got["conditioning_text"] == want["conditioning_text"]
    for name in want["files"]:
        a, b = (np.asarray(Image.open(tmp_path / w / name), np.int32) for w in ("two", "one"))
        assert np.abs(a - b).max() <= 2, name


def test_a_two_process_checkpoint_resumes_in_one_process(train_runs):
    """2 x 4's checkpoint continues in 1 x 8 (here) and 1 x 4 (a process of 4 devices) to
    the same iteration 3 (orbax reshards the arrays to the new device layout)."""
    tmp, two, _ = train_runs
    on_eight, on_four = tmp / "on_eight", two.parent / "on_four"  # a local copy; the bucket
    copy_tree(two, on_eight)
    copy_tree(two, on_four)
    launch = Launch(TRAIN, on_four, tmp, "on_four", processes=1, devices=4,
                    extra=("--config.num_iterations=3",))
    config = tiny_config("smoke")
    config.num_iterations = 3
    result = train_and_evaluate(config, on_eight)
    launch.succeed()
    assert result["step"] == 3
    eight, four = _by_step(read_metrics(on_eight)), _by_step(read_metrics(on_four))
    assert sorted(eight) == sorted(four) == [1, 2, 3]
    assert_same_metrics(four[3], eight[3])


def test_a_killed_process_stops_the_other_and_a_restart_resumes(train_runs):
    """Two processes continue the 2 x 4 run to iteration 3; process 1 is killed (SIGKILL)
    after checkpoint 2; process 0 stops within a bounded time with an error naming it; both
    restarted resume to the iteration 3 the uninterrupted checkpoint reaches in 1 x 8."""
    tmp, two, _ = train_runs
    killed, uninterrupted = two.parent / "killed", tmp / "uninterrupted"
    copy_tree(two, killed)
    copy_tree(two, uninterrupted)
    kill_process_1_when_resuming(
        Launch(TRAIN, killed, tmp, "killed", extra=("--config.num_iterations=3",)))

    Launch(TRAIN, killed, tmp, "restarted", extra=("--config.num_iterations=3",)).succeed()
    config = tiny_config("smoke")
    config.num_iterations = 3
    train_and_evaluate(config, uninterrupted)
    got, want = _by_step(read_metrics(killed)), _by_step(read_metrics(uninterrupted))
    assert sorted(got) == [1, 2, 3]
    assert_same_metrics(got[3], want[3])


# --- PEN SFT -------------------------------------------------------------------------------

def test_pen_sft_two_processes_equal_one_and_resume_in_one(tmp_path, gcs_bucket):
    """PEN SFT as 2 x 4 (in a bucket) equals 1 x 8, writes its metrics once, and its
    checkpoint at step 10 continues in 1 x 8 to the uninterrupted run's step 20; a killed
    process stops the other with its name, and both restarted resume to the same step 20."""
    two, one = storage.path(f"{gcs_bucket}/sft/two"), tmp_path / "one"
    resumed, killed = tmp_path / "resumed", two.parent / "killed"
    storage.remove_tree(two.parent)
    launch = Launch(SFT, two, tmp_path, "sft")
    want = pen_sft.train_and_evaluate(sft_config(), one)
    launch.succeed()
    records = [json.loads(line) for line in (two / pen_sft.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20]
    want_records = [json.loads(line)
                    for line in (one / pen_sft.METRICS_FILE).read_text().splitlines()]
    for got, expected in zip(_by_step(records).values(), _by_step(want_records).values(),
                             strict=True):
        assert_same_metrics({k: v for k, v in got.items() if k != "examples_per_s"},
                            {k: v for k, v in expected.items() if k != "examples_per_s"})
    # The 2 x 4 checkpoint of step 10 (step 20 removed) continues here, in 1 x 8.
    copy_tree(two, resumed, skip=(f"{pen_sft.CHECKPOINT_DIR}/20",))
    copy_tree(resumed, killed)
    result = pen_sft.train_and_evaluate(sft_config(), resumed)
    assert result["step"] == 20
    assert abs(result["eval_loss"] - want["eval_loss"]) <= 1e-5 * abs(want["eval_loss"])
    # From the same checkpoint as 2 x 4: process 1 killed once it resumes; then both again.
    kill_process_1_when_resuming(Launch(SFT, killed, tmp_path, "sft_killed"))
    Launch(SFT, killed, tmp_path, "sft_restarted").succeed()
    last = json.loads((killed / pen_sft.METRICS_FILE).read_text().splitlines()[-1])
    assert last["step"] == 20
    assert abs(last["eval_loss"] - want["eval_loss"]) <= 1e-5 * abs(want["eval_loss"])
    # export_pen reads the bucket run (its config, tokenizer and checkpoint) as a local one.
    out, step = export_pen(str(killed), tmp_path / "pen")
    assert step == 20 and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


# --- launch flags ----------------------------------------------------------------------------

def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("tool", ["train", "pen_sft"])
def test_bad_launch_flags_fail_naming_the_flag(tool, tmp_path, capsys):
    """Refused before JAX starts, in bounded time: flags without distributed, an incomplete
    set, a process id out of range, a malformed address, a coordinator that never answers,
    and process 0 on a port another program listens on."""
    if tool == "train":
        spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        main, base = train.main, ["--config", str(ROOT / "configs" / "tiny.py:smoke")]
    else:
        main, base = pen_sft.main, ["--config", str(ROOT / "configs" / "pen_sft.py:tiny")]
    base = [*base, f"--workdir={tmp_path / 'w'}"]
    on = [*base, "--config.distributed=True"]
    closed = _free_port()
    assert _refused(main, [*base, "--process_id=0"], capsys).endswith(
        "--process_id needs --config.distributed=True")
    assert "needs --coordinator_address and --process_id" in _refused(
        main, [*on, "--num_processes=2"], capsys)
    assert "--process_id=2 is out of range for --num_processes=2" in _refused(
        main, [*on, f"--coordinator_address=127.0.0.1:{closed}", "--num_processes=2",
               "--process_id=2"], capsys)
    assert "--coordinator_address=host-without-port: expected HOST:PORT" in _refused(
        main, [*on, "--coordinator_address=host-without-port", "--num_processes=2",
               "--process_id=1"], capsys)
    start = time.monotonic()
    line = _refused(main, [*on, f"--coordinator_address=127.0.0.1:{closed}",
                           "--num_processes=2", "--process_id=1",
                           "--initialization_timeout=2"], capsys)
    assert f"--coordinator_address: coordinator 127.0.0.1:{closed}: nothing answered within " \
           "2 s" in line and time.monotonic() - start < 30
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"process 0 cannot listen on port {port}" in _refused(
            main, [*on, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   "--process_id=0"], capsys)
    assert not (tmp_path / "w").exists()  # nothing written
