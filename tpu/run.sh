#!/usr/bin/env bash
# Start train.py (or another module) on every worker at once, in the background, logging to a
# file on each worker; optionally follow worker 0's log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu/run.sh [flags] -- [train.py arguments]

Starts "python train.py ARGS" on every worker of the TPU at the same time (a pod slice needs
all of them), detached from the ssh session, appending its output to a log file on each worker.
Adds --config.distributed=True (jax.distributed.initialize() on every worker) unless the
arguments already set it or --no-distributed is given. Re-running the same command after a
preemption resumes from the checkpoints in --workdir (use a gs:// workdir: every worker must
see it and it outlives the VM). Flags override the environment variables named in brackets.

Required:
  --name NAME         TPU node name [NAME]
  --zone ZONE         zone [ZONE]
Optional:
  --project PROJECT   GCP project; default: gcloud's core/project [PROJECT]
  --worker W          workers to start on: all, or e.g. 0 [WORKER; default all]
  --module MODULE     run "python -m MODULE ARGS" instead of train.py, e.g.
                      parrot_jax.training.pen_sft [MODULE]
  --env KEY=VALUE     environment variable for the run, repeatable
  --no-distributed    do not add --config.distributed=True
  --log FILE          log file on each worker, relative to its home; appended to, never
                      truncated [LOG_FILE; default parrot-logs/train.log]; the run's process id
                      is kept in FILE.pid
  --follow            after starting, follow the log of worker --follow-worker (Ctrl-C stops
                      following; the run goes on)
  --attach            start nothing; only follow the log of the running job
  --follow-worker N   worker whose log --follow/--attach shows [default 0: process 0 logs]
  --kill              start nothing; send SIGTERM to the run on the workers (it saves a
                      checkpoint and exits)
  --remote-dir DIR    code directory on each worker (as in setup.sh) [REMOTE_DIR; default
                      parrot-jax]
  --venv DIR          virtual environment on each worker (as in setup.sh) [VENV; default
                      parrot-venv]
  --dry-run           print the commands instead of running them [DRY_RUN=1]
  -h, --help          this help

Examples:
  tpu/run.sh --name parrot --zone us-west4-a --follow -- \
      --config configs/sd15.py --workdir gs://my-bucket/parrot/sd15-run1
  tpu/run.sh --name parrot --zone us-west4-a --kill
USAGE
}

WORKER=${WORKER:-all}
MODULE=${MODULE:-}
LOG_FILE=${LOG_FILE:-parrot-logs/train.log}
REMOTE_DIR=${REMOTE_DIR:-parrot-jax}
VENV=${VENV:-parrot-venv}
DISTRIBUTED=1
FOLLOW=0
ATTACH=0
KILL=0
FOLLOW_WORKER=0
ENVS=()
TRAIN_ARGS=()

while (($#)); do
  if is_flag_eq "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --module) need_value "$@"; MODULE=$2; shift 2 ;;
    --env)
      need_value "$@"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$2'"
      ENVS+=("$2"); shift 2 ;;
    --no-distributed) DISTRIBUTED=0; shift ;;
    --log) need_value "$@"; LOG_FILE=$2; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --attach) ATTACH=1; shift ;;
    --follow-worker) need_value "$@"; FOLLOW_WORKER=$2; shift 2 ;;
    --kill) KILL=1; shift ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag '$1' (train.py arguments go after '--'; see $SCRIPT -h)" ;;
  esac
done

require NAME ZONE
check_name
[[ $FOLLOW_WORKER =~ ^[0-9]+$ ]] || die "--follow-worker takes one worker index, got '$FOLLOW_WORKER'"
if ((ATTACH + KILL > 1)); then die "--attach and --kill exclude each other"; fi
if ((ATTACH || KILL)) && ((${#TRAIN_ARGS[@]} || FOLLOW)); then
  die "--attach/--kill start nothing: drop the train.py arguments and --follow"
fi
if [[ -n $MODULE && ! $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]]; then
  die "--module '$MODULE' is not a Python module name"
fi

location_flags
log=$(rpath "$LOG_FILE")
pid=$(rpath "$LOG_FILE.pid")
# True on a worker when the run recorded in the pid file is still alive.
alive="[ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null"

follow() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$FOLLOW_WORKER" \
    --command="tail -n +1 -F $log"
}

if ((ATTACH)); then
  follow
  exit 0
fi

if ((KILL)); then
  remote="if $alive; then kill -TERM \"\$(cat $pid)\" && echo \"\$(hostname): sent SIGTERM to\""
  remote+=" \"\$(cat $pid)\"; else echo \"\$(hostname): no run is alive\"; fi"
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
    --command="$remote"
  exit 0
fi

args=("${TRAIN_ARGS[@]}")
if ((DISTRIBUTED)); then
  has=0
  for a in "${args[@]}"; do
    if [[ $a == --config.distributed || $a == --config.distributed=* ]]; then has=1; fi
  done
  if ((!has)); then args+=(--config.distributed=True); fi
fi
workdir=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --workdir=*) workdir=${args[i]#--workdir=} ;;
    --workdir) workdir=${args[i + 1]:-} ;;
  esac
done
if [[ $workdir != gs://* ]]; then
  note "warning: --workdir '${workdir}' is not a gs:// path: a pod slice's workers do not" \
    "share a disk, and a worker's disk goes with the VM (preemption, delete)"
fi

if [[ -n $MODULE ]]; then program=(-m "$MODULE"); else program=(train.py); fi
envs=""
if ((${#ENVS[@]})); then envs="env $(quote_argv "${ENVS[@]}") "; fi
cmdline="$envs$(rpath "$VENV")/bin/python $(quote_argv "${program[@]}" "${args[@]}")"
code=$(rpath "$REMOTE_DIR")
remote="set -e; cd $code 2>/dev/null || { echo \"\$(hostname): no code directory\" $code"
remote+=" \"- run tpu/setup.sh first\" >&2; exit 1; }"
remote+="; mkdir -p \"\$(dirname $log)\""
remote+="; if $alive; then echo \"\$(hostname): a run is alive (pid \$(cat $pid));"
remote+=" stop it first: tpu/run.sh --kill\" >&2; exit 1; fi"
remote+="; echo \"=== \$(date -u +%FT%TZ) \$(hostname) starts:\" >> $log"
remote+="; printf '%s\\n' $(q "$cmdline") >> $log"
remote+="; nohup $cmdline >> $log 2>&1 < /dev/null &"
remote+=" echo \$! > $pid; echo \"\$(hostname): started pid \$!, log $LOG_FILE\""
run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
  --command="$remote"
if ((FOLLOW)); then follow; fi
