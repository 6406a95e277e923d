#!/usr/bin/env bash
# Start train.py (or another module) on every worker of a TPU at once, in the background, logging
# to a file on each worker -- all of them or none; stop it, free the chips, read every log.
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

All or none: every worker is checked first (code and environment installed, no live run, no
process holding a chip) and nothing starts unless all are ready. If a worker then fails to
start, the run is stopped on the others and the failing worker is named.

Required:
  --name NAME         TPU node name [NAME]
  --zone ZONE         zone [ZONE]
Optional:
  --project PROJECT   GCP project; default: gcloud's core/project [PROJECT]
  --worker W          workers to act on: all, or e.g. 0, 1,3 or 0-3 [WORKER; default all].
                      Starting a training run on part of a multi-host slice is refused (the
                      distributed init waits for every worker); with --no-distributed it is
                      allowed, for debugging only
  --module MODULE     run "python -m MODULE ARGS" instead of train.py, e.g.
                      parrot_jax.training.pen_sft [MODULE]
  --env KEY=VALUE     environment variable for the run, repeatable
  --no-distributed    do not add --config.distributed=True
  --log FILE          log file on each worker, relative to its home; appended to, never
                      truncated [LOG_FILE; default parrot-logs/train.log]; the run's process id
                      (and start time) is kept in FILE.pid
  --follow [N]        after starting, follow the log of worker N [default --follow-worker]
                      (Ctrl-C stops following; the run goes on)
  --attach [N]        start nothing; only follow the log of worker N
  --follow-worker N   worker whose log --follow/--attach shows [default 0: process 0 logs]
  --logs              start nothing; show the last lines of every worker's log, whether its
                      run is alive, and which worker's run stopped first
  --lines N           lines per worker for --logs [LOG_LINES; default 20]
  --kill              start nothing; stop the run on the workers: SIGTERM (it saves a
                      checkpoint and exits), up to --grace seconds' wait, then SIGKILL; then
                      report any process still holding a TPU chip (/dev/accel* on v2-v4,
                      /dev/vfio/N on v5e/v5p/v6e)
  --free-chips        with --kill: also stop those other processes (e.g. an interrupted
                      setup check or a forgotten python shell), the same way
  --grace SECONDS     how long --kill waits after SIGTERM [KILL_GRACE; default 120]
                      (CHIP_DEVICES, patterns separated by spaces, replaces the chip device
                      files looked for, e.g. for an unusual image)
  --remote-dir DIR    code directory on each worker (as in setup.sh) [REMOTE_DIR; default
                      parrot-jax]
  --venv DIR          virtual environment on each worker (as in setup.sh) [VENV; default
                      parrot-venv]
  --dry-run           print the commands instead of running them (the node is still
                      described, read-only, to plan them) [DRY_RUN=1]
  -h, --help          this help

Exit status: 0 when every worker did its part; 1 when one did not (each is named); 2 for a
usage error.

Examples:
  tpu/run.sh --name parrot --zone us-west4-a --follow -- \
      --config configs/sd15.py --workdir gs://my-bucket/parrot/sd15-run1
  tpu/run.sh --name parrot --zone us-west4-a --logs
  tpu/run.sh --name parrot --zone us-west4-a --kill
USAGE
}

WORKER=${WORKER:-all}
MODULE=${MODULE:-}
LOG_FILE=${LOG_FILE:-parrot-logs/train.log}
REMOTE_DIR=${REMOTE_DIR:-parrot-jax}
VENV=${VENV:-parrot-venv}
KILL_GRACE=${KILL_GRACE:-120}
LOG_LINES=${LOG_LINES:-20}
DISTRIBUTED=1
FOLLOW=0
ATTACH=0
KILL=0
LOGS=0
FREE_CHIPS=0
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
    --follow | --attach)
      if [[ $1 == --follow ]]; then FOLLOW=1; else ATTACH=1; fi
      if [[ ${2:-} =~ ^[0-9]+$ ]]; then FOLLOW_WORKER=$2; shift; fi
      shift ;;
    --follow-worker) need_value "$@"; FOLLOW_WORKER=$2; shift 2 ;;
    --logs) LOGS=1; shift ;;
    --lines) need_value "$@"; LOG_LINES=$2; shift 2 ;;
    --kill) KILL=1; shift ;;
    --free-chips) FREE_CHIPS=1; shift ;;
    --grace) need_value "$@"; KILL_GRACE=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag '$1' (train.py arguments go after '--'; see $SCRIPT -h)" ;;
  esac
done

require NAME ZONE
check_name
check_worker_spec --worker "$WORKER"
expand_workers "$WORKER"  # its ranges are checked before anything runs
[[ $FOLLOW_WORKER =~ ^[0-9]+$ ]] || die "--follow-worker takes one worker index, got '$FOLLOW_WORKER'"
check_seconds --grace "$KILL_GRACE"
[[ $LOG_LINES =~ ^[1-9][0-9]*$ ]] || die "--lines takes a positive number, got '$LOG_LINES'"
if ((ATTACH + KILL + LOGS > 1)); then die "--attach, --kill and --logs exclude each other"; fi
if ((ATTACH || KILL)) && ((${#TRAIN_ARGS[@]} || FOLLOW)); then
  die "--attach/--kill start nothing: drop the train.py arguments and --follow"
fi
if ((LOGS)) && ((${#TRAIN_ARGS[@]} || FOLLOW)); then
  die "--logs starts nothing: drop the train.py arguments and --follow"
fi
if ((FREE_CHIPS && !KILL)); then die "--free-chips applies only with --kill"; fi
if [[ -n $MODULE && ! $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]]; then
  die "--module '$MODULE' is not a Python module name"
fi
STARTING=$((!(ATTACH || KILL || LOGS)))

location_flags
if ((STARTING)); then need_node required; need_ready; else need_node optional; fi
expected_workers "$WORKER"
if ((NODE_WORKERS)); then
  for k in "${WORKERS[@]}" "$FOLLOW_WORKER"; do
    ((k < NODE_WORKERS)) || die "--worker/--follow: TPU '$NAME' has $NODE_WORKERS worker(s)," \
      "numbered 0-$((NODE_WORKERS - 1)); there is no worker $k"
  done
fi
chip_patterns
log=$(rpath "$LOG_FILE")
pidf=$(rpath "$LOG_FILE.pid")
code=$(rpath "$REMOTE_DIR")
venv=$(rpath "$VENV")
pre=$(remote_prelude "$pidf")
make_tmp

follow() {
  if ((NODE_WORKERS > 1)); then
    note "following worker $FOLLOW_WORKER of $NODE_WORKERS (another: --attach N; the last lines" \
      "of all of them: --logs)"
  fi
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$FOLLOW_WORKER" \
    --command="tail -n +1 -F $log"
}

# kill_command GRACE FREE: the worker-side stop: the run by its pid file (SIGTERM, GRACE seconds,
# SIGKILL), with FREE=1 every other holder of a chip too; ends with "free ..." or "busy ...".
kill_command() {
  local c="$pre; if alive; then say \"sent SIGTERM to \$P\"; if stop_pids $1 \$P; then"
  c+=" say \"run \$P ended\"; rm -f $pidf; fi; elif [ -f $pidf ]; then"
  c+=" say \"no run is alive (removed the stale pid file of pid \${P:-?})\"; rm -f $pidf;"
  c+=" else say 'no run is alive'; fi; H=\$(holders)"
  if (($2)); then
    c+="; if [ -n \"\$H\" ]; then say \"freeing the chips: \$(describe \$H)\"; stop_pids $1 \$H || :;"
    c+=" H=\$(holders); fi"
  fi
  c+="; if [ -n \"\$H\" ]; then say \"busy: a chip is still held by \$(describe \$H)\"; else"
  c+=" say 'free: no process holds a chip'; fi"
  printf '%s' "$c"
}

# report_kill FILE: name every worker whose chips are still held or that did not answer; true
# when there is none.
report_kill() {
  read_answers "$1" free busy
  name_failures busy "(free it: tpu/run.sh --kill --free-chips)"
}

if ((ATTACH)); then
  follow
  exit 0
fi

if ((KILL)); then
  if [[ $WORKER != all ]] && ((NODE_WORKERS > 1 && ${#WORKERS[@]} < NODE_WORKERS)); then
    note "stopping workers $WORKER only: the others' processes stop when the distributed" \
      "runtime notices (--heartbeat_timeout)"
  fi
  ssh_capture "$WORKER" "$(kill_command "$KILL_GRACE" "$FREE_CHIPS")" "$TMP/kill"
  [[ $DRY_RUN == 1 ]] && exit 0
  report_kill "$TMP/kill" || fail "some worker still holds a chip or did not answer (named above)"
  note "no run alive and no chip held on $(answered_or_expected | grep -c .) worker(s)"
  exit 0
fi

if ((LOGS)); then
  c="$pre; if [ -f $log ]; then t=\$(date -u -r $log +%FT%TZ); tail -n $LOG_LINES $log |"
  c+=" cut -c1-2000 | sed -u \"s/^/[parrot worker \$w] | /\"; else t=none; fi; if alive; then"
  c+=" r=\"running (pid \$P)\"; elif [ -f $pidf ]; then r=ended; else r=none; fi;"
  c+=" say \"log-status \$t \$r\""
  ssh_quiet "$WORKER" "$c" "$TMP/logs"
  [[ $DRY_RUN == 1 ]] && exit 0
  read_answers "$TMP/logs" log-status
  texts=()
  re='\[parrot worker ([0-9]+)\] \| (.*)$'
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ $re ]]; then texts[BASH_REMATCH[1]]+="${BASH_REMATCH[2]}"$'\n'; fi
  done <"$TMP/logs"
  ended=() bad=0
  while read -r k; do
    [[ -n $k ]] || continue
    a=${ANSWER[k]-}
    if [[ -z $a ]]; then
      echo "=== worker $k: no answer (its ssh failed; gcloud's message is above)"; bad=1; continue
    fi
    read -r _ when state <<<"$a"
    case $state in
      none) what="not running" ;;
      ended) what="run ended"; [[ $when == none ]] || ended+=("$when $k") ;;
      *) what="run $state" ;;
    esac
    if [[ $when == none ]]; then
      echo "=== worker $k: $what; no log $LOG_FILE"
    else
      echo "=== worker $k: $what; log last written $when"
      printf '%s' "${texts[k]-}"
    fi
  done < <(answered_or_expected)
  if ((${#ended[@]})); then
    first=$(printf '%s\n' "${ended[@]}" | sort | head -n 1)
    note "runs ended on worker(s) $(printf '%s\n' "${ended[@]}" | sort | cut -d' ' -f2 |
      paste -sd, -); the first to stop was worker ${first#* } (log last written ${first%% *})"
  fi
  exit "$bad"
fi

# Starting.
if [[ $WORKER != all ]] && ((NODE_WORKERS != 1 && ${#WORKERS[@]} < NODE_WORKERS)); then
  if ((DISTRIBUTED)); then
    die "--worker $WORKER names ${#WORKERS[@]} of the $NODE_WORKERS workers of TPU '$NAME'," \
      "but jax.distributed.initialize() waits for all of them: train on all workers (drop" \
      "--worker), or add --no-distributed for a debugging run (no distributed init)"
  fi
  note "debug only: --worker $WORKER without distributed init; a process that uses the TPU on" \
    "part of a multi-host slice can hang (e.g. --env JAX_PLATFORMS=cpu avoids it)"
elif [[ $WORKER != all ]] && ((!NODE_WORKERS && DISTRIBUTED)); then
  note "could not tell whether --worker $WORKER covers every worker; jax.distributed.initialize()" \
    "waits for all of them"
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
cmdline="$envs$venv/bin/python $(quote_argv "${program[@]}" "${args[@]}")"
busy="say \"refused: a run is alive (pid \$P); stop it first: tpu/run.sh --kill\""

# 1. Every worker must be ready before any starts.
c="$pre; if [ ! -d $code ]; then say \"refused: no code directory\" $code \"- run tpu/setup.sh"
c+=" first\"; elif [ ! -x $venv/bin/python ]; then say \"refused: no virtual environment\" $venv"
c+=" \"- run tpu/setup.sh first\"; elif alive; then $busy; else H=\$(holders); if [ -n \"\$H\" ];"
c+=" then say \"refused: a chip is held by \$(describe \$H)free it: tpu/run.sh --kill"
c+=" --free-chips\"; else say \"ready code=\$(cat $code/.parrot-code-id 2>/dev/null || echo"
c+=" unknown)\"; fi; fi"
ssh_capture "$WORKER" "$c" "$TMP/check"
if [[ $DRY_RUN != 1 ]]; then
  read_answers "$TMP/check" ready refused
  bad=0 ready=0 codes=""
  while read -r k; do
    [[ -n $k ]] || continue
    a=${ANSWER[k]-}
    if [[ -z $a ]]; then
      note "worker $k: no answer (its ssh failed; gcloud's message is above)"; bad=1
    elif [[ $a == refused* ]]; then
      note "worker $k: ${a#refused: }"; bad=1
    else
      ready=$((ready + 1))
      codes+="${a#ready code=} worker $k"$'\n'
    fi
  done < <(answered_or_expected)
  if ((bad)); then
    fail "started nothing: $ready of $(answered_or_expected | grep -c .) worker(s) ready; every" \
      "worker must be (the others are named above)"
  fi
  if (($(cut -d' ' -f1 <<<"${codes%$'\n'}" | sort -u | wc -l) > 1)); then
    while read -r id _ k; do note "worker $k has code $id"; done <<<"${codes%$'\n'}"
    fail "started nothing: the workers hold different code; run tpu/setup.sh on all of them"
  fi
fi

# 2. Start on all of them; if one fails, stop the others.
c="$pre; cd $code 2>/dev/null || { say \"refused: no code directory\" $code \"- run tpu/setup.sh"
c+=" first\"; exit 1; }; mkdir -p \"\$(dirname $log)\"; if alive; then $busy; exit 1; fi"
c+="; echo \"=== \$(date -u +%FT%TZ) \$(hostname) worker \$w starts:\" >> $log"
c+="; printf '%s\\n' $(q "$cmdline") >> $log"
c+="; setsid nohup $cmdline >> $log 2>&1 < /dev/null & p=\$!; echo \"\$p \$(stime \$p)\" > $pidf"
c+="; say \"started pid \$p, log\" $(q "$LOG_FILE")"
ssh_capture "$WORKER" "$c" "$TMP/start"
if [[ $DRY_RUN != 1 ]]; then
  # A worker's "started" line counts even if a refusal follows it (gcloud retries a command
  # whose ssh connection broke; the retry finds the run it started alive).
  read_answers "$TMP/start" started
  STARTED=()
  for k in "${!ANSWER[@]}"; do STARTED[k]=${ANSWER[k]}; done
  read_answers "$TMP/start" started refused
  failed=() cleanup=() started=0
  while read -r k; do
    [[ -n $k ]] || continue
    a=${STARTED[k]-${ANSWER[k]-}}
    if [[ $a == started* ]]; then
      started=$((started + 1)); cleanup+=("$k")
    elif [[ -z $a ]]; then
      failed+=("$k"); cleanup+=("$k")  # it may have started before its ssh broke
      note "worker $k: no answer (its ssh failed; gcloud's message is above)"
    else
      failed+=("$k")
      note "worker $k: ${a#refused: }"
    fi
  done < <(answered_or_expected)
  if ((${#failed[@]})); then
    if ((${#cleanup[@]})); then
      list=$(compress_workers "${cleanup[@]}")
      note "partial start ($started started): stopping the run on worker(s) $list, so that none" \
        "waits in jax.distributed.initialize() for a worker that will not come"
      ssh_capture "$list" "$(kill_command 10 0)" "$TMP/cleanup"
      report_kill "$TMP/cleanup" || note "some worker may still run: check with tpu/run.sh --logs"
    fi
    fail "start failed on worker(s) $(compress_workers "${failed[@]}"); the run is stopped on" \
      "the others"
  fi
  if ((NODE_WORKERS > 1)); then
    note "started on all $NODE_WORKERS workers; every worker's last lines: tpu/run.sh --name" \
      "$NAME --zone $ZONE --logs"
  fi
fi
if ((FOLLOW)); then follow; fi
