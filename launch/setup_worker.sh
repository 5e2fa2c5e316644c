#!/usr/bin/env bash
# Usage: launch/setup_worker.sh [--venv DIR] [--accelerator tpu|cuda12|cpu] [--force|--check]
#
# Prepares one machine (a TPU VM worker, a GPU box, this machine) to run opd_jax from the
# checkout this script lives in: a Python >= 3.11 virtual environment with the package
# installed from the checkout (its pinned dependencies are in pyproject.toml) and the
# accelerator wheel of the pinned jax version
# (pip install "jax[tpu]==<the jax version in pyproject.toml>").
#
# Idempotent: a hash of pyproject.toml, the accelerator and the Python version is kept in
# VENV/.opd_jax_setup; when it matches, nothing is installed and the script exits at once.
# launch/tpu_pod.sh runs it on every worker of a slice before each run.
#
# Python: python3.11 (or a python3 that is at least 3.11) when there is one; otherwise uv
# (pip install --user uv) downloads a standalone CPython 3.11 (TPU VM images ship 3.10).
#
# Options:
#   --venv DIR           the virtual environment (default: $OPD_JAX_VENV or ~/opd_jax_venv)
#   --accelerator NAME   tpu (default), cuda12, or cpu (no accelerator wheel)
#   --force              reinstall even when the recorded hash matches
#   --check              install nothing; exit 0 when VENV is up to date, 1 when not
#   -h, --help           this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

VENV="${OPD_JAX_VENV:-$HOME/opd_jax_venv}"
ACCEL=tpu
FORCE=0
CHECK=0
while (($#)); do
  case "$1" in
    --venv|--accelerator) (($# > 1)) || { echo "setup_worker.sh: $1 needs a value" >&2; exit 2; } ;;&
    --venv) VENV="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --check) CHECK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_worker.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$ACCEL" in
  tpu|cuda12|cpu) ;;
  *) echo "setup_worker.sh: --accelerator '$ACCEL': expected tpu, cuda12 or cpu" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/pyproject.toml"
[[ -f "$REQS" ]] || { echo "setup_worker.sh: $REQS not found" >&2; exit 1; }
JAX_VERSION="$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' "$REQS")"
[[ -n "$JAX_VERSION" ]] || { echo "setup_worker.sh: no 'jax==' pin in $REQS" >&2; exit 1; }

# ------------------------------------------------------------------------- pick a Python
find_python() {
  local py
  for py in python3.11 python3.12 python3.13 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
        "$py" -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

MARKER="$VENV/.opd_jax_setup"
PY_TAG="$(p="$(find_python)" && "$p" --version 2>&1 || echo 'uv python 3.11')"
WANT="$( { cat "$REQS"; echo "accelerator=$ACCEL"; echo "python=$PY_TAG"; } |
  sha256sum | cut -d' ' -f1)"
if ((!FORCE)) && [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]]; then
  echo "setup_worker.sh: $VENV is up to date (jax $JAX_VERSION, $ACCEL)"
  exit 0
fi
if ((CHECK)); then
  echo "setup_worker.sh: $VENV needs setup (want $WANT)"
  exit 1
fi

# ------------------------------------------------------------------------------ install
echo "setup_worker.sh: setting up $VENV (jax $JAX_VERSION, $ACCEL, $PY_TAG) on $(hostname)"
rm -f "$MARKER"  # an interrupted install must not look finished
if PY="$(find_python)"; then
  "$PY" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  pip_install() { "$VENV/bin/python" -m pip install -q "$@"; }
else
  python3 -m pip install -q --user uv
  UV="$(python3 -m site --user-base)/bin/uv"
  "$UV" venv --clear --python 3.11 "$VENV"
  pip_install() { "$UV" pip install -q --python "$VENV/bin/python" "$@"; }
fi

pip_install -e "$ROOT"
case "$ACCEL" in
  # libtpu is on PyPI; the find-links page also serves older releases.
  tpu) pip_install "jax[tpu]==$JAX_VERSION" \
         -f https://storage.googleapis.com/jax-releases/libtpu_releases.html ;;
  cuda12) pip_install "jax[cuda12]==$JAX_VERSION" ;;
  cpu) ;;
esac
# Import only: initialising the TPU here could wait for the other hosts of a pod.
"$VENV/bin/python" -c 'import jax; print("setup_worker.sh: jax", jax.__version__)'
echo "$WANT" > "$MARKER"
echo "setup_worker.sh: done; activate with: . $VENV/bin/activate"
