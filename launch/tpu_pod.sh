#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh [options] -- --config configs/NAME.py[:arg] --workdir DIR [--config.x=y ...]
#
# Runs the opd_jax trainer on every worker of a Cloud TPU VM slice:
#   1. creates the slice (gcloud compute tpus tpu-vm create), or reuses it if it exists;
#   2. puts the code on every worker: this checkout (tracked and untracked-but-not-ignored
#      files, so uncommitted edits go too) copied with tpu-vm scp, or with --repo a git clone;
#   3. sets up the environment once per worker (launch/setup_worker.sh: a venv with
#      the package (pyproject.toml) and the matching jax[tpu]; a no-op when nothing changed);
#   4. runs `python -m opd_jax.train ARGS` on all workers at once
#      (gcloud compute tpus tpu-vm ssh --worker=all), ARGS passed through verbatim, plus
#      --config.distributed=True (one jax.distributed process per worker) unless ARGS set it.
# The trainer resumes from WORKDIR/checkpoints by itself, so running again continues a run.
#
# Options:
#   --name NAME              TPU VM name (default: opd-$USER)
#   --zone ZONE              zone (default: $ZONE, else gcloud's compute/zone)
#   --project PROJECT        project (default: $PROJECT, else gcloud's project)
#   --accelerator-type TYPE  slice type (default: v5litepod-16, i.e. v5e-16)
#   --runtime-version V      TPU software version (default by generation: v5e
#                            v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
#                            v4 tpu-ubuntu2204-base)
#   --spot                   create a spot slice (launch/tpu_queued.sh re-creates it after
#                            a preemption and resumes)
#   --data-disk SPEC         attach a disk at creation, e.g.
#                            source=projects/P/zones/Z/disks/ckpt,mode=read-only
#   --pre-run CMD            a shell command run on every worker before the setup, e.g. to
#                            mount the shared storage that holds the checkpoints and WORKDIR
#   --no-create              fail instead of creating the slice
#   --repo URL               git clone URL on the workers instead of copying this checkout
#   --ref REF                with --repo: the commit, tag or origin/BRANCH (default origin/HEAD)
#   --remote-dir DIR         code directory on the workers, relative to $HOME (default opd_jax)
#   --venv DIR               virtual environment on the workers (default: opd_jax_venv)
#   --env KEY=VALUE          environment for the trainer, repeatable (e.g. HF_HOME=/mnt/hf)
#   --skip-copy              do not copy or update the code
#   --skip-setup             do not run setup_worker.sh
#   --delete                 delete the slice after the run (whatever its outcome)
#   --dry-run                print the gcloud commands instead of running them
#   -h, --help               this text
#
# Example: Qwen3-1.7B <- Qwen3-8B on a v5e-16 (see launch/README.md):
#   launch/tpu_pod.sh --name opd-v5e16 --zone us-west4-a --accelerator-type v5litepod-16 -- \
#     --config configs/opd_single_teacher.py --workdir /mnt/disks/persist/runs/opd1 \
#     --config.student.model=/mnt/disks/persist/ckpt/Qwen3-1.7B
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME="opd-${USER:-user}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCEL=v5litepod-16
RUNTIME=
SPOT=0
CREATE=1
REPO=
REF=origin/HEAD
REMOTE_DIR=opd_jax
VENV=opd_jax_venv
ENVS=()
DATA_DISK=
PRE_RUN=
COPY=1
SETUP=1
DELETE=0
DRY_RUN=0
while (($#)); do
  case "$1" in --name|--zone|--project|--accelerator-type|--runtime-version|--data-disk|--pre-run|--repo|--ref|--remote-dir|--venv|--env) (($# > 1)) || die "$1 needs a value" ;; esac
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --runtime-version) RUNTIME="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --data-disk) DATA_DISK="$2"; shift 2 ;;
    --pre-run) PRE_RUN="$2"; shift 2 ;;
    --no-create) CREATE=0; shift ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --env) [[ "$2" == [A-Za-z_]*=* ]] || die "--env '$2': expected KEY=VALUE"
           ENVS+=("$2"); shift 2 ;;
    --skip-copy) COPY=0; shift ;;
    --skip-setup) SETUP=0; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done
TRAIN_ARGS=("$@")
((${#TRAIN_ARGS[@]})) || die 'no trainer arguments: add -- --config configs/NAME.py --workdir DIR'
has_arg() {  # has_arg FLAG: is FLAG among the trainer arguments (as FLAG VALUE or FLAG=VALUE)?
  local a
  for a in "${TRAIN_ARGS[@]}"; do [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0; done
  return 1
}
has_arg --config || die 'the trainer arguments need --config configs/NAME.py[:arg]'
has_arg --workdir || die 'the trainer arguments need --workdir DIR'
has_arg --config.distributed || TRAIN_ARGS+=(--config.distributed=True)

# shellcheck source=launch/lib/runtime.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/runtime.sh"
if [[ -z "$RUNTIME" ]]; then
  RUNTIME="$(default_runtime "$ACCEL")" ||
    die "no default --runtime-version for --accelerator-type $ACCEL; pass one"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GFLAGS=()
[[ -n "$ZONE" ]] && GFLAGS+=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GFLAGS+=("--project=$PROJECT")

# run CMD...: runs it, or with --dry-run prints it (shell-quoted, ready to paste).
run() {
  if ((DRY_RUN)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
# on_workers SCRIPT: runs a bash command line on every worker of the slice.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all --command="$1"
}
# quote ARGS...: one shell-quoted string (the remote shell splits it back exactly).
quote() { local out; printf -v out ' %q' "$@"; echo "${out# }"; }

# ------------------------------------------------------------------------ 1. the slice
if ((DRY_RUN)); then
  run gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format='value(state)'
  if ((CREATE)); then
    echo '# (dry run: the slice is taken to be missing)'
    STATE=
  else
    echo '# (dry run: the slice is taken to be READY)'
    STATE=READY
  fi
else
  STATE="$(gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" \
    --format='value(state)' 2>/dev/null || true)"
fi
if [[ -z "$STATE" ]]; then
  ((CREATE)) || die "slice '$NAME' does not exist (and --no-create was given)"
  CREATE_ARGS=(--accelerator-type="$ACCEL" --version="$RUNTIME")
  ((SPOT)) && CREATE_ARGS+=(--spot)
  [[ -n "$DATA_DISK" ]] && CREATE_ARGS+=("--data-disk=$DATA_DISK")
  run gcloud compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}" "${CREATE_ARGS[@]}"
elif [[ "$STATE" != READY ]]; then
  die "slice '$NAME' is $STATE, not READY (a preempted spot slice must be deleted and \
re-created: launch/tpu_queued.sh does that)"
else
  echo "tpu_pod.sh: reusing slice '$NAME' ($STATE)"
fi
delete_slice() { run gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet; }
((DELETE)) && trap delete_slice EXIT

# ------------------------------------------------------------------------- 2. the code
if ((COPY)); then
  if [[ -n "$REPO" ]]; then
    on_workers "set -e; if [ -d $(quote "$REMOTE_DIR/.git") ]; then \
git -C $(quote "$REMOTE_DIR") fetch --tags origin; else \
git clone $(quote "$REPO") $(quote "$REMOTE_DIR"); fi; \
git -C $(quote "$REMOTE_DIR") checkout --force --detach $(quote "$REF")"
  else
    TMP="$(mktemp -d)"
    TARBALL="$TMP/opd_jax.tgz"
    # The checkout as git sees it: tracked files (as they are now) and untracked files that
    # are not ignored; no venvs, runs or caches.
    if ((DRY_RUN)); then
      echo "# git ls-files -co --exclude-standard | tar -czf $TARBALL (in $ROOT)"
    else
      (cd "$ROOT" && git ls-files -z -co --exclude-standard |
        tar --null --ignore-failed-read -T - -czf "$TARBALL")
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:opd_jax.tgz" "${GFLAGS[@]}" --worker=all
    rm -rf "$TMP"
    D="$(quote "$REMOTE_DIR")"
    on_workers "set -e; rm -rf $D.new; mkdir -p $D.new; tar -xzf opd_jax.tgz -C $D.new; \
rm -rf $D; mv $D.new $D; rm -f opd_jax.tgz"
  fi
fi

# ------------------------------------------------------------------------ 3. the setup
[[ -n "$PRE_RUN" ]] && on_workers "$PRE_RUN"
if ((SETUP)); then
  on_workers "bash $(quote "$REMOTE_DIR/launch/setup_worker.sh") --venv $(quote "$VENV") \
--accelerator tpu"
fi

# -------------------------------------------------------------------------- 4. the run
REMOTE="cd $(quote "$REMOTE_DIR") && . $(quote "$VENV/bin/activate") && "
((${#ENVS[@]})) && REMOTE+="env $(quote "${ENVS[@]}") "
REMOTE+="python -m opd_jax.train $(quote "${TRAIN_ARGS[@]}")"
((DRY_RUN)) && echo "# on every worker: $REMOTE"
on_workers "$REMOTE"
