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
