#!/usr/bin/env bash
# Usage: launch/local.sh [options] -- --config configs/NAME.py[:arg] --workdir DIR [--config.x=y ...]
#
# Runs the trainer on this machine: the same `python -m opd_jax.train ARGS` that
# launch/tpu_pod.sh runs on every TPU worker, ARGS passed through verbatim.
#
# With --nproc N > 1 it starts N processes that form one jax.distributed job over loopback,
# as the workers of a pod slice do: each gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (the trainer calls jax.distributed.initialize()
# when JAX_COORDINATOR_ADDRESS is set). Process 0 writes to this terminal, process i > 0 to
# LOG_DIR/process_i.log. If one process fails, the others are stopped and the script exits
# with its status; Ctrl-C / SIGTERM are passed on to every process (the trainer then saves a
# checkpoint and exits).
#
# Options:
#   --nproc N               processes (default: 1)
#   --cpu-devices K         run on the CPU with K fake devices per process
#                           (JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K)
#   --port PORT             coordinator port (default: a free one)
#   --log-dir DIR           logs of processes 1..N-1 (default: a new temporary directory)
#   --grace SECONDS         after a process fails, how long the others get to exit on
#                           SIGTERM before they are killed (default: 30)
#   --python PY             the interpreter (default: python3 from PATH, i.e. the active venv)
#   --dry-run               print the commands instead of running them
#   -h, --help              this text
#
# Examples:
#   launch/local.sh -- --config configs/opd_single_teacher.py:runlocal --workdir /tmp/opd
#   launch/local.sh --nproc 2 --cpu-devices 4 -- \
#     --config configs/opd_single_teacher.py:runlocal --workdir /tmp/opd2
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "local.sh: $*" >&2; exit 2; }

NPROC=1
CPU_DEVICES=
PORT=
LOG_DIR=
GRACE=30
PY=python3
DRY_RUN=0
while (($#)); do
  case "$1" in --nproc|--cpu-devices|--port|--log-dir|--grace|--python) (($# > 1)) || die "$1 needs a value" ;; esac
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --cpu-devices) CPU_DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --grace) GRACE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done
(($#)) || die 'no trainer arguments: add -- --config configs/NAME.py --workdir DIR'
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc '$NPROC': expected a positive integer"
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] ||
  die "--cpu-devices '$CPU_DEVICES': expected a positive integer"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"  # configs/ paths and `-m opd_jax` resolve from the checkout
CMD=("$PY" -m opd_jax.train "$@")
BASE_ENV=()
if [[ -n "$CPU_DEVICES" ]]; then
  # Replace any device count already in XLA_FLAGS, keep the other flags.
  read -ra old_flags <<< "${XLA_FLAGS:-}"
  flags=()
  for f in "${old_flags[@]}"; do
    [[ "$f" == --xla_force_host_platform_device_count=* ]] || flags+=("$f")
  done
  flags+=("--xla_force_host_platform_device_count=$CPU_DEVICES")
  BASE_ENV+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${flags[*]}")
fi

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

if ((NPROC == 1)); then
  if ((DRY_RUN)); then
    show env "${BASE_ENV[@]}" "${CMD[@]}"
    exit 0
  fi
  exec env "${BASE_ENV[@]}" "${CMD[@]}"
fi

if [[ -z "$PORT" ]]; then
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)))"
fi
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR="${TMPDIR:-/tmp}/opd_jax_local.XXXXXX"
  ((DRY_RUN)) || LOG_DIR="$(mktemp -d "$LOG_DIR")"
fi
((DRY_RUN)) || mkdir -p "$LOG_DIR"
proc_env() {  # proc_env I: the environment of process I
  echo "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT"
  echo "JAX_NUM_PROCESSES=$NPROC"
  echo "JAX_PROCESS_ID=$1"
}

if ((DRY_RUN)); then
  for ((i = 0; i < NPROC; i++)); do
    mapfile -t env_i < <(proc_env "$i")
    if ((i == 0)); then
      show env "${BASE_ENV[@]}" "${env_i[@]}" "${CMD[@]}"
    else
      printf '%s > %q\n' "$(show env "${BASE_ENV[@]}" "${env_i[@]}" "${CMD[@]}")" \
        "$LOG_DIR/process_$i.log"
    fi
  done
  exit 0
fi

PIDS=()
declare -A INDEX=()  # pid -> process index
stop_all() {  # signal every process this script started
  local pid
  for pid in "${PIDS[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM; wait; exit 143' TERM
trap 'stop_all INT; wait; exit 130' INT

echo "local.sh: $NPROC processes, coordinator 127.0.0.1:$PORT, logs of processes 1..$((NPROC - 1))" \
  "in $LOG_DIR"
for ((i = 0; i < NPROC; i++)); do
  mapfile -t env_i < <(proc_env "$i")
  if ((i == 0)); then
    env "${BASE_ENV[@]}" "${env_i[@]}" "${CMD[@]}" &
  else
    env "${BASE_ENV[@]}" "${env_i[@]}" "${CMD[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  PIDS+=("$!")
  INDEX[$!]=$i
done

# Wait for every process (polling: `wait -n` misses processes that end together); the first
# failure stops the rest.
declare -A ALIVE=()
for pid in "${PIDS[@]}"; do ALIVE[$pid]=1; done
status=0
KILLER=
while ((${#ALIVE[@]})); do
  for pid in "${!ALIVE[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    rc=$?
    set -e
    unset "ALIVE[$pid]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process ${INDEX[$pid]} (pid $pid) exited with status $rc;" \
        'stopping the others' >&2
      stop_all TERM
      # A process blocked in a collective with the dead one may never act on its SIGTERM.
      (sleep "$GRACE"; stop_all KILL) > /dev/null 2>&1 &  # not holding our stdout open
      KILLER=$!
    fi
  done
  if ((${#ALIVE[@]})); then sleep 1; fi
done
if [[ -n "$KILLER" ]]; then kill "$KILLER" 2>/dev/null || true; fi
if ((status != 0)); then
  for ((i = 1; i < NPROC; i++)); do
    echo "--- $LOG_DIR/process_$i.log (last lines)" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
  done
fi
exit "$status"
