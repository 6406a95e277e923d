# shellcheck shell=bash disable=SC2034  # (variables set here are read by the sourcing script)
# Shared helpers for the tpu/*.sh scripts (sourced, not run).
#
# Every script builds its gcloud command lines as argument arrays and hands them to `run`:
# with --dry-run the exact command is printed on stdout, one per line, shell-quoted so it can be
# copy-pasted; otherwise it is echoed to stderr with a "+ " prefix and executed. Informational
# messages always go to stderr, so a dry run's stdout holds nothing but commands.

GCLOUD=${GCLOUD:-gcloud}  # the gcloud binary (overridable, e.g. a wrapper or a specific SDK)
DRY_RUN=${DRY_RUN:-0}
SCRIPT=tpu/$(basename "$0")
# What describe_node learns about the TPU; unknown until then.
NODE_STATE="" NODE_TYPE="" NODE_WORKERS=0 NODE_SPOT=0 NODE_QR=""

die() {
  echo "$SCRIPT: error: $*" >&2
  exit 2
}

note() {
  echo "$SCRIPT: $*" >&2
}

# q WORD: WORD quoted for a POSIX shell (unchanged when it holds only safe characters).
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# quote_argv ARG...: the arguments as one shell-quoted command line.
quote_argv() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(q "$a")"
  done
  printf '%s' "$out"
}

# rpath PATH: a path on a worker for use inside a remote command; relative paths are taken
# from the worker's home directory ("$HOME" is expanded by the worker's shell).
rpath() {
  # shellcheck disable=SC2016  # "$HOME" is for the worker's shell to expand
  if [[ $1 == /* ]]; then q "$1"; else printf '"$HOME"/%s' "$(q "$1")"; fi
}

# run ARG...: run (or, with --dry-run, print) one command.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_argv "$@")"
  else
    echo "+ $(quote_argv "$@")" >&2
    "$@"
  fi
}

# run_sh LINE: run (or print) a local shell pipeline given as one already-quoted line.
run_sh() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    bash -o pipefail -c "$1"
  fi
}

# need_value FLAG [VALUE...]: fail unless FLAG is followed by a value.
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    die "$1 needs a value"
  fi
}

# parse_common ARG...: consume one flag shared by all scripts; sets CONSUMED to the number of
# arguments used (0 when $1 is not a shared flag).
parse_common() {
  CONSUMED=0
  case $1 in
    --name) need_value "$@"; NAME=$2; CONSUMED=2 ;;
    --zone) need_value "$@"; ZONE=$2; CONSUMED=2 ;;
    --project) need_value "$@"; PROJECT=$2; CONSUMED=2 ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
  esac
}

# is_flag_eq ARG: true for "--flag=value"; the scripts' loops then split it in two, so both
# "--flag value" and "--flag=value" work.
is_flag_eq() {
  [[ $1 == --*=* ]]
}

# require VAR...: fail naming every unset setting, with the flag and variable that set it.
require() {
  local missing=() v flag
  for v in "$@"; do
    if [[ -z ${!v:-} ]]; then
      flag=--$(tr 'A-Z_' 'a-z-' <<<"$v")
      missing+=("$v ($flag or environment variable $v)")
    fi
  done
  if ((${#missing[@]})); then
    local joined
    joined=$(printf '%s, ' "${missing[@]}")
    die "missing required setting(s): ${joined%, }"
  fi
}

# check_name: TPU node names are lowercase letters, digits and hyphens, starting with a letter.
check_name() {
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "NAME '$NAME' is not a valid TPU name (lowercase letters, digits, '-'; starts with a letter)"
}

# location_flags: the --zone/--project flags every gcloud tpus command takes (PROJECT is
# optional: without it gcloud uses its configured core/project).
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then LOCATION+=(--project="$PROJECT"); fi
}

# fail MESSAGE...: a runtime failure (not a usage error): one line on stderr, exit 1.
fail() {
  echo "$SCRIPT: $*" >&2
  exit 1
}

# query ARG...: run a read-only gcloud command (a describe) even under --dry-run, because the plan
# depends on its answer; echoed to stderr like every executed command, its stdout is the caller's.
query() {
  echo "+ $(quote_argv "$@")" >&2
  "$@"
}

# check_seconds FLAG VALUE: fail unless VALUE is a whole number of seconds.
check_seconds() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 takes a whole number of seconds, got '$2'"
}

# describe_node: ask gcloud about NAME and set NODE_STATE (e.g. READY, PREEMPTED), NODE_TYPE (the
# accelerator type), NODE_WORKERS (hosts in the slice; 0 when unknown), NODE_SPOT (1 for a Spot or
# preemptible TPU) and NODE_QR (the id of the queued resource that made it, or empty). Returns 1,
# leaving NODE_WORKERS=0, when gcloud fails.
describe_node() {
  local out n spot pre qr nets
  NODE_STATE="" NODE_TYPE="" NODE_WORKERS=0 NODE_SPOT=0 NODE_QR=""
  out=$(query "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
    --format='csv[no-heading](state,acceleratorType,networkEndpoints.len(),schedulingConfig.spot,schedulingConfig.preemptible,queuedResource,networkConfigs.len())') ||
    return 1
  IFS=, read -r NODE_STATE NODE_TYPE n spot pre qr nets <<<"$out" || true
  # A host has one endpoint per network (as gcloud's --worker counts them).
  [[ $nets =~ ^[1-9][0-9]*$ ]] || nets=1
  if [[ $n =~ ^[0-9]+$ ]]; then NODE_WORKERS=$((n / nets)); fi
  if [[ $spot == [Tt]rue || $pre == [Tt]rue ]]; then NODE_SPOT=1; fi
  NODE_QR=${qr##*/}
  return 0
}

# need_node required|optional: describe_node, and when that fails stop (required, outside a dry
# run) or go on without the facts it gives (a note says so).
need_node() {
  if describe_node; then return 0; fi
  if [[ $1 == required && $DRY_RUN != 1 ]]; then
    fail "cannot describe TPU '$NAME' in zone $ZONE (gcloud's message is above); does it exist?" \
      "(list: $GCLOUD compute tpus tpu-vm list --zone=$ZONE)"
  fi
  note "could not describe TPU '$NAME'; going on without its worker count and type"
}

# need_ready: fail unless the described node is READY, saying what to do for the usual states.
need_ready() {
  case $NODE_STATE in
    READY | "") ;;
    PREEMPTED | TERMINATED)
      fail "TPU '$NAME' is $NODE_STATE: it cannot be restarted; delete and recreate it" \
        "(tpu/stop.sh, tpu/create.sh, tpu/setup.sh), then run the same command again" ;;
    STOPPED)
      fail "TPU '$NAME' is STOPPED; start it first:" \
        "$(quote_argv "$GCLOUD" compute tpus tpu-vm start "$NAME" "${LOCATION[@]}")" ;;
    *) fail "TPU '$NAME' is $NODE_STATE, not READY; wait, or check it with:" \
      "$(quote_argv "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}")" ;;
  esac
}

# check_worker_spec FLAG SPEC: SPEC is "all", or worker numbers and ranges, e.g. 0 or 1,3 or 0-3,7.
check_worker_spec() {
  [[ $2 =~ ^(all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$ ]] ||
    die "$1 takes all, a worker number, or a list such as 0,2 or 0-3; got '$2'"
}

# expand_workers SPEC: set WORKERS to the worker numbers SPEC names, ascending, without repeats
# ("all" is 0 .. NODE_WORKERS-1, empty when the count is unknown).
expand_workers() {
  local part a b i seen=()
  WORKERS=()
  if [[ $1 == all ]]; then
    for ((i = 0; i < NODE_WORKERS; i++)); do WORKERS+=("$i"); done
    return 0
  fi
  local IFS=,
  for part in $1; do
    a=${part%-*} b=${part#*-}
    if [[ $part == *-* ]] && ((10#$a >= 10#$b)); then
      die "--worker: a range runs upwards, e.g. 0-3; got '$part'"
    fi
    for ((i = 10#$a; i <= 10#$b; i++)); do seen[i]=1; done
  done
  for i in "${!seen[@]}"; do WORKERS+=("$i"); done
}

# compress_workers N...: the worker numbers (ascending) as a gcloud --worker list, e.g. 0-4,6.
compress_workers() {
  local out="" start="" prev="" n
  for n in "$@" ""; do
    if [[ -n $prev && $n == $((prev + 1)) ]]; then prev=$n; continue; fi
    if [[ -n $start ]]; then
      if ((start == prev)); then out+=",$start"; else out+=",$start-$prev"; fi
    fi
    start=$n prev=$n
  done
  printf '%s' "${out#,}"
}

# chip_patterns: set CHIPS to the device files that are TPU chips on a worker: /dev/accel* on
# v2/v3/v4, /dev/vfio/N on v5e/v5p/v6e (both when the type is unknown). CHIP_DEVICES (patterns,
# space-separated) replaces them, e.g. for an unusual image or a test.
chip_patterns() {
  if [[ -n ${CHIP_DEVICES:-} ]]; then
    read -r -a CHIPS <<<"$CHIP_DEVICES"
    return 0
  fi
  case $NODE_TYPE in
    v2-* | v3-* | v4-*) CHIPS=('/dev/accel*') ;;
    v5litepod-* | v5p-* | v6e-*) CHIPS=('/dev/vfio/[0-9]*') ;;
    *) CHIPS=('/dev/accel*' '/dev/vfio/[0-9]*') ;;
  esac
}

# remote_prelude PIDFILE: shell code (one line) that defines, on a worker:
#   w          the worker's number (JAX process index): metadata agent-worker-number, as JAX reads it
#   say ...    print "[parrot worker W] ..." (the scripts read these lines back, worker by worker)
#   running P  true while process P exists and is not a zombie
#   alive      true while the run recorded in PIDFILE lives; sets P (its pid). The file holds the
#              pid and the process's start time, so a pid reused after a reboot is not taken
#              for the run
#   holders    the pids of processes (of this user) that hold a chip device (CHIPS)
#   stop_pids G P...  SIGTERM, up to G seconds' wait, then SIGKILL to each process and its group
# The worker's shell evaluates it; none of it runs locally.
remote_prelude() {
  local pidf=$1 lname="" p
  for p in "${CHIPS[@]}"; do lname+="${lname:+ -o }-lname $(q "$p")"; done
  local md=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
  local s=(
    "w=\$(curl -sf -m 5 -H 'Metadata-Flavor: Google' $md 2>/dev/null || :)"
    "case \$w in ''|*[!0-9]*) w=\$(hostname); w=\${w##*-w-}; case \$w in ''|*[!0-9]*) w='?';; esac;; esac"
    "say() { echo \"[parrot worker \$w] \$*\"; }"
    "running() { s=\$(cat /proc/\$1/stat 2>/dev/null) || return 1; set -- \${s##*) }; [ \"\$1\" != Z ]; }"
    "stime() { s=\$(cat /proc/\$1/stat 2>/dev/null) || return 1; set -- \${s##*) }; echo \"\${20}\"; }"
    "alive() { P=; S=; if [ -f $pidf ]; then read -r P S < $pidf || :; fi; case \$P in ''|*[!0-9]*) return 1;; esac; running \$P || return 1; [ -z \"\$S\" ] || [ \"\$(stime \$P)\" = \"\$S\" ]; }"
    "holders() { find /proc/[0-9]*/fd -maxdepth 1 \\( $lname \\) 2>/dev/null | cut -d/ -f3 | sort -un | tr '\\n' ' '; }"
    "describe() { for h in \$*; do printf 'pid %s (%s); ' \$h \"\$(tr '\\0' ' ' < /proc/\$h/cmdline 2>/dev/null | cut -c1-100)\"; done; }"
    "stop_pids() { g=\$1; shift; kill -TERM \"\$@\" 2>/dev/null; i=0; left=\$*; while [ -n \"\$left\" ] && [ \$i -lt \$((g * 5)) ]; do sleep 0.2; i=\$((i + 1)); left=; for p in \"\$@\"; do if running \$p; then left=\"\$left \$p\"; fi; done; done; [ -n \"\$left\" ] || return 0; say \"still running after \${g}s:\$left; sending SIGKILL\"; for p in \$left; do kill -KILL -- -\$p 2>/dev/null; kill -KILL \$p 2>/dev/null; done; i=0; while [ \$i -lt 25 ]; do sleep 0.2; i=\$((i + 1)); still=; for p in \$left; do if running \$p; then still=\"\$still \$p\"; fi; done; [ -n \"\$still\" ] || return 0; done; say \"survived SIGKILL:\$still\"; return 1; }"
  )
  local out
  out=$(printf '%s; ' "${s[@]}")
  printf '%s' "${out%; }"
}

# ssh_capture WORKER COMMAND FILE [quiet]: run COMMAND on the workers with gcloud's ssh (or print
# it, in a dry run), its output shown as it comes (not with "quiet") and kept in FILE. gcloud's
# exit status is not trusted to say which worker failed: the callers read the workers'
# "[parrot worker W] ..." lines instead.
ssh_capture() {
  local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
    return 0
  fi
  echo "+ $(quote_argv "${cmd[@]}")" >&2
  if [[ ${4-} == quiet ]]; then
    "${cmd[@]}" >"$3" || true
  else
    "${cmd[@]}" | tee "$3" || true
  fi
}

# ssh_quiet WORKER COMMAND FILE: as ssh_capture, but the output only goes to FILE.
ssh_quiet() { ssh_capture "$1" "$2" "$3" quiet; }

# read_answers FILE WORD...: ANSWER[W] = the last line "[parrot worker W] WORD ..." in FILE whose
# WORD is one of WORDs (without the bracketed prefix).
read_answers() {
  local file=$1 line words
  shift
  words=$(IFS='|'; printf '%s' "$*")
  local re="\\[parrot worker ([0-9]+)\\] (($words)([ :].*)?)$"
  ANSWER=()
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ $re ]]; then ANSWER[BASH_REMATCH[1]]=${BASH_REMATCH[2]}; fi
  done <"$file"
}

# expected_workers SPEC: EXPECT = the workers that must answer (SPEC expanded; empty when SPEC is
# "all" and the worker count is unknown, and then every worker that answers is taken).
expected_workers() {
  expand_workers "$1"
  EXPECT=("${WORKERS[@]}")
}

# answered_or_expected: the workers to report on: EXPECT, or (count unknown) those that answered.
answered_or_expected() {
  if ((${#EXPECT[@]})); then printf '%s\n' "${EXPECT[@]}"; else printf '%s\n' "${!ANSWER[@]}"; fi
}

# name_failures WORD [HINT]: note every worker to report on that did not answer (ANSWER, from
# read_answers) or whose answer is "WORD: why" ("worker K: why HINT"); false when one is named.
name_failures() {
  local k a bad=0
  while read -r k; do
    [[ -n $k ]] || continue
    a=${ANSWER[k]-}
    if [[ -z $a ]]; then
      note "worker $k: no answer (its ssh failed; gcloud's message is above)"; bad=1
    elif [[ $a == "$1"* ]]; then
      note "worker $k: ${a#"$1": }${2-}"; bad=1
    fi
  done < <(answered_or_expected)
  return "$bad"
}

# make_tmp: TMP = a private scratch directory, removed on exit (none is needed in a dry run).
make_tmp() {
  TMP=""
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/parrot-$(basename "$0" .sh).XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
}
