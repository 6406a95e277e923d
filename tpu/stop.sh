#!/usr/bin/env bash
# Stop (keep the disk, stop paying for the TPU) or delete a Cloud TPU VM / slice.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu/stop.sh [flags]

Stops the TPU VM (its disk and installed software stay; "gcloud compute tpus tpu-vm start"
brings it back), or with --delete deletes it. Checkpoints in a gs:// workdir are not touched.
If gcloud refuses to stop a node (e.g. a slice or a Spot/preemptible TPU), delete it instead.
Flags override the environment variables named in brackets.

Required:
  --name NAME               TPU node name [NAME]
  --zone ZONE               zone [ZONE]
Optional:
  --project PROJECT         GCP project; default: gcloud's core/project [PROJECT]
  --delete                  delete instead of stop [DELETE=1]
  --queued                  with --delete: the TPU came from tpu/create.sh --queued; delete the
                            queued resource and its node (gcloud --force) [QUEUED=1]
  --queued-resource-id ID   queued resource id; default NAME-qr [QUEUED_RESOURCE_ID]
  --yes                     do not ask for confirmation (gcloud --quiet)
  --async                   return without waiting for the operation
  --dry-run                 print the gcloud command instead of running it [DRY_RUN=1]
  -h, --help                this help

Examples:
  tpu/stop.sh --name parrot --zone us-west4-a
  tpu/stop.sh --name parrot-pod --zone us-central2-b --delete --queued
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
if [[ $QUEUED == 1 && $DELETE != 1 ]]; then
  die "--queued applies only with --delete (a queued resource is released by deleting it)"
fi
if [[ $QUEUED != 1 && -n $QUEUED_RESOURCE_ID ]]; then
  die "--queued-resource-id applies only with --queued --delete"
fi

location_flags
if [[ $QUEUED == 1 ]]; then
  cmd=("$GCLOUD" compute tpus queued-resources delete "${QUEUED_RESOURCE_ID:-$NAME-qr}"
    "${LOCATION[@]}" --force)
elif [[ $DELETE == 1 ]]; then
  cmd=("$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}")
else
  cmd=("$GCLOUD" compute tpus tpu-vm stop "$NAME" "${LOCATION[@]}")
fi
if ((ASYNC)); then cmd+=(--async); fi
if ((YES)); then cmd+=(--quiet); fi
run "${cmd[@]}"
