#!/usr/bin/env bash
# Accelerator check for one NVIDIA GPU (<= 8 min wall time there):
#   bash bench/accelerator.sh            # installs jax[cuda12]==0.10.2, GPU tests, 0.6B<-1.7B bench
#   DRY_RUN=1 bash bench/accelerator.sh  # CPU, tiny shapes, no install (tests/bench/test_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
if [ "${DRY_RUN:-0}" = "1" ] || [ "${1:-}" = "--dry-run" ]; then
  export JAX_PLATFORMS=cpu
  exec python -m opd_jax.bench.accelerator --dry-run
fi
pip install -q 'jax[cuda12]==0.10.2'
export JAX_PLATFORMS=cuda   # tests/conftest.py only setdefaults cpu
python -c 'import jax; print(jax.devices())'
timeout 240 python -m pytest -q -x tests/rollout/test_sampler.py tests/teachers/test_scoring.py \
  tests/training/test_update.py tests/test_sharding.py || echo "GPU TESTS FAILED rc=$?"
timeout 240 python -m opd_jax.bench.accelerator
