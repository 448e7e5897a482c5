#!/usr/bin/env bash
# The GPU path in one run: TP=1 on one GPU with NCCL, fp32 and bf16, compared with the CPU
# path and with HF. Needs a machine with CUDA and the package installed (make venv).
# Usage: bash bench/gpu_check.sh            (exit status 0 when every check passes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_check.py "$@"
