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
                            of failing when none is free) [QUEUED=1]
  --queued-resource-id ID   queued resource id; default NAME-qr [QUEUED_RESOURCE_ID]
  --valid-until-duration D  with --queued: give up if not provisioned within D, e.g. 6h
                            [VALID_UNTIL_DURATION]
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
if [[ $QUEUED == 1 ]]; then
  note "queued; the node exists once this shows ACTIVE:" \
    "$(quote_argv "$GCLOUD" compute tpus queued-resources describe \
      "${QUEUED_RESOURCE_ID:-$NAME-qr}" "${LOCATION[@]}")"
fi
note "next: tpu/setup.sh --name $NAME --zone $ZONE"
