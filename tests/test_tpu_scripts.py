"""The Cloud TPU scripts in tpu/: exact gcloud commands from their dry runs, errors, help, and
end-to-end runs against a fake gcloud that plays a TPU of one or several workers, each worker a
temporary home on this machine, with a worker whose ssh can be made to fail."""

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
    "LOG_FILE", "DELETE", "KILL_GRACE", "LOG_LINES", "CHIP_DEVICES", "QUEUED_WAIT_TIMEOUT",
    "QUEUED_POLL_SECONDS", "CHECK_TIMEOUT",
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
    """Run a script the way users do: as a program (so it must be executable)."""
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    result = subprocess.run(
        [str(TPU / name), *args], env={**base, **(env or {})},
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
    assert argv[1:5] == ["compute", "tpus", "tpu-vm", "ssh"], argv
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return cmd


@pytest.mark.parametrize("name", [*SCRIPTS, "common.sh"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(TPU / name)], check=True)
    if shutil.which("shellcheck"):  # optional: only where it is installed
        subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", str(TPU / name)], check=True)


def test_scripts_are_executable_on_disk_and_in_git():
    """README and the scripts' hints tell users to run tpu/X.sh directly; a fresh clone gets the
    modes git stores, so the index must say 100755 too."""
    for name in SCRIPTS:
        assert os.access(TPU / name, os.X_OK), f"tpu/{name} is not executable"
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    staged = subprocess.run(["git", "-C", str(REPO), "ls-files", "-s", "tpu"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    modes = {line.split("\t")[1]: line.split()[0] for line in staged}
    for name in SCRIPTS:
        assert modes[f"tpu/{name}"] == "100755", f"git stores tpu/{name} as {modes[f'tpu/{name}']}"


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
    r = script("create.sh", *base, "--accelerator-type", "v4-8", "--no-wait", check_rc=2)
    assert "--no-wait and --wait-timeout apply only to queued resources" in r.stderr
    r = script("create.sh", *base, "--accelerator-type", "v4-8", "--queued", "--wait-timeout",
               "soon", check_rc=2)
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--wait-timeout takes a whole number of seconds, got 'soon'")


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
    # The guard gcloud cannot describe the node: a dry run then follows the flags alone.
    loc = ["--name", "parrot", "--zone", "us-west4-a"]
    head = ["gcloud", "compute", "tpus"]
    assert commands("stop.sh", *loc) == [
        [*head, "tpu-vm", "stop", "parrot", "--zone=us-west4-a"]]
    assert commands("stop.sh", *loc, "--delete", "--yes", env={"PROJECT": "pr"}) == [
        [*head, "tpu-vm", "delete", "parrot", "--zone=us-west4-a", "--project=pr", "--quiet"]]
    for extra in (["--delete", "--queued"], ["--queued"]):
        assert commands("stop.sh", *loc, *extra, "--async") == [
            [*head, "queued-resources", "delete", "parrot-qr", "--zone=us-west4-a", "--force",
             "--async"]]
    r = script("stop.sh", *loc, "--queued-resource-id", "x", "--dry-run", check_rc=2)
    assert "--queued-resource-id applies only with --queued" in r.stderr
    # Outside a dry run a node that cannot be described is not guessed at.
    r = script("stop.sh", *loc, check_rc=1)
    assert "cannot describe TPU 'parrot'" in r.stderr and "--queued" in r.stderr


def test_setup_local_checkout_dry_run():
    check, pack, scp, ssh = commands("setup.sh", "--name", "parrot", "--zone", "us-west4-a",
                                     env={"TMPDIR": "/tmp/x y"})
    assert check[7] == "--worker=all" and "a run is alive" in remote_command(check)
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
    # The live-run guard comes before anything is replaced.
    assert remote.index("a run is alive") < remote.index("rm -rf")


def test_setup_git_dry_run_and_options():
    (check, ssh) = commands("setup.sh", "--name", "p", "--zone", "z", "--git",
                            "https://example.com/me/parrot-jax.git", "--ref", "v0.1", "--worker",
                            "0", "--pip", "tensorboard>=2.16", "--no-check",
                            env={"VENV": "/opt/py env", "PYTHON_VERSION": "3.12"})
    assert "--worker=0" in check and "--worker=0" in ssh
    remote = remote_command(ssh)
    assert "git clone --quiet https://example.com/me/parrot-jax.git \"$HOME\"/parrot-jax" in remote
    assert "fetch --quiet origin v0.1 && git -C \"$HOME\"/parrot-jax checkout --quiet --detach" \
        " FETCH_HEAD" in remote
    assert "python3 -m uv venv --python 3.12 '/opt/py env'" in remote
    assert ("install --python '/opt/py env'/bin/python -e \"$HOME\"/parrot-jax'[tpu]'"
            " 'tensorboard>=2.16'; say finished") in remote
    assert "jax.distributed" not in remote
    r = script("setup.sh", "--name", "p", "--zone", "z", "--git", "u", "--source", "/x", check_rc=2)
    assert "either --git URL or --source DIR" in r.stderr
    r = script("setup.sh", "--name", "p", "--zone", "z", "--source", "/", "--dry-run", check_rc=2)
    assert "SOURCE_DIR '/' holds no pyproject.toml" in r.stderr
    r = script("setup.sh", "--name", "p", "--zone", "z", "--worker", "x", check_rc=2)
    assert r.stderr.strip() == ("tpu/setup.sh: error: --worker takes all, a worker number, or a"
                                " list such as 0,2 or 0-3; got 'x'")


TRICKY = "--config.prompt=a cat's \"hat\" costs $HOME; `x` & \\n"


def test_run_dry_run_commands():
    loc = ["--name", "parrot", "--zone", "us-west4-a"]
    (check, start, follow) = commands("run.sh", *loc, "--follow", "--", "--config",
                                      "configs/sd15.py", "--workdir", "gs://bucket/run", TRICKY)
    assert check[5:8] == start[5:8] == ["parrot", "--zone=us-west4-a", "--worker=all"]
    assert "ready code=" in remote_command(check)
    remote = remote_command(start)
    assert "nohup \"$HOME\"/parrot-venv/bin/python train.py --config configs/sd15.py" in remote
    assert remote.count("--config.distributed=True") == 2  # the log header and the command
    assert follow == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "parrot", "--zone=us-west4-a",
                      "--worker=0", "--command=tail -n +1 -F \"$HOME\"/parrot-logs/train.log"]
    for pick in (["--attach", "--follow-worker", "2"], ["--attach", "2"], ["--attach=2"]):
        (attach,) = commands("run.sh", *loc, *pick)
        assert attach[7:] == ["--worker=2",
                              "--command=tail -n +1 -F \"$HOME\"/parrot-logs/train.log"]
    (*_, follow) = commands("run.sh", *loc, "--follow", "3", "--", "--workdir", "gs://b/r")
    assert follow[7] == "--worker=3"
    (kill,) = commands("run.sh", *loc, "--kill")
    assert kill[7] == "--worker=all" and "kill -TERM" in remote_command(kill)
    r = script("run.sh", *loc, "--dry-run", "--", "--workdir", "/tmp/w")
    assert "warning: --workdir '/tmp/w' is not a gs:// path" in r.stderr
    r = script("run.sh", *loc, "--kill", "--", "--workdir", "gs://b/r", check_rc=2)
    assert "--attach/--kill start nothing" in r.stderr
    r = script("run.sh", *loc, "--env", "1BAD=x", check_rc=2)
    assert "--env takes KEY=VALUE, got '1BAD=x'" in r.stderr
    for bad, message in [(["--kill", "--grace", "1m"], "--grace takes a whole number of seconds"),
                         (["--logs", "--lines", "0"], "--lines takes a positive number, got '0'"),
                         (["--free-chips"], "--free-chips applies only with --kill"),
                         (["--worker", "0,"], "--worker takes all, a worker number"),
                         (["--worker", "0,2-2"], "--worker: a range runs upwards, e.g. 0-3"),
                         (["--logs", "--kill"], "--attach, --kill and --logs exclude each other")]:
        r = script("run.sh", *loc, *bad, "--dry-run", check_rc=2)
        (line,) = r.stderr.splitlines()
        assert line.startswith("tpu/run.sh: error: ") and message in line, r.stderr


# --- A fake TPU -------------------------------------------------------------------------------

FAKE_GCLOUD = """#!{python}
# Plays gcloud for a TPU of $FAKE_TPU_WORKERS workers; worker i is the home $FAKE_HOMES/w<i>, where
# ssh commands run (in parallel for several workers, as gcloud does) and scp copies. Every argv is
# logged. $FAKE_FAIL_WORKER names a worker whose ssh/scp fails, for commands holding the text
# $FAKE_FAIL_MATCH (all when unset); on worker $FAKE_RETRY_WORKER each ssh command runs twice, as
# when gcloud retries a command whose connection broke after it ran.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
env = os.environ
with open(env["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
n = int(env.get("FAKE_TPU_WORKERS", "1"))

def flag(name, default=None):
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), default)

def workers():
    spec = flag("--worker", "0")
    if spec == "all":
        return list(range(n))
    chosen = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        chosen += range(int(a), int(b or a) + 1)
    return chosen

def broken(i, text):
    if env.get("FAKE_FAIL_WORKER") == str(i) and env.get("FAKE_FAIL_MATCH", "") in text:
        print(f"ssh: connect to host worker-{{i}}: Connection timed out", file=sys.stderr)
        return True
    return False

home = lambda i: os.path.join(env["FAKE_HOMES"], f"w{{i}}")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    fmt = flag("--format")
    values = {{"state": env.get("FAKE_TPU_STATE", "READY"),
              "acceleratorType": env.get("FAKE_TPU_TYPE", "v5litepod-8"),
              "networkEndpoints.len()": str(n), "schedulingConfig.spot": env.get("FAKE_SPOT", ""),
              "schedulingConfig.preemptible": "", "queuedResource": env.get("FAKE_QR", ""),
              "networkConfigs.len()": "0"}}
    print(",".join(values[k] for k in fmt[fmt.index("(") + 1:fmt.rindex(")")].split(",")))
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = env["FAKE_QR_STATES"].split(",")
    with open(env["FAKE_GCLOUD_LOG"]) as f:
        calls = sum("queued-resources" in line and "describe" in line for line in f)
    print(states[min(calls, len(states)) - 1])
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    failed = [i for i in workers() if broken(i, "scp")]
    for i in set(workers()) - set(failed):
        shutil.copy(args[4], os.path.join(home(i), args[5].split(":", 1)[1]))
    sys.exit(1 if failed else 0)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    cmd = flag("--command")
    if cmd.startswith("tail "):
        sys.exit(0)
    failed = [i for i in workers() if broken(i, cmd)]
    twice = lambda i: f"{{cmd}}\\n{{cmd}}" if env.get("FAKE_RETRY_WORKER") == str(i) else cmd
    procs = [subprocess.Popen(["bash", "-c", twice(i)], cwd=home(i), env={{
        **env, "HOME": home(i), "FAKE_TPU_WORKER": str(i), "PATH": env["FAKE_WORKER_PATH"]}})
             for i in workers() if i not in failed]
    statuses = [p.wait() for p in procs]
    sys.exit(255 if failed else max(statuses, default=0))
"""
FAKE_CURL = """#!/bin/bash
# The worker's metadata server: its number, as a TPU VM's agent-worker-number attribute says.
case "${@: -1}" in */agent-worker-number) printf '%s' "$FAKE_TPU_WORKER" ;; *) exit 22 ;; esac
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
# argv and environment, then waits to be stopped (ignoring SIGTERM with FAKE_IGNORE_TERM, holding
# the chip file $FAKE_CHIP open when set).
if [ "$1" = "-c" ]; then echo "worker $FAKE_TPU_WORKER: fake devices"; exit 0; fi
printf '%s\\0' "$PWD" "$@" > "$HOME/argv.bin"
echo "${PARROT_TEST_VAR-unset}" > "$HOME/env.txt"
echo "fake training started"
if [ -n "$FAKE_IGNORE_TERM" ]; then trap '' TERM; fi
if [ -n "$FAKE_CHIP" ]; then exec 3< "$FAKE_CHIP"; fi
exec sleep 30
"""


def _pid_alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_dead(pid, seconds=10):
    deadline = time.time() + seconds
    while _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not _pid_alive(pid)


class FakeTpu:
    """A TPU of `workers` workers played by the fake gcloud, a checkout to install, and helpers."""

    def __init__(self, tmp_path, workers=1, **fake_env):
        self.tmp, self.n = tmp_path, workers
        tmp_path.mkdir()
        bin_dir, worker_bin = tmp_path / "bin", tmp_path / "worker-bin"
        self.homes, self.src, self.chips = tmp_path / "homes", tmp_path / "src", tmp_path / "chips"
        for d in (bin_dir, worker_bin, self.homes, self.src, self.chips):
            d.mkdir()
        for i in range(workers):
            (self.homes / f"w{i}").mkdir()
        for path, text in [(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable)),
                           (worker_bin / "curl", FAKE_CURL), (worker_bin / "python3", FAKE_PYTHON3),
                           (bin_dir / "venv-python", FAKE_VENV_PYTHON)]:
            path.write_text(text)
            path.chmod(0o755)
        # A tiny checkout: tracked, untracked-but-not-ignored, and ignored files.
        (self.src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
        (self.src / ".gitignore").write_text(".venv/\n")
        (self.src / "train.py").write_text("")
        (self.src / ".venv").mkdir()
        (self.src / ".venv" / "big").write_text("ignored")
        git = ["git", "-C", str(self.src), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(["git", "init", "-q", str(self.src)], check=True)
        subprocess.run([*git, "add", "pyproject.toml", ".gitignore"], check=True)
        subprocess.run([*git, "commit", "-qm", "init"], check=True)
        self.log = tmp_path / "gcloud.log"
        self.env = {
            "GCLOUD": str(bin_dir / "gcloud"), "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_HOMES": str(self.homes), "FAKE_TPU_WORKERS": str(workers),
            "FAKE_VENV_PYTHON": str(bin_dir / "venv-python"),
            "FAKE_WORKER_PATH": f"{worker_bin}:{os.environ['PATH']}",
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
            "NAME": "parrot", "ZONE": "us-west4-a", "CHIP_DEVICES": f"{self.chips}/accel*",
            **fake_env,
        }
        self.extra_pids = []

    def home(self, i):
        return self.homes / f"w{i}"

    def run(self, name, *args, check_rc=0, **env):
        return script(name, *args, env={**self.env, **env}, check_rc=check_rc)

    def dry(self, name, *args, **env):
        return commands(name, *args, env={**self.env, **env})

    def executed(self):
        """The gcloud argvs run since the last call, less the read-only describes."""
        argvs = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return [["gcloud", *a] for a in argvs if a[3:4] != ["describe"]]

    def pid(self, i):
        """The pid recorded on worker i (None without a pid file)."""
        f = self.home(i) / "parrot-logs" / "train.log.pid"
        return int(f.read_text().split()[0]) if f.exists() else None

    def setup(self):
        self.run("setup.sh", "--source", str(self.src))
        self.log.unlink()

    def hold_chip(self, chip="accel1"):
        """A stray process holding a chip (like an interrupted setup check)."""
        (self.chips / chip).touch()
        proc = subprocess.Popen(["bash", "-c", f"exec 3< {self.chips / chip}; exec sleep 30"])
        self.extra_pids.append(proc.pid)
        deadline = time.time() + 5
        while not any(os.readlink(f) == str(self.chips / chip)
                      for f in Path(f"/proc/{proc.pid}/fd").iterdir()
                      if f.name == "3") and time.time() < deadline:
            time.sleep(0.02)
        return proc

    def cleanup(self):
        for pid in [*(self.pid(i) for i in range(self.n)), *self.extra_pids]:
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_tpu(tmp_path):
    made = []

    def make(workers=1, **fake_env):
        made.append(FakeTpu(tmp_path / f"tpu{len(made)}", workers, **fake_env))
        return made[-1]

    yield make
    for tpu in made:
        tpu.cleanup()


def test_end_to_end_with_fake_gcloud(fake_tpu):
    tpu = fake_tpu()
    home = tpu.home(0)
    # setup: the archive holds the checkout minus ignored files; the install goes to the venv.
    args = ["--source", str(tpu.src)]
    planned = tpu.dry("setup.sh", *args)
    tpu.log.unlink()
    r = tpu.run("setup.sh", *args)
    assert "worker 0: fake devices" in r.stdout
    assert planned[1][0] == "git"  # the local packing step, between the gcloud commands
    assert tpu.executed() == [["gcloud", *c[1:]] for c in planned[:1] + planned[2:]]
    assert sorted(p.name for p in (home / "parrot-jax").iterdir()) == [
        ".gitignore", ".parrot-code-id", "pyproject.toml", "train.py"]
    assert not (home / "parrot-jax.upload.tar.gz").exists()
    calls = (home / "python3.calls").read_text().splitlines()
    assert calls == [
        "-m pip install --user --quiet --upgrade uv",
        f"-m uv venv --python 3.11 {home}/parrot-venv",
        f"-m uv pip install --python {home}/parrot-venv/bin/python -e {home}/parrot-jax[tpu] gcsfs",
    ]

    # run: the worker's process gets exactly the arguments given locally, in the code directory.
    args = ["--env", "PARROT_TEST_VAR=a b", "--", "--workdir", "gs://b/r", TRICKY]
    planned = tpu.dry("run.sh", *args)
    tpu.log.unlink()
    r = tpu.run("run.sh", *args)
    assert planned[0][0] == tpu.env["GCLOUD"]
    assert tpu.executed() == [["gcloud", *c[1:]] for c in planned]  # the dry run shows what runs
    assert "started pid" in r.stdout
    pid = tpu.pid(0)
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
    # A second start is refused while the first is alive; --kill ends it with SIGTERM.
    r = tpu.run("run.sh", "--", "--workdir", "gs://b/r", check_rc=1)
    assert "a run is alive" in r.stderr and "started nothing" in r.stderr
    r = tpu.run("run.sh", "--kill")
    assert f"sent SIGTERM to {pid}" in r.stdout and f"run {pid} ended" in r.stdout
    assert _wait_dead(pid) and tpu.pid(0) is None  # a restart finds no stale pid


# --- 2. a subset of a multi-host slice -----------------------------------------------------------

def test_worker_subsets_on_a_multi_host_slice(fake_tpu):
    tpu = fake_tpu(workers=4, FAKE_TPU_TYPE="v4-32")
    train = ["--", "--workdir", "gs://b/r"]
    r = tpu.run("run.sh", "--dry-run", "--worker", "0", *train, check_rc=2)
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()[1:]  # after the describe's "+ gcloud ..." line
    assert "--worker 0 names 1 of the 4 workers" in line
    assert "jax.distributed.initialize() waits for all of them" in line
    assert "--no-distributed" in line
    r = tpu.run("run.sh", "--dry-run", "--worker", "5", *train, check_rc=2)
    assert "has 4 worker(s), numbered 0-3; there is no worker 5" in r.stderr
    r = tpu.run("run.sh", "--dry-run", "--follow", "7", *train, check_rc=2)
    assert "there is no worker 7" in r.stderr
    # Made explicit: debug only, no distributed init.
    r = tpu.run("run.sh", "--dry-run", "--worker", "0", "--no-distributed", *train)
    assert "debug only" in r.stderr
    assert "--config.distributed" not in remote_command(shlex.split(r.stdout.splitlines()[1]))
    # Naming every worker is the same as all.
    tpu.run("run.sh", "--dry-run", "--worker", "0-3", *train)
    # setup on a subset installs there but skips the check that needs every worker.
    _, _, _, ssh = tpu.dry("setup.sh", "--worker", "1,2")
    assert ssh[7] == "--worker=1,2" and "jax.distributed" not in remote_command(ssh)
    r = tpu.run("setup.sh", "--worker", "2", "--dry-run")
    assert "the device check is skipped" in r.stderr
    _, _, _, ssh = tpu.dry("setup.sh", "--worker", "0", FAKE_TPU_WORKERS="1")  # a one-host VM
    assert "jax.distributed.initialize()" in remote_command(ssh)


# --- 3. all workers or none -----------------------------------------------------------------------

def test_run_starts_on_every_worker_or_none(fake_tpu):
    tpu = fake_tpu(workers=4, FAKE_TPU_TYPE="v5litepod-16")
    tpu.setup()
    train = ["--", "--workdir", "gs://b/r"]

    def pids():
        return [tpu.pid(i) for i in range(4)]

    # Worker 2 cannot be reached: nothing starts anywhere.
    r = tpu.run("run.sh", *train, check_rc=1, FAKE_FAIL_WORKER="2")
    assert "worker 2: no answer" in r.stderr and "started nothing: 3 of 4" in r.stderr
    assert pids() == [None] * 4

    # Worker 1 still has a live run: nothing starts on the others.
    other = subprocess.Popen(["sleep", "30"])
    tpu.extra_pids.append(other.pid)
    (tpu.home(1) / "parrot-logs").mkdir()
    (tpu.home(1) / "parrot-logs" / "train.log.pid").write_text(f"{other.pid}\n")
    r = tpu.run("run.sh", *train, check_rc=1)
    assert f"worker 1: a run is alive (pid {other.pid})" in r.stderr
    assert pids() == [None, other.pid, None, None]
    other.kill()
    other.wait()

    # The checks pass but worker 2's start fails: the three that started are stopped again.
    log_before = tpu.log.read_text() if tpu.log.exists() else ""
    r = tpu.run("run.sh", *train, check_rc=1, FAKE_FAIL_WORKER="2", FAKE_FAIL_MATCH="nohup")
    assert "start failed on worker(s) 2" in r.stderr
    assert "stopping the run on worker(s) 0-3" in r.stderr
    started = [int(line.split("started pid ")[1].split(",")[0])
               for line in r.stdout.splitlines() if "started pid" in line]
    assert len(started) == 3 and all(_wait_dead(p) for p in started)
    assert pids() == [None] * 4
    assert "--worker=0-3" in (tpu.log.read_text()[len(log_before):])

    # A pid file left behind by a dead run, or naming a pid reused by another process, is stale.
    # (And a start that gcloud repeats on worker 1 is still one start.)
    (tpu.home(3) / "parrot-logs" / "train.log.pid").write_text(f"{os.getpid()} 1\n")
    r = tpu.run("run.sh", *train, FAKE_RETRY_WORKER="1")
    assert r.stdout.count("started pid") == 4 and "started on all 4 workers" in r.stderr
    assert "[parrot worker 1] refused: a run is alive" in r.stdout
    assert all(_pid_alive(p) for p in pids())
    ids = {(tpu.home(i) / "parrot-jax" / ".parrot-code-id").read_text() for i in range(4)}
    assert len(ids) == 1
    r = tpu.run("run.sh", "--kill", "--grace", "5")
    assert r.stdout.count("free: no process holds a chip") == 4 and pids() == [None] * 4


def test_run_refuses_workers_with_different_code(fake_tpu):
    tpu = fake_tpu(workers=2)
    tpu.setup()
    (tpu.src / "new.py").write_text("x = 1\n")
    tpu.run("setup.sh", "--source", str(tpu.src), "--worker", "1")
    r = tpu.run("run.sh", "--", "--workdir", "gs://b/r", check_rc=1)
    assert "the workers hold different code" in r.stderr
    assert [tpu.pid(i) for i in range(2)] == [None, None]


# --- 4. --kill waits, escalates, reports the chips ---------------------------------------------

def test_kill_escalates_and_reports_what_holds_the_chips(fake_tpu):
    tpu = fake_tpu()
    tpu.setup()
    (tpu.chips / "accel0").touch()
    tpu.run("run.sh", "--", "--workdir", "gs://b/r", FAKE_IGNORE_TERM="1",
            FAKE_CHIP=str(tpu.chips / "accel0"))
    run_pid = tpu.pid(0)
    stray = tpu.hold_chip()
    # The stray process is seen before a start, too.
    r = tpu.run("run.sh", "--kill", "--grace", "1", check_rc=1)
    assert f"sent SIGTERM to {run_pid}" in r.stdout
    assert "still running after 1s" in r.stdout and "sending SIGKILL" in r.stdout
    assert f"run {run_pid} ended" in r.stdout and _wait_dead(run_pid)
    assert f"busy: a chip is still held by pid {stray.pid} (bash -c exec 3<" in r.stdout \
        or f"busy: a chip is still held by pid {stray.pid} (sleep 30" in r.stdout
    assert "worker 0:" in r.stderr and "--free-chips" in r.stderr and _pid_alive(stray.pid)
    r = tpu.run("run.sh", "--", "--workdir", "gs://b/r", check_rc=1)
    assert f"worker 0: a chip is held by pid {stray.pid}" in r.stderr
    r = tpu.run("run.sh", "--kill", "--free-chips", "--grace", "1")
    assert "no run is alive" in r.stdout and "freeing the chips" in r.stdout
    assert "free: no process holds a chip" in r.stdout and _wait_dead(stray.pid)


@pytest.mark.parametrize("accelerator, chips", [
    ("v4-32", "'/dev/accel*'"), ("v5litepod-64", "'/dev/vfio/[0-9]*'"),
    ("v5p-8", "'/dev/vfio/[0-9]*'"), ("v6e-8", "'/dev/vfio/[0-9]*'"),
])
def test_kill_looks_for_the_chips_of_the_generation(fake_tpu, accelerator, chips):
    tpu = fake_tpu(FAKE_TPU_TYPE=accelerator)
    (kill,) = tpu.dry("run.sh", "--kill", CHIP_DEVICES="")
    remote = remote_command(kill)
    assert f"-lname {chips}" in remote and remote.count("-lname") == 1


# --- 5. setup does not replace the code under a live run ---------------------------------------

def test_setup_refuses_to_replace_code_under_a_live_run(fake_tpu):
    tpu = fake_tpu(workers=2)
    tpu.setup()
    tpu.run("run.sh", "--worker", "0-1", "--", "--workdir", "gs://b/r")
    run_pids = [tpu.pid(i) for i in range(2)]
    (tpu.src / "new.py").write_text("x = 1\n")
    r = tpu.run("setup.sh", "--source", str(tpu.src), check_rc=1)
    assert f"worker 0: a run is alive (pid {run_pids[0]})" in r.stderr
    assert "changed nothing" in r.stderr and "--force" in r.stderr
    assert not any((tpu.home(i) / "parrot-jax" / "new.py").exists() for i in range(2))
    assert not any("scp" in line for line in tpu.log.read_text().splitlines())
    r = tpu.run("setup.sh", "--source", str(tpu.src), "--force", "--no-check")
    assert all((tpu.home(i) / "parrot-jax" / "new.py").exists() for i in range(2))
    assert all(_pid_alive(p) for p in run_pids)


# --- 6. the stop action fits the kind of TPU ----------------------------------------------------

def test_stop_action_fits_spot_and_queued_tpus(fake_tpu):
    tpu = fake_tpu()
    head = ["gcloud", "compute", "tpus"]
    plain = tpu.dry("stop.sh")
    assert plain == [[tpu.env["GCLOUD"], *head[1:], "tpu-vm", "stop", "parrot",
                      "--zone=us-west4-a"]]
    r = tpu.run("stop.sh", "--dry-run", FAKE_SPOT="True")
    assert shlex.split(r.stdout)[3:6] == ["tpu-vm", "delete", "parrot"]
    assert "Spot/preemptible TPU, which cannot be stopped" in r.stderr
    qr = "projects/p/locations/us-west4-a/queuedResources/my-qr"
    (cmd,) = tpu.dry("stop.sh", "--yes", FAKE_SPOT="True", FAKE_QR=qr)
    assert cmd[3:] == ["queued-resources", "delete", "my-qr", "--zone=us-west4-a", "--force",
                       "--quiet"]
    tpu.log.unlink()
    tpu.run("stop.sh", "--yes", FAKE_SPOT="True")  # what runs is what the dry run showed
    assert tpu.executed() == [[*head, "tpu-vm", "delete", "parrot", "--zone=us-west4-a",
                               "--quiet"]]


# --- 7. create --queued waits for ACTIVE --------------------------------------------------------

def test_create_queued_waits_until_active(fake_tpu):
    tpu = fake_tpu()
    args = ["--accelerator-type", "v5litepod-64", "--queued", "--spot"]
    r = tpu.run("create.sh", *args, QUEUED_POLL_SECONDS="0",
                FAKE_QR_STATES="WAITING_FOR_RESOURCES,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    lines = r.stderr.splitlines()
    order = [i for i, line in enumerate(lines) if "PROVISIONING" in line or "is ACTIVE" in line
             or "next: tpu/setup.sh" in line]
    assert len(order) == 3 and order == sorted(order), r.stderr
    assert sum("queued-resources" in x and "describe" in x
               for x in tpu.log.read_text().splitlines()) == 4
    r = tpu.run("create.sh", *args, check_rc=1, QUEUED_POLL_SECONDS="0",
                FAKE_QR_STATES="WAITING_FOR_RESOURCES,FAILED")
    assert "is FAILED: it will not become ACTIVE" in r.stderr
    assert "next: tpu/setup.sh" not in r.stderr
    r = tpu.run("create.sh", *args, "--wait-timeout", "1", check_rc=1, QUEUED_POLL_SECONDS="1",
                FAKE_QR_STATES="WAITING_FOR_RESOURCES")
    assert "still WAITING_FOR_RESOURCES after" in r.stderr and "NOT ACTIVE" in r.stderr
    assert "next: tpu/setup.sh" not in r.stderr
    r = tpu.run("create.sh", *args, "--no-wait")
    assert "NOT ACTIVE yet" in r.stderr and "next: tpu/setup.sh" not in r.stderr


# --- 8. every worker's log ----------------------------------------------------------------------

def test_logs_show_every_worker_and_which_stopped_first(fake_tpu):
    tpu = fake_tpu(workers=3)
    tpu.setup()
    tpu.run("run.sh", "--", "--workdir", "gs://b/r")
    logs = [tpu.home(i) / "parrot-logs" / "train.log" for i in range(3)]
    deadline = time.time() + 10
    while not all("fake training started" in f.read_text() for f in logs):
        assert time.time() < deadline
        time.sleep(0.05)
    # Worker 2 dies first (its log stops earlier), then worker 0; worker 1 runs on.
    for i, stamp in [(2, 1_700_000_000), (0, 1_700_000_100)]:
        with logs[i].open("a") as f:
            f.write(f"worker {i} line A\nTask {i} heartbeat timeout\n")
        os.kill(tpu.pid(i), signal.SIGKILL)
        _wait_dead(tpu.pid(i))
        os.utime(logs[i], (stamp, stamp))
    r = tpu.run("run.sh", "--logs", "--lines", "2")
    out = r.stdout
    blocks = out.split("=== worker ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["0", "1", "2"]
    assert blocks[0].startswith("0: run ended; log last written 2023-11-14T22:15:00Z\n"
                                "worker 0 line A\nTask 0 heartbeat timeout\n")
    assert blocks[1].startswith(f"1: run running (pid {tpu.pid(1)}); log last written")
    assert "fake training started" in blocks[1]
    assert blocks[2].startswith("2: run ended; log last written 2023-11-14T22:13:20Z\n")
    assert "the first to stop was worker 2 (log last written 2023-11-14T22:13:20Z)" in r.stderr
    # A worker that cannot be reached is named, the others still shown.
    r = tpu.run("run.sh", "--logs", check_rc=1, FAKE_FAIL_WORKER="1")
    assert "=== worker 1: no answer" in r.stdout and "=== worker 2: run ended" in r.stdout
