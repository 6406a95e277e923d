#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (directly, or through a queued resource).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu/create.sh [flags] [-- extra gcloud create flags]

Creates a Cloud TPU VM (one host, e.g. v5litepod-8) or a pod slice (several hosts, e.g. v4-32).
Flags override the environment variables named in brackets.

Required:
  --name NAME               TPU node name [NAME]
  --zone ZONE               zone, e.g. us-west4-a [ZONE]
  --accelerator-type TYPE   e.g. v5litepod-8, v5litepod-16, v4-8, v4-32, v5p-8, v6e-8
                            [ACCELERATOR_TYPE]
Optional:
  --project PROJECT         GCP project; default: gcloud's core/project [PROJECT]
  --runtime-version V       TPU software version [RUNTIME_VERSION]; default by family:
                            v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                            v5litepod -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base
  --spot                    Spot capacity: cheaper, can be preempted at any time [SPOT=1]
  --queued                  request through a queued resource (waits for capacity instead
                            of failing when none is free) [QUEUED=1]; the script then waits
                            until it is ACTIVE (the node exists), or says that it is not
  --queued-resource-id ID   queued resource id; default NAME-qr [QUEUED_RESOURCE_ID]
  --valid-until-duration D  with --queued: give up if not provisioned within D, e.g. 6h
                            [VALID_UNTIL_DURATION]
  --wait-timeout SECONDS    with --queued: stop waiting after this long (the request stays
                            queued); 0 waits until ACTIVE or failed [QUEUED_WAIT_TIMEOUT;
                            default 0]. QUEUED_POLL_SECONDS sets how often it asks (30)
  --no-wait                 with --queued: return once the request is queued
  --dry-run                 print the gcloud command instead of running it [DRY_RUN=1]
  -h, --help                this help

Everything after "--" is appended to the gcloud create command (e.g. --labels=team=x).

Examples:
  tpu/create.sh --name parrot --zone us-west4-a --accelerator-type v5litepod-8
  ZONE=us-central2-b tpu/create.sh --name parrot-pod --accelerator-type v4-32 --queued --spot
USAGE
}

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-}
VALID_UNTIL_DURATION=${VALID_UNTIL_DURATION:-}
QUEUED_WAIT_TIMEOUT=${QUEUED_WAIT_TIMEOUT:-0}
QUEUED_POLL_SECONDS=${QUEUED_POLL_SECONDS:-30}
WAIT=1
EXTRA=()

while (($#)); do
  if is_flag_eq "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --queued-resource-id) need_value "$@"; QUEUED_RESOURCE_ID=$2; shift 2 ;;
    --valid-until-duration) need_value "$@"; VALID_UNTIL_DURATION=$2; shift 2 ;;
    --wait-timeout) need_value "$@"; QUEUED_WAIT_TIMEOUT=$2; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag '$1' (see $SCRIPT -h)" ;;
  esac
done

require NAME ZONE ACCELERATOR_TYPE
check_name
[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "ACCELERATOR_TYPE '$ACCELERATOR_TYPE' is not of the form <version>-<size>, e.g. v5litepod-8"

if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for ACCELERATOR_TYPE '$ACCELERATOR_TYPE'; set" \
      "RUNTIME_VERSION (list: gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
  esac
fi
if [[ $QUEUED != 1 && -n $VALID_UNTIL_DURATION ]]; then
  die "--valid-until-duration applies only to queued resources (add --queued)"
fi
if [[ $QUEUED != 1 && -n $QUEUED_RESOURCE_ID ]]; then
  die "--queued-resource-id applies only to queued resources (add --queued)"
fi
check_seconds --wait-timeout "$QUEUED_WAIT_TIMEOUT"
check_seconds QUEUED_POLL_SECONDS "$QUEUED_POLL_SECONDS"
if [[ $QUEUED != 1 ]] && ((WAIT == 0 || QUEUED_WAIT_TIMEOUT)); then
  die "--no-wait and --wait-timeout apply only to queued resources (add --queued)"
fi

location_flags
if [[ $QUEUED == 1 ]]; then
  cmd=("$GCLOUD" compute tpus queued-resources create "${QUEUED_RESOURCE_ID:-$NAME-qr}"
    "${LOCATION[@]}" --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE"
    --runtime-version="$RUNTIME_VERSION")
  if [[ -n $VALID_UNTIL_DURATION ]]; then cmd+=(--valid-until-duration="$VALID_UNTIL_DURATION"); fi
else
  cmd=("$GCLOUD" compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
fi
if [[ $SPOT == 1 ]]; then cmd+=(--spot); fi
cmd+=("${EXTRA[@]}")

run "${cmd[@]}"
next="next: tpu/setup.sh --name $NAME --zone $ZONE"
if [[ $QUEUED != 1 ]]; then
  note "$next"
  exit 0
fi

qr=${QUEUED_RESOURCE_ID:-$NAME-qr}
describe=("$GCLOUD" compute tpus queued-resources describe "$qr" "${LOCATION[@]}")
watch=$(quote_argv "${describe[@]}")
if [[ $DRY_RUN == 1 ]]; then
  if ((WAIT)); then note "then waits until queued resource '$qr' is ACTIVE: $watch"; fi
  note "$next"
  exit 0
fi
if ((!WAIT)); then
  note "queued resource '$qr' requested; it is NOT ACTIVE yet, so node '$NAME' does not exist" \
    "yet. It does once this shows ACTIVE: $watch; then: ${next#next: }"
  exit 0
fi

# Wait for ACTIVE: the request can sit in the queue for minutes or hours.
note "waiting for queued resource '$qr' to become ACTIVE (Ctrl-C stops waiting; the request" \
  "stays queued): + $watch --format='value(state.state)'"
state="" last="" waited=0 errors=0 started=$SECONDS
interrupted() {
  echo >&2
  fail "stopped waiting: queued resource '$qr' is ${last:-not ACTIVE yet}, NOT ACTIVE, and stays" \
    "queued; watch it: $watch"
}
trap interrupted INT
while :; do
  if state=$("${describe[@]}" --format='value(state.state)'); then
    errors=0
  else
    errors=$((errors + 1))
    ((errors < 5)) || fail "cannot describe queued resource '$qr' (gcloud's message is above);" \
      "it is not known to be ACTIVE: $watch"
    state=$last
  fi
  if [[ $state != "$last" ]]; then note "queued resource '$qr': ${state:-?} (after ${waited}s)"; fi
  last=$state
  case $state in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      fail "queued resource '$qr' is $state: it will not become ACTIVE (why: $watch); delete it:" \
        "tpu/stop.sh --name $NAME --zone $ZONE --queued --queued-resource-id $qr" ;;
  esac
  if ((QUEUED_WAIT_TIMEOUT && waited >= QUEUED_WAIT_TIMEOUT)); then
    fail "queued resource '$qr' is still ${state:-not ACTIVE} after ${waited}s: NOT ACTIVE, so" \
      "node '$NAME' does not exist yet (the request stays queued); watch: $watch"
  fi
  sleep "$QUEUED_POLL_SECONDS"
  waited=$((SECONDS - started))
done
trap - INT
note "queued resource '$qr' is ACTIVE: node '$NAME' exists"
note "$next"
