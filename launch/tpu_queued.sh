#!/usr/bin/env bash
# Usage: launch/tpu_queued.sh [options] -- --config configs/NAME.py[:arg] --workdir DIR [--config.x=y ...]
#
# Runs the trainer on a spot (preemptible) TPU slice obtained through a queued resource, and
# keeps it running through preemptions:
#   1. requests the slice (gcloud compute tpus queued-resources create --spot) unless the
#      queued resource exists, and waits until it is ACTIVE;
#   2. copies the code, sets up the workers and runs the trainer on all of them
#      (launch/tpu_pod.sh --no-create, the same arguments);
#   3. when the run ends because the slice was preempted (the queued resource is no longer
#      ACTIVE), deletes the queued resource, requests a new one and runs the same command
#      again. The trainer saves a checkpoint on SIGTERM and resumes from the latest one in
#      WORKDIR/checkpoints, so WORKDIR must outlive the slice: a persistent disk or a
#      filesystem mounted on every worker, never the workers' boot disks.
# A run that fails on a healthy slice is not retried (that is a bug, not a preemption).
#
# Options:
#   --name NAME              TPU node id (default: opd-$USER); the queued resource is NAME-qr
#   --qr-id ID               queued resource id (default: NAME-qr)
#   --zone ZONE              zone (default: $ZONE, else gcloud's compute/zone)
#   --project PROJECT        project (default: $PROJECT, else gcloud's project)
#   --accelerator-type TYPE  slice type (default: v5litepod-16)
#   --runtime-version V      TPU software version (default: as launch/tpu_pod.sh)
#   --no-spot                an on-demand request instead of --spot
#   --max-restarts N         give up after N preemptions (default: 20)
#   --poll SECONDS           state polling interval (default: 60)
#   --settle SECONDS         after a run exits 0, wait this long and check the slice is still
#                            ACTIVE before calling the run finished (default: 60)
#   --keep                   keep the slice after the run finishes (default: delete it)
#   --repo URL, --ref REF, --remote-dir DIR, --venv DIR, --env KEY=VALUE, --pre-run CMD,
#   --skip-setup             passed to launch/tpu_pod.sh (run before every attempt)
#   --dry-run                print the commands of one attempt instead of running them
#   -h, --help               this text
#
# Example:
#   launch/tpu_queued.sh --name opd-v5e16 --zone us-west4-a --accelerator-type v5litepod-16 -- \
#     --config configs/opd_single_teacher.py --workdir /mnt/disks/persist/runs/opd1
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "tpu_queued.sh: $*" >&2; exit 2; }
log() { echo "tpu_queued.sh: $(date -u +%H:%M:%S) $*"; }

NAME="opd-${USER:-user}"
QR=
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCEL=v5litepod-16
RUNTIME=
SPOT=1
MAX_RESTARTS=20
POLL=60
SETTLE=60
KEEP=0
DRY_RUN=0
POD_ARGS=()
while (($#)); do
  case "$1" in --name|--qr-id|--zone|--project|--accelerator-type|--runtime-version|--max-restarts|--poll|--settle|--repo|--ref|--remote-dir|--venv|--env|--pre-run) (($# > 1)) || die "$1 needs a value" ;; esac
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --qr-id) QR="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --runtime-version) RUNTIME="$2"; shift 2 ;;
    --no-spot) SPOT=0; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --poll) POLL="$2"; shift 2 ;;
    --settle) SETTLE="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --repo|--ref|--remote-dir|--venv|--env|--pre-run) POD_ARGS+=("$1" "$2"); shift 2 ;;
    --skip-setup) POD_ARGS+=("$1"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done
(($#)) || die 'no trainer arguments: add -- --config configs/NAME.py --workdir DIR'
QR="${QR:-$NAME-qr}"
[[ "$MAX_RESTARTS$POLL$SETTLE" =~ ^[0-9]+$ ]] ||
  die '--max-restarts, --poll and --settle take whole numbers'
# shellcheck source=launch/lib/runtime.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/runtime.sh"
if [[ -z "$RUNTIME" ]]; then
  RUNTIME="$(default_runtime "$ACCEL")" ||
    die "no default --runtime-version for --accelerator-type $ACCEL; pass one"
fi
WORKDIR=
prev=
for a in "$@"; do
  case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac
  [[ "$prev" == --workdir ]] && WORKDIR="$a"
  prev="$a"
done
case "$WORKDIR" in
  /mnt/*|/gcs/*|gs://*) ;;
  '') die 'the trainer arguments need --workdir DIR (on storage that outlives the slice)' ;;
  *) echo "tpu_queued.sh: warning: --workdir $WORKDIR does not look like persistent storage" \
       "(e.g. /mnt/disks/...); a re-created slice will not find its checkpoints there" >&2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GFLAGS=()
[[ -n "$ZONE" ]] && GFLAGS+=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GFLAGS+=("--project=$PROJECT")
POD_ARGS+=(--name "$NAME" --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" --no-create)
[[ -n "$ZONE" ]] && POD_ARGS+=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && POD_ARGS+=(--project "$PROJECT")

run() {
  if ((DRY_RUN)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
qr_state() {  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...; empty when it does not exist
  gcloud compute tpus queued-resources describe "$QR" "${GFLAGS[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}
qr_create() {
  local args=(--node-id="$NAME" --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
  ((SPOT)) && args+=(--spot)
  run gcloud compute tpus queued-resources create "$QR" "${GFLAGS[@]}" "${args[@]}"
}
qr_delete() {  # --force also deletes the TPU node it holds
  run gcloud compute tpus queued-resources delete "$QR" "${GFLAGS[@]}" --force --quiet
}
wait_active() {  # requests the slice if needed and returns once it is ACTIVE
  local state
  while :; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) log "queued resource $QR is ACTIVE"; return 0 ;;
      '') log "requesting $ACCEL as queued resource $QR (node $NAME)"; qr_create ;;
      FAILED|SUSPENDED) log "queued resource $QR is $state: deleting and requesting again"
                        qr_delete; qr_create ;;
      *) log "queued resource $QR is $state; waiting ${POLL}s" ;;  # ACCEPTED, PROVISIONING...
    esac
    sleep "$POLL"
  done
}

if ((DRY_RUN)); then
  echo "# one attempt (the loop re-requests the slice and re-runs this after a preemption):"
  run gcloud compute tpus queued-resources describe "$QR" "${GFLAGS[@]}" \
    --format='value(state.state)'
  qr_create
  echo "# ... poll the describe command every ${POLL}s until the state is ACTIVE, then:"
  "$HERE/tpu_pod.sh" --dry-run "${POD_ARGS[@]}" -- "$@"
  ((KEEP)) || qr_delete
  exit 0
fi

restarts=0
while :; do
  wait_active
  set +e
  "$HERE/tpu_pod.sh" "${POD_ARGS[@]}" -- "$@"
  rc=$?
  set -e
  if ((rc == 0)); then
    # A preempted worker saves and exits 0 too (SIGTERM): let the slice's state catch up.
    sleep "$SETTLE"
  fi
  state="$(qr_state)"
  if [[ "$state" == ACTIVE ]]; then
    if ((rc == 0)); then
      log "the run finished"
      ((KEEP)) || qr_delete
      exit 0
    fi
    log "the run failed (exit $rc) on a healthy slice; not retrying. The slice is kept" \
        "for inspection: gcloud compute tpus queued-resources delete $QR --force"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    log "preempted $restarts times, more than --max-restarts=$MAX_RESTARTS; giving up"
    exit 1
  fi
  log "the slice was preempted (queued resource: ${state:-gone}); restart $restarts of" \
      "$MAX_RESTARTS: re-requesting it, the run resumes from its last checkpoint"
  [[ -n "$state" ]] && qr_delete
done
