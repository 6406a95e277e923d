"""Every paper-scale model at its real size, executed on this CPU (``-m slow``; not in the
default run): ``configs/sd15.py:random,cpu`` trains to iteration 1, resumes to 2, ends with the
final evaluation, and ``parrot_jax.sample`` draws from the run. Target: <= 30 min and <= 20 GB
peak resident memory on a 2-core, 24 GB machine."""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/sd15.py:random,cpu"]
MINUTES, GIB = 30, 20


def _run(args: list[str]) -> None:
    # One CPU device (the models are replicated per device), nothing downloaded.
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=MINUTES * 60)
    assert done.returncode == 0, done.stderr[-5000:]


@pytest.mark.slow
def test_sd15_size_run_on_the_cpu(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "images"
    start = time.monotonic()
    _run(["train.py", *CONFIG, f"--workdir={workdir}", "--config.num_iterations=1",
          "--config.final_eval.prompts="])
    assert (workdir / "checkpoints" / "1").is_dir()
    _run(["train.py", *CONFIG, f"--workdir={workdir}"])
    _run(["-m", "parrot_jax.sample", f"--workdir={workdir}", "--prompt=a cat", f"--out={out}",
          "--num_images=1"])
    minutes = (time.monotonic() - start) / 60
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # KiB -> GiB
    print(f"sd15:random,cpu: {minutes:.1f} min, peak RSS {peak:.1f} GiB")
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps == [1, 2]
    final = json.loads((workdir / "final_eval.json").read_text())
    assert final["details"]["num_prompts"] == 2
    images = sorted(out.glob("*.png"))
    assert images and Image.open(images[0]).size == (128, 128)
    assert minutes <= MINUTES and peak <= GIB, (minutes, peak)
