#!/usr/bin/env bash
# Convert a checkpoint larger than the memory a process may use: the bench's synthetic
# Llama-3.2-1B-shaped bf16 checkpoint (2.47 GB; make bench writes it) under a cgroup memory
# limit (default 1600 MB, page cache included). The streaming import and export must finish
# (and round-trip bit-exact); the same import through a model must be killed.
# Needs root and a cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2.
# Usage: bash bench/memory_limit.sh [LIMIT_MB]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIMIT_MB=${1:-1600}
HF=bench/out/llama-3.2-1b-synthetic
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
test -f "$HF/config.json" || { echo "run make bench first (it writes $HF)" >&2; exit 2; }
if [ -d /sys/fs/cgroup/memory ]; then
  CG=/sys/fs/cgroup/memory/bridgegen-bench; mkdir -p $CG
  echo $((LIMIT_MB * 1024 * 1024)) > $CG/memory.limit_in_bytes
else
  CG=/sys/fs/cgroup/bridgegen-bench; mkdir -p $CG
  echo $((LIMIT_MB * 1024 * 1024)) > $CG/memory.max
fi
limited() { bash -c "echo \$\$ > $CG/cgroup.procs; exec $*"; }
echo "checkpoint: $(du -sh $HF | cut -f1), limit: $LIMIT_MB MB"
limited "$PY" -m bridgegen import --hf "$HF" --out "$OUT/megatron" > "$OUT/import.log" 2>&1
echo "streaming import: exit $?"
limited "$PY" -m bridgegen export --megatron "$OUT/megatron" --out "$OUT/hf" > "$OUT/export.log" 2>&1
echo "streaming export: exit $?"
"$PY" - "$HF" "$OUT/hf" <<'PYEOF'
import sys
from safetensors.torch import load_file
from pathlib import Path
import torch
def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"round trip bit-exact: {same}")
PYEOF
limited "$PY" - "$HF" "$OUT/model" > "$OUT/model.log" 2>&1 <<'PYEOF'
import sys, torch
from bridgegen.engines.model import ModelBridge
from bridgegen.engines.checkpoint import save_megatron
bridge = ModelBridge.from_hf_dir(sys.argv[1])
model = bridge.build_model(torch.bfloat16)
bridge.load_hf_weights(model)
save_megatron(model, bridge, sys.argv[2], dtype=torch.bfloat16, hf_source=sys.argv[1])
PYEOF
echo "import through a model: exit $? (137: killed by the limit)"
rmdir $CG 2>/dev/null || true
