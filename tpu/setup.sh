#!/usr/bin/env bash
# Install parrot-jax[tpu] (and train.py, configs/) on every worker of a Cloud TPU VM or slice.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu/setup.sh [flags]

Puts the code on every worker and installs it, editable, with the "tpu" extra (jax[tpu]) into a
virtual environment. jax 0.10 needs Python >= 3.11 while the TPU VM images ship an older system
Python, so the environment is made by uv (installed with the system pip) with a uv-managed
Python. Flags override the environment variables named in brackets.

Code source (default: this checkout, copied with scp):
  --source DIR        local checkout to copy: the files git tracks plus untracked files
                      that are not ignored, i.e. uncommitted edits travel too [SOURCE_DIR;
                      default: the checkout holding this script]
  --git URL           instead, clone URL on every worker (it must be reachable from there)
                      [GIT_URL]
  --ref REF           with --git: branch, tag or commit to check out; default: the remote's
                      default branch [GIT_REF]

Required:
  --name NAME         TPU node name [NAME]
  --zone ZONE         zone [ZONE]
Optional:
  --project PROJECT   GCP project; default: gcloud's core/project [PROJECT]
  --worker W          workers to set up: all, or e.g. 0, 1,3 or 0-3 [WORKER; default all].
                      On a multi-host slice a subset is for repairing a worker: it is
                      installed, but the device check is skipped (it needs every worker)
  --remote-dir DIR    code directory on each worker, relative to its home; replaced on every
                      setup, keep nothing else there [REMOTE_DIR; default parrot-jax]
  --venv DIR          virtual environment on each worker, relative to its home
                      [VENV; default parrot-venv]
  --python VERSION    Python for the environment (created once; delete it to change)
                      [PYTHON_VERSION; default 3.11]
  --pip PKG           extra package to install, repeatable [EXTRA_PIP, space-separated;
                      default gcsfs: orbax/etils need it for gs:// workdirs]
  --no-check          skip the final check that prints jax's device counts on every worker
                      (it is refused where a process holds a chip, and CHECK_TIMEOUT seconds,
                      default 900, bound it)
  --force             replace the code even where a run is alive (by default setup refuses,
                      on every worker, before changing anything)
  --log FILE          the run's log file, as in run.sh; its FILE.pid tells whether a run is
                      alive [LOG_FILE; default parrot-logs/train.log]
  --dry-run           print the commands instead of running them (the node is still
                      described, read-only, to plan them) [DRY_RUN=1]
  -h, --help          this help

Every worker is asked first whether a run is alive there; if one is (and no --force), nothing
is changed anywhere. The code directory is replaced only after that.

Examples:
  tpu/setup.sh --name parrot --zone us-west4-a
  tpu/setup.sh --name parrot --zone us-west4-a --git https://github.com/me/parrot-jax --ref v0.1.0
USAGE
}

WORKER=${WORKER:-all}
SOURCE_DIR=${SOURCE_DIR:-}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
REMOTE_DIR=${REMOTE_DIR:-parrot-jax}
VENV=${VENV:-parrot-venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
LOG_FILE=${LOG_FILE:-parrot-logs/train.log}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-900}
FORCE=0
read -r -a PIP_EXTRA <<<"${EXTRA_PIP-gcsfs}"
PIP_FROM_FLAGS=()
CHECK=1

while (($#)); do
  if is_flag_eq "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --source) need_value "$@"; SOURCE_DIR=$2; shift 2 ;;
    --git) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$@"; GIT_REF=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --pip) need_value "$@"; PIP_FROM_FLAGS+=("$2"); shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --force) FORCE=1; shift ;;
    --log) need_value "$@"; LOG_FILE=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag '$1' (see $SCRIPT -h)" ;;
  esac
done
if ((${#PIP_FROM_FLAGS[@]})); then PIP_EXTRA=("${PIP_FROM_FLAGS[@]}"); fi

require NAME ZONE
check_name
check_worker_spec --worker "$WORKER"
expand_workers "$WORKER"  # its ranges are checked before anything runs
check_seconds CHECK_TIMEOUT "$CHECK_TIMEOUT"
if [[ -n $GIT_URL && -n $SOURCE_DIR ]]; then
  die "give either --git URL or --source DIR, not both"
fi
if [[ -z $GIT_URL && -n $GIT_REF ]]; then
  die "--ref applies only with --git URL"
fi
[[ -n $REMOTE_DIR && $REMOTE_DIR != / && $REMOTE_DIR != . ]] ||
  die "REMOTE_DIR '$REMOTE_DIR' must name a directory of its own (it is replaced)"

location_flags
need_node required
need_ready
expected_workers "$WORKER"
if ((NODE_WORKERS)); then
  for k in "${WORKERS[@]}"; do
    ((k < NODE_WORKERS)) || die "--worker: TPU '$NAME' has $NODE_WORKERS worker(s), numbered" \
      "0-$((NODE_WORKERS - 1)); there is no worker $k"
  done
fi
if ((CHECK)) && [[ $WORKER != all ]] && ((NODE_WORKERS != 1 && ${#WORKERS[@]} < NODE_WORKERS)); then
  CHECK=0
  note "--worker $WORKER is part of a multi-host slice: installing there only (a repair); the" \
    "device check is skipped, because jax.distributed.initialize() waits for every worker"
fi
chip_patterns
code=$(rpath "$REMOTE_DIR")
venv=$(rpath "$VENV")
pidf=$(rpath "$LOG_FILE.pid")
pre=$(remote_prelude "$pidf")
make_tmp
live="say \"refused: a run is alive (pid \$P): setup would replace its code; stop it first"
live+=" (tpu/run.sh --kill) or add --force\""

# 1. Change nothing unless every worker answers and none has a live run (or --force).
if ((FORCE)); then
  c="$pre; if alive; then say \"ready (a run is alive, pid \$P: --force replaces its code)\";"
else
  c="$pre; if alive; then $live;"
fi
c+=" else say ready; fi"
ssh_capture "$WORKER" "$c" "$TMP/check"
if [[ $DRY_RUN != 1 ]]; then
  read_answers "$TMP/check" ready refused
  name_failures refused ||
    fail "changed nothing: every worker must answer and have no live run (named above)"
fi

# 2. Copy or fetch the code, install, check.
if [[ -z $GIT_URL ]]; then
  SOURCE_DIR=${SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  [[ -f $SOURCE_DIR/pyproject.toml ]] ||
    die "SOURCE_DIR '$SOURCE_DIR' holds no pyproject.toml: not a parrot-jax checkout"
  git -C "$SOURCE_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "SOURCE_DIR '$SOURCE_DIR' is not a git checkout (the file list comes from git);" \
      "use --git URL instead"
  archive=${TMPDIR:-/tmp}/parrot-jax-$NAME.tar.gz
  remote_archive=$(basename "$REMOTE_DIR").upload.tar.gz
  run_sh "$(quote_argv git -C "$SOURCE_DIR" ls-files -z --cached --others --exclude-standard) |\
 $(quote_argv tar -czf "$archive" -C "$SOURCE_DIR" --null -T -)"
  run "$GCLOUD" compute tpus tpu-vm scp "$archive" "$NAME:$remote_archive" "${LOCATION[@]}" \
    --worker="$WORKER"
  new="$code.new"
  up=$(rpath "$remote_archive")
  # The code's id (the unpacked archive's hash) lets run.sh check every worker holds the same.
  fetch="id=\$(gzip -dc $up | sha256sum | cut -c1-12) && rm -rf $new && mkdir -p $new"
  fetch+=" && tar -xzf $up -C $new && echo \"\$id\" > $new/.parrot-code-id"
  fetch+=" && rm -rf $code && mv $new $code && rm -f $up"
else
  fetch="if [ ! -d $code/.git ]; then rm -rf $code && git clone --quiet $(q "$GIT_URL") $code; fi"
  fetch+=" && git -C $code remote set-url origin $(q "$GIT_URL")"
  fetch+=" && git -C $code fetch --quiet origin $(q "${GIT_REF:-HEAD}")"
  fetch+=" && git -C $code checkout --quiet --detach FETCH_HEAD"
  fetch+=" && git -C $code rev-parse --short=12 HEAD > $code/.parrot-code-id"
fi

install="python3 -m uv pip install --python $venv/bin/python -e $code'[tpu]'"
if ((${#PIP_EXTRA[@]})); then install+=" $(quote_argv "${PIP_EXTRA[@]}")"; fi
steps=("$pre")
# Checked again here, on each worker, right before its code is replaced.
if ((!FORCE)); then steps+=("if alive; then $live; exit 1; fi"); fi
steps+=(
  "set -e"
  "python3 -m pip install --user --quiet --upgrade uv"
  "if [ ! -x $venv/bin/python ]; then python3 -m uv venv --python $(q "$PYTHON_VERSION") $venv; fi"
  "$fetch"
  "$install"
)
if ((CHECK)); then
  # The check needs the chips: a process holding one (an earlier check that was interrupted, a
  # live run) would make it fail or hang, so it is named instead.
  steps+=("H=\$(holders); if [ -n \"\$H\" ]; then say \"refused: the device check needs the chips; held by \$(describe \$H)free them (tpu/run.sh --kill --free-chips) or add --no-check\"; exit 1; fi")
  # The same multi-host initialisation train.py does with --config.distributed=True, bounded in
  # time so that a worker that never joins cannot leave it holding the chips.
  steps+=("timeout --kill-after=10 $CHECK_TIMEOUT $venv/bin/python -c $(q 'import jax; jax.distributed.initialize(); print(f"worker {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} global {jax.devices()[0].device_kind} devices")')")
fi
steps+=("say finished")
remote=$(printf '%s; ' "${steps[@]}")
ssh_capture "$WORKER" "${remote%; }" "$TMP/setup"
if [[ $DRY_RUN != 1 ]]; then
  read_answers "$TMP/setup" finished refused
  failed=()
  while read -r k; do
    [[ -n $k ]] || continue
    a=${ANSWER[k]-}
    if [[ $a != finished ]]; then
      failed+=("$k")
      why=${a#refused: }
      note "worker $k: ${why:-did not finish (its output or the ssh error is above)}"
    fi
  done < <(answered_or_expected)
  if ((${#failed[@]})); then fail "setup failed on worker(s) $(compress_workers "${failed[@]}")"; fi
fi
note "next: tpu/run.sh --name $NAME --zone $ZONE -- --config configs/<name>.py --workdir gs://<bucket>/<run>"
