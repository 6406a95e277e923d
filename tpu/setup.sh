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
  --worker W          workers to set up: all, or e.g. 0 or 1,3 [WORKER; default all]
  --remote-dir DIR    code directory on each worker, relative to its home; replaced on every
                      setup, keep nothing else there [REMOTE_DIR; default parrot-jax]
  --venv DIR          virtual environment on each worker, relative to its home
                      [VENV; default parrot-venv]
  --python VERSION    Python for the environment (created once; delete it to change)
                      [PYTHON_VERSION; default 3.11]
  --pip PKG           extra package to install, repeatable [EXTRA_PIP, space-separated;
                      default gcsfs: orbax/etils need it for gs:// workdirs]
  --no-check          skip the final check that prints jax's device counts on every worker
  --dry-run           print the commands instead of running them [DRY_RUN=1]
  -h, --help          this help

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
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag '$1' (see $SCRIPT -h)" ;;
  esac
done
if ((${#PIP_FROM_FLAGS[@]})); then PIP_EXTRA=("${PIP_FROM_FLAGS[@]}"); fi

require NAME ZONE
check_name
if [[ -n $GIT_URL && -n $SOURCE_DIR ]]; then
  die "give either --git URL or --source DIR, not both"
fi
if [[ -z $GIT_URL && -n $GIT_REF ]]; then
  die "--ref applies only with --git URL"
fi
[[ -n $REMOTE_DIR && $REMOTE_DIR != / && $REMOTE_DIR != . ]] ||
  die "REMOTE_DIR '$REMOTE_DIR' must name a directory of its own (it is replaced)"

location_flags
code=$(rpath "$REMOTE_DIR")
venv=$(rpath "$VENV")

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
  fetch="rm -rf $new && mkdir -p $new && tar -xzf $(rpath "$remote_archive") -C $new"
  fetch+=" && rm -rf $code && mv $new $code && rm -f $(rpath "$remote_archive")"
else
  fetch="if [ ! -d $code/.git ]; then rm -rf $code && git clone --quiet $(q "$GIT_URL") $code; fi"
  fetch+=" && git -C $code remote set-url origin $(q "$GIT_URL")"
  fetch+=" && git -C $code fetch --quiet origin $(q "${GIT_REF:-HEAD}")"
  fetch+=" && git -C $code checkout --quiet --detach FETCH_HEAD"
fi

install="python3 -m uv pip install --python $venv/bin/python -e $code'[tpu]'"
if ((${#PIP_EXTRA[@]})); then install+=" $(quote_argv "${PIP_EXTRA[@]}")"; fi
steps=(
  "set -e"
  "python3 -m pip install --user --quiet --upgrade uv"
  "if [ ! -x $venv/bin/python ]; then python3 -m uv venv --python $(q "$PYTHON_VERSION") $venv; fi"
  "$fetch"
  "$install"
)
if ((CHECK)); then
  # The same multi-host initialisation train.py does with --config.distributed=True.
  steps+=("$venv/bin/python -c $(q 'import jax; jax.distributed.initialize(); print(f"worker {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} global {jax.devices()[0].device_kind} devices")')")
fi
remote=$(printf '%s; ' "${steps[@]}")
run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
  --command="${remote%; }"
note "next: tpu/run.sh --name $NAME --zone $ZONE -- --config configs/<name>.py --workdir gs://<bucket>/<run>"
