#!/usr/bin/env bash
# Stop paying for a Cloud TPU VM / slice: stop it (its disk is kept), or delete it where stopping
# is not possible (Spot/preemptible TPUs, TPUs made by a queued resource).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu/stop.sh [flags]

Stops paying for the TPU, in the way its kind allows (the node is described first):
  - an ordinary TPU is stopped: its disk and installed software stay, and
    "gcloud compute tpus tpu-vm start" brings it back;
  - a Spot or preemptible TPU cannot be stopped and started again, only deleted and recreated,
    so it is deleted;
  - a TPU made by a queued resource (tpu/create.sh --queued) is released by deleting the
    queued resource, which deletes the node with it.
Deleting asks for confirmation unless --yes is given. Checkpoints in a gs:// workdir are not
touched. Flags override the environment variables named in brackets.

Required:
  --name NAME               TPU node name [NAME]
  --zone ZONE               zone [ZONE]
Optional:
  --project PROJECT         GCP project; default: gcloud's core/project [PROJECT]
  --delete                  delete, even an ordinary TPU [DELETE=1]
  --queued                  the TPU came from tpu/create.sh --queued: delete the queued
                            resource and its node (gcloud --force), even when the node is gone
                            and cannot be described [QUEUED=1]
  --queued-resource-id ID   queued resource id; default: the node's, or NAME-qr
                            [QUEUED_RESOURCE_ID]
  --yes                     do not ask for confirmation (gcloud --quiet)
  --async                   return without waiting for the operation
  --dry-run                 print the gcloud command instead of running it (the node is still
                            described, read-only, to choose it) [DRY_RUN=1]
  -h, --help                this help

Examples:
  tpu/stop.sh --name parrot --zone us-west4-a
  tpu/stop.sh --name parrot-pod --zone us-central2-b --queued
USAGE
}

DELETE=${DELETE:-0}
QUEUED=${QUEUED:-0}
QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-}
YES=0
ASYNC=0

while (($#)); do
  if is_flag_eq "$1"; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --delete) DELETE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --queued-resource-id) need_value "$@"; QUEUED_RESOURCE_ID=$2; shift 2 ;;
    --yes) YES=1; shift ;;
    --async) ASYNC=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag '$1' (see $SCRIPT -h)" ;;
  esac
done

require NAME ZONE
check_name
if [[ $QUEUED != 1 && -n $QUEUED_RESOURCE_ID ]]; then
  die "--queued-resource-id applies only with --queued"
fi

location_flags
action=stop
qr=${QUEUED_RESOURCE_ID:-$NAME-qr}
if [[ $QUEUED == 1 ]]; then
  action=queued
elif describe_node; then
  if [[ -n $NODE_QR ]]; then
    action=queued qr=$NODE_QR
    note "TPU '$NAME' was made by queued resource '$qr': deleting the queued resource (and the" \
      "node with it) releases it; tpu/create.sh --queued requests a new one"
  elif ((NODE_SPOT)); then
    action=delete
    if [[ $DELETE != 1 ]]; then
      note "TPU '$NAME' is a Spot/preemptible TPU, which cannot be stopped and started again:" \
        "deleting it (checkpoints in gs:// stay; tpu/create.sh --spot makes a new one)"
    fi
  elif [[ $DELETE == 1 ]]; then
    action=delete
  fi
elif [[ $DRY_RUN == 1 ]]; then
  note "could not describe TPU '$NAME': the plan follows the flags alone"
  if [[ $DELETE == 1 ]]; then action=delete; fi
else
  fail "cannot describe TPU '$NAME' in zone $ZONE (gcloud's message is above); if only its" \
    "queued resource is left, delete that: tpu/stop.sh --name $NAME --zone $ZONE --queued"
fi

case $action in
  queued) cmd=("$GCLOUD" compute tpus queued-resources delete "$qr" "${LOCATION[@]}" --force) ;;
  delete) cmd=("$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}") ;;
  stop) cmd=("$GCLOUD" compute tpus tpu-vm stop "$NAME" "${LOCATION[@]}") ;;
esac
if ((ASYNC)); then cmd+=(--async); fi
if ((YES)); then cmd+=(--quiet); fi
run "${cmd[@]}"
