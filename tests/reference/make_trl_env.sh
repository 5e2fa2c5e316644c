#!/usr/bin/env bash
# A separate venv for the TRL reference benchmark (never a project dependency).
#   bash tests/reference/make_trl_env.sh [/tmp/trl-venv]
set -euo pipefail
V=${1:-/tmp/trl-venv}
python3 -m venv "$V"
"$V/bin/pip" install -q torch==2.13.0 transformers==5.23.0 trl accelerate datasets
"$V/bin/python" -c 'import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)'
