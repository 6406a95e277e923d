"""The Cloud TPU scripts in tpu/: exact gcloud commands from their dry runs, errors, help, and
an end-to-end run against a fake gcloud that plays a one-worker TPU VM in a temporary home."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "stop.sh"]
SETTINGS = [  # environment variables the scripts read; cleared so the caller's shell can't leak in
    "NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "QUEUED",
    "QUEUED_RESOURCE_ID", "VALID_UNTIL_DURATION", "DRY_RUN", "GCLOUD", "WORKER", "SOURCE_DIR",
    "GIT_URL", "GIT_REF", "REMOTE_DIR", "VENV", "PYTHON_VERSION", "EXTRA_PIP", "MODULE",
    "LOG_FILE", "DELETE",
]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """Put a `gcloud` that fails first on PATH: no test may reach a real one."""
    guard = tmp_path_factory.getbasetemp() / "gcloud-guard"
    guard.mkdir(exist_ok=True)
    (guard / "gcloud").write_text("#!/bin/sh\necho 'no real gcloud in tests' >&2\nexit 97\n")
    (guard / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{guard}:{os.environ['PATH']}")


def script(name, *args, env=None, check_rc=0):
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    result = subprocess.run(
        ["bash", str(TPU / name), *args], env={**base, **(env or {})},
        capture_output=True, text=True, timeout=60,
    )
    if check_rc is not None:
        assert result.returncode == check_rc, (result.stdout, result.stderr)
    return result


def commands(name, *args, env=None):
    """The commands a dry run prints, each split back into its argv."""
    out = script(name, "--dry-run", *args, env=env).stdout
    return [shlex.split(line) for line in out.splitlines()]


def remote_command(argv):
    """The --command=... script of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return cmd


@pytest.mark.parametrize("name", [*SCRIPTS, "common.sh"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(TPU / name)], check=True)
    if shutil.which("shellcheck"):  # optional: only where it is installed
        subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", str(TPU / name)], check=True)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_unknown_flag_and_missing_settings(name):
    for flag in ("-h", "--help"):
        r = script(name, flag, env={"GCLOUD": "/nonexistent/gcloud"})
        assert r.stdout.startswith(f"Usage: tpu/{name}") and "--dry-run" in r.stdout
    r = script(name, "--name", "p", "--zone", "z", "--bogus", "--dry-run", check_rc=2)
    assert f"tpu/{name}: error: unknown flag '--bogus'" in r.stderr and r.stdout == ""
    r = script(name, "--dry-run", check_rc=2)
    missing = "missing required setting(s): NAME (--name or environment variable NAME), ZONE"
    assert missing in r.stderr
    assert r.stdout == ""
    r = script(name, "--zone", "z", "--name", check_rc=2)
    assert "--name needs a value" in r.stderr
    r = script(name, "--zone", "z", "--name", "Bad_Name", "--dry-run", check_rc=2,
               env={"ACCELERATOR_TYPE": "v4-8"})
    assert "NAME 'Bad_Name' is not a valid TPU name" in r.stderr


def test_create_single_host():
    assert commands("create.sh", "--name", "parrot", "--zone", "us-west4-a",
                    "--accelerator-type", "v5litepod-8") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "parrot", "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
])
def test_create_runtime_version_defaults_and_env(accelerator, runtime):
    env = {"NAME": "pod", "ZONE": "us-central2-b", "PROJECT": "my-proj",
           "ACCELERATOR_TYPE": accelerator}
    (cmd,) = commands("create.sh", env=env)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
                   "--project=my-proj", f"--accelerator-type={accelerator}", f"--version={runtime}"]
    # An explicit RUNTIME_VERSION wins; a flag wins over its environment variable.
    (cmd,) = commands("create.sh", "--zone=europe-west4-a",
                      env={**env, "RUNTIME_VERSION": "custom-rt"})
    assert "--version=custom-rt" in cmd and "--zone=europe-west4-a" in cmd


def test_create_errors():
    base = ["--name", "p", "--zone", "z", "--dry-run"]
    r = script("create.sh", *base, check_rc=2)
    assert "ACCELERATOR_TYPE (--accelerator-type or environment variable ACCELERATOR_TYPE)" \
        in r.stderr
    r = script("create.sh", *base, "--accelerator-type", "v9x-8", check_rc=2)
    assert "no default runtime version for ACCELERATOR_TYPE 'v9x-8'; set RUNTIME_VERSION" \
        in r.stderr
    r = script("create.sh", *base, "--accelerator-type", "tpu8", check_rc=2)
    assert "ACCELERATOR_TYPE 'tpu8' is not of the form" in r.stderr
    r = script("create.sh", *base, "--accelerator-type", "v4-8", "--valid-until-duration", "1h",
               check_rc=2)
    assert "applies only to queued resources" in r.stderr


def test_create_queued_spot_with_extra_flags():
    (cmd,) = commands("create.sh", "--name", "pod", "--zone", "us-central2-b", "--accelerator-type",
                      "v4-32", "--queued", "--spot", "--valid-until-duration", "6h", "--",
                      "--labels=team=parrot", "--description=Parrot run 1")
    assert cmd == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "pod-qr", "--zone=us-central2-b",
        "--node-id=pod", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
        "--valid-until-duration=6h", "--spot", "--labels=team=parrot",
        "--description=Parrot run 1"]


def test_stop_and_delete():
    loc = ["--name", "parrot", "--zone", "us-west4-a"]
    head = ["gcloud", "compute", "tpus"]
    assert commands("stop.sh", *loc) == [
        [*head, "tpu-vm", "stop", "parrot", "--zone=us-west4-a"]]
    assert commands("stop.sh", *loc, "--delete", "--yes", env={"PROJECT": "pr"}) == [
        [*head, "tpu-vm", "delete", "parrot", "--zone=us-west4-a", "--project=pr", "--quiet"]]
    assert commands("stop.sh", *loc, "--delete", "--queued", "--async") == [
        [*head, "queued-resources", "delete", "parrot-qr", "--zone=us-west4-a", "--force",
         "--async"]]
    r = script("stop.sh", *loc, "--queued", "--dry-run", check_rc=2)
    assert "--queued applies only with --delete" in r.stderr


def test_setup_local_checkout_dry_run():
    pack, scp, ssh = commands("setup.sh", "--name", "parrot", "--zone", "us-west4-a",
                              env={"TMPDIR": "/tmp/x y"})
    archive = "/tmp/x y/parrot-jax-parrot.tar.gz"
    assert pack == ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                    "--exclude-standard", "|", "tar", "-czf", archive, "-C", str(REPO), "--null",
                    "-T", "-"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                   "parrot:parrot-jax.upload.tar.gz", "--zone=us-west4-a", "--worker=all"]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "parrot", "--zone=us-west4-a"]
    assert ssh[7] == "--worker=all"
    remote = remote_command(ssh)
    assert "python3 -m uv venv --python 3.11" in remote
    assert "tar -xzf \"$HOME\"/parrot-jax.upload.tar.gz" in remote
    assert remote.count("python3 -m uv pip install") == 1
    assert "-e \"$HOME\"/parrot-jax'[tpu]' gcsfs;" in remote
    assert "jax.distributed.initialize()" in remote


def test_setup_git_dry_run_and_options():
    (ssh,) = commands("setup.sh", "--name", "p", "--zone", "z", "--git",
                      "https://example.com/me/parrot-jax.git", "--ref", "v0.1", "--worker", "0",
                      "--pip", "tensorboard>=2.16", "--no-check",
                      env={"VENV": "/opt/py env", "PYTHON_VERSION": "3.12"})
    assert "--worker=0" in ssh
    remote = remote_command(ssh)
    assert "git clone --quiet https://example.com/me/parrot-jax.git \"$HOME\"/parrot-jax" in remote
    assert "fetch --quiet origin v0.1 && git -C \"$HOME\"/parrot-jax checkout --quiet --detach" \
        " FETCH_HEAD" in remote
    assert "python3 -m uv venv --python 3.12 '/opt/py env'" in remote
    assert remote.endswith("install --python '/opt/py env'/bin/python"
                           " -e \"$HOME\"/parrot-jax'[tpu]' 'tensorboard>=2.16'")
    r = script("setup.sh", "--name", "p", "--zone", "z", "--git", "u", "--source", "/x", check_rc=2)
    assert "either --git URL or --source DIR" in r.stderr
    r = script("setup.sh", "--name", "p", "--zone", "z", "--source", "/", "--dry-run", check_rc=2)
    assert "SOURCE_DIR '/' holds no pyproject.toml" in r.stderr


TRICKY = "--config.prompt=a cat's \"hat\" costs $HOME; `x` & \\n"


def test_run_dry_run_commands():
    loc = ["--name", "parrot", "--zone", "us-west4-a"]
    (start, follow) = commands("run.sh", *loc, "--follow", "--", "--config", "configs/sd15.py",
                               "--workdir", "gs://bucket/run", TRICKY)
    assert start[5:8] == ["parrot", "--zone=us-west4-a", "--worker=all"]
    remote = remote_command(start)
    assert "nohup \"$HOME\"/parrot-venv/bin/python train.py --config configs/sd15.py" in remote
    assert remote.count("--config.distributed=True") == 2  # the log header and the command
    assert follow == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "parrot", "--zone=us-west4-a",
                      "--worker=0", "--command=tail -n +1 -F \"$HOME\"/parrot-logs/train.log"]
    (attach,) = commands("run.sh", *loc, "--attach", "--follow-worker", "2")
    assert attach[7:] == ["--worker=2", "--command=tail -n +1 -F \"$HOME\"/parrot-logs/train.log"]
    (kill,) = commands("run.sh", *loc, "--kill")
    assert kill[7] == "--worker=all" and "kill -TERM" in remote_command(kill)
    r = script("run.sh", *loc, "--dry-run", "--", "--workdir", "/tmp/w")
    assert "warning: --workdir '/tmp/w' is not a gs:// path" in r.stderr
    r = script("run.sh", *loc, "--kill", "--", "--workdir", "gs://b/r", check_rc=2)
    assert "--attach/--kill start nothing" in r.stderr
    r = script("run.sh", *loc, "--env", "1BAD=x", check_rc=2)
    assert "--env takes KEY=VALUE, got '1BAD=x'" in r.stderr


FAKE_GCLOUD = """#!{python}
# Plays gcloud for one TPU worker whose home is $FAKE_WORKER_HOME; logs every argv.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ["FAKE_WORKER_HOME"]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    cmd = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
    if not cmd.startswith("tail "):
        env = {{**os.environ, "HOME": home}}
        sys.exit(subprocess.run(["bash", "-c", cmd], cwd=home, env=env).returncode)
"""
FAKE_PYTHON3 = """#!/bin/bash
# The worker's system python3: records calls; "-m uv venv ... DIR" makes a fake environment.
echo "$*" >> "$HOME/python3.calls"
if [ "$1 $2 $3" = "-m uv venv" ]; then
  mkdir -p "$6/bin" && cp "$FAKE_VENV_PYTHON" "$6/bin/python"
fi
"""
FAKE_VENV_PYTHON = """#!/bin/bash
# The environment's python: "-c" is setup's check; otherwise a training run that records its
# argv and environment, then waits to be stopped.
if [ "$1" = "-c" ]; then echo "worker 0/1: fake devices"; exit 0; fi
printf '%s\\0' "$PWD" "$@" > "$HOME/argv.bin"
echo "${PARROT_TEST_VAR-unset}" > "$HOME/env.txt"
echo "fake training started"
exec sleep 30
"""


def _pid_alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_end_to_end_with_fake_gcloud(tmp_path):
    bin_dir, home, src = tmp_path / "bin", tmp_path / "worker-home", tmp_path / "src"
    for d in (bin_dir, home, src):
        d.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD.format(python=sys.executable)),
                       ("python3", FAKE_PYTHON3), ("venv-python", FAKE_VENV_PYTHON)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # A tiny checkout: tracked, untracked-but-not-ignored, and ignored files.
    (src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (src / ".gitignore").write_text(".venv/\n")
    (src / "train.py").write_text("")
    (src / ".venv").mkdir()
    (src / ".venv" / "big").write_text("ignored")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run([*git, "add", "pyproject.toml", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    log = tmp_path / "gcloud.log"
    env = {"GCLOUD": str(bin_dir / "gcloud"), "FAKE_GCLOUD_LOG": str(log),
           "FAKE_WORKER_HOME": str(home), "FAKE_VENV_PYTHON": str(bin_dir / "venv-python"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "NAME": "parrot", "ZONE": "us-west4-a"}

    def executed():
        argvs = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return [["gcloud", *a] for a in argvs]

    def dry(name, *args):
        return commands(name, *args, env=env)

    # setup: the archive holds the checkout minus ignored files; the install goes to the venv.
    args = ["--source", str(src)]
    planned = dry("setup.sh", *args)
    r = script("setup.sh", *args, env=env)
    assert "worker 0/1: fake devices" in r.stdout
    assert planned[0][0] == "git"  # the local packing step, then the gcloud commands
    assert executed() == [["gcloud", *c[1:]] for c in planned[1:]]
    assert sorted(p.name for p in (home / "parrot-jax").iterdir()) == [
        ".gitignore", "pyproject.toml", "train.py"]
    assert not (home / "parrot-jax.upload.tar.gz").exists()
    calls = (home / "python3.calls").read_text().splitlines()
    assert calls == [
        "-m pip install --user --quiet --upgrade uv",
        f"-m uv venv --python 3.11 {home}/parrot-venv",
        f"-m uv pip install --python {home}/parrot-venv/bin/python -e {home}/parrot-jax[tpu] gcsfs",
    ]

    # run: the worker's process gets exactly the arguments given locally, in the code directory.
    args = ["--env", "PARROT_TEST_VAR=a b", "--", "--workdir", "gs://b/r", TRICKY]
    planned = dry("run.sh", *args)
    r = script("run.sh", *args, env=env)
    assert planned[0][0] == env["GCLOUD"]
    assert executed() == [["gcloud", *c[1:]] for c in planned]  # the dry run shows what runs
    assert "started pid" in r.stdout
    pid = int((home / "parrot-logs" / "train.log.pid").read_text())
    try:
        deadline = time.time() + 10
        while not (home / "env.txt").exists() and time.time() < deadline:
            time.sleep(0.05)
        argv = (home / "argv.bin").read_text().split("\0")[:-1]
        assert argv == [str(home / "parrot-jax"), "train.py", "--workdir", "gs://b/r", TRICKY,
                        "--config.distributed=True"]
        assert (home / "env.txt").read_text() == "a b\n"
        text = (home / "parrot-logs" / "train.log").read_text()
        header, logged_cmd, started = text.splitlines()
        assert header.endswith(" starts:") and started == "fake training started"
        assert shlex.split(logged_cmd)[-3:] == ["gs://b/r", TRICKY, "--config.distributed=True"]
        # A second start is refused while the first is alive; --kill sends it SIGTERM.
        r = script("run.sh", "--", "--workdir", "gs://b/r", env=env, check_rc=1)
        assert "a run is alive" in r.stderr
        r = script("run.sh", "--kill", env=env)
        assert f"sent SIGTERM to {pid}" in r.stdout
        deadline = time.time() + 10
        while _pid_alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(pid)
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
