#!/bin/bash
# Re-create every fixture folder (hf/, megatron/, verify.json) with the real tools, on CPU.
# usage: PY=<python of a venv with megatron-bridge 0.6.2 + megatron-core 0.19.2 + transformers 5.12.1>
#        MLM_SRC=<folder holding Megatron-LM's megatron/ package, e.g. `git archive HEAD megatron | tar -x -C DIR`>
#        [MLM_COMMIT=<the Megatron-LM commit of MLM_SRC>] [OUT=<output root; default: the folder above make/>]
#        [TORCHRUN=<torchrun of that venv>] [CASES="<case folder names>"; default: all of them] bash make_all.sh
#   MLM_SRC is needed only when CASES holds mlm-llama-iter. mb-llama-tp2 and mlm-llama-iter are built from
#   mb-llama, which is then made in the scratch folder too (and written to OUT only when CASES names it).
# Every tool runs with the case's scratch folder as working directory and relative paths (hf, megatron, start),
# because the writers record them (run_config.yaml, the saved args Namespace).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$(dirname "$here")}
ALL="mb-llama mb-qwen3 mb-qwen3-moe mb-gpt-oss mb-deepseek-v3 mb-llama-tp2 mlm-llama-iter"
CASES=${CASES:-$ALL}
want() { case " $CASES " in *" $1 "*) return 0;; *) return 1;; esac; }
for c in $CASES; do case " $ALL " in *" $c "*) ;; *) echo "unknown case $c (known: $ALL)" >&2; exit 2;; esac; done
: "${PY:?set PY}"
if want mlm-llama-iter; then : "${MLM_SRC:?set MLM_SRC}"; fi
MLM_COMMIT=${MLM_COMMIT:-unknown}
# one rendezvous port per tool run (a port just released by the run before can still be busy)
PORT=29600
port() { PORT=$((PORT + 1)); echo $PORT; }
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
W=$(mktemp -d)
echo "scratch: $W"

mb_case() {   # NAME KIND TP [HF_FROM_CASE]
  local name=$1 kind=$2 tp=$3 from=${4:-} d=$W/$1
  mkdir -p "$d"; cd "$d"
  local c_hf="python make/make_tiny_hf.py $kind hf"
  if [ -n "$from" ]; then cp -a "$W/$from/hf" hf; c_hf="cp -a ../$from/hf hf"; else "$PY" "$here/make_tiny_hf.py" "$kind" hf; fi
  local c_imp="python make/mb_import.py hf megatron"
  if [ "$tp" = 1 ]; then MASTER_PORT=$(port) "$PY" "$here/mb_import.py" hf megatron > import.log 2>&1
  else "$TORCHRUN" --nproc-per-node "$tp" --master-port "$(port)" "$here/mb_import.py" hf megatron > import.log 2>&1
       c_imp="torchrun --nproc-per-node $tp make/mb_import.py hf megatron"; fi
  MASTER_PORT=$(port) "$PY" "$here/mb_export.py" hf megatron "$W/export_$name" > export.log 2>&1
  grep '^EXPORT_CHECK' export.log | sed 's/^EXPORT_CHECK //' > export.json
  printf '%s\n' "$c_hf" "$c_imp" "python make/mb_export.py hf megatron EXPORT_DIR" > commands.txt
  echo "$name: $(cat export.json)"
}

mlm_case() {   # NAME FROM_CASE
  local name=$1 from=$2 d=$W/$1
  mkdir -p "$d"; cd "$d"
  cp -a "$W/$from/hf" hf
  mkdir start; printf release > start/latest_checkpointed_iteration.txt
  cp -a "$W/$from/megatron/iter_0000000" start/release
  MASTER_PORT=$(port) "$PY" "$here/mlm_train_save.py" "$MLM_SRC" hf start megatron > save.log 2>&1
  grep '^MLM_SAVE' save.log | sed 's/^MLM_SAVE //' > save.json
  MASTER_PORT=$(port) MLM_CHECK_STATE="$W/mlm_state.pt" "$PY" "$here/mlm_train_save.py" "$MLM_SRC" hf start megatron --check > check.log 2>&1
  grep '^MLM_CHECK' check.log | sed 's/^MLM_CHECK //' > check.json
  MASTER_PORT=$(port) "$PY" "$here/mb_export.py" hf megatron "$W/export_$name" --model-from-hf > export.log 2>&1
  grep '^EXPORT_CHECK' export.log | sed 's/^EXPORT_CHECK //' > export.json
  ( MASTER_PORT=$(port) "$PY" "$here/mb_export.py" hf megatron "$W/export2_$name" > export_ckpt.log 2>&1 || true )
  grep '^EXPORT_CHECK' export_ckpt.log | sed 's/^EXPORT_CHECK //' > export_ckpt.json || echo '{}' > export_ckpt.json
  printf '%s\n' "cp -a ../$from/hf hf" "mkdir start && printf release > start/latest_checkpointed_iteration.txt" \
    "cp -a ../$from/megatron/iter_0000000 start/release" "python make/mlm_train_save.py MLM_SRC hf start megatron" \
    "python make/mlm_train_save.py MLM_SRC hf start megatron --check" \
    "python make/mb_export.py hf megatron EXPORT_DIR --model-from-hf" > commands.txt
  echo "$name: save $(cat save.json)"; echo "$name: resume $(cat check.json)"; echo "$name: export $(cat export.json)"
}

finish() {   # NAME WRITER LAYOUT
  local name=$1 d=$W/$1
  rm -rf "${OUT:?}/$name"; mkdir -p "$OUT/$name"
  cp -a "$d/hf" "$d/megatron" "$OUT/$name/"
  NAME=$name WRITER=$2 LAYOUT=$3 D=$d MLM_COMMIT=$MLM_COMMIT "$PY" - <<'PYEOF'
import json, os, pathlib
d = pathlib.Path(os.environ["D"])
info = {"writer": os.environ["WRITER"], "layout": os.environ["LAYOUT"],
        "commands": {"cwd": "the case folder (tools were given relative paths)",
                     "run": (d / "commands.txt").read_text().splitlines()},
        "checks": {}}
for f, key in (("export.json", "megatron_bridge_export_vs_hf"), ("save.json", "megatron_lm_save"),
               ("check.json", "megatron_lm_resume_from_this_checkpoint"),
               ("export_ckpt.json", "megatron_bridge_export_ckpt_attempt")):
    if (d / f).exists() and (d / f).read_text().strip():
        info["checks"][key] = json.loads((d / f).read_text())
if (d / "save.json").exists():
    import sys
    info["versions"] = {"megatron-lm": os.environ["MLM_COMMIT"]}
json.dump(info, open(d / "info.json", "w"))
PYEOF
  "$PY" "$here/write_verify.py" "$OUT/$name" "$d/info.json"
}

if want mb-llama || want mb-llama-tp2 || want mlm-llama-iter; then mb_case mb-llama llama 1; fi
if want mb-qwen3; then mb_case mb-qwen3 qwen3 1; fi
if want mb-qwen3-moe; then mb_case mb-qwen3-moe qwen3_moe 1; fi
if want mb-gpt-oss; then mb_case mb-gpt-oss gpt_oss 1; fi
if want mb-deepseek-v3; then mb_case mb-deepseek-v3 deepseek_v3 1; fi
if want mb-llama-tp2; then mb_case mb-llama-tp2 llama 2 mb-llama; fi
if want mlm-llama-iter; then mlm_case mlm-llama-iter mb-llama; fi

MB="Megatron-Bridge (AutoBridge.load_hf_weights + AutoBridge.save_megatron_model, the calls of import_ckpt)"
LOCAL="torch_dist (megatron-core 0.19.2), iter_0000000, local layer spec, fp32"
if want mb-llama; then finish mb-llama "$MB, TP=1" "$LOCAL"; fi
if want mb-qwen3; then finish mb-qwen3 "$MB, TP=1" "$LOCAL"; fi
if want mb-qwen3-moe; then finish mb-qwen3-moe "$MB, TP=1" "$LOCAL"; fi
if want mb-gpt-oss; then finish mb-gpt-oss "$MB, TP=1" "$LOCAL"; fi
if want mb-deepseek-v3; then
  finish mb-deepseek-v3 "$MB, TP=1" "torch_dist (megatron-core 0.19.2), iter_0000000, DeepSeek decoder block spec (no TE), fp32"; fi
if want mb-llama-tp2; then
  finish mb-llama-tp2 "$MB, TP=2 (2 gloo processes)" "torch_dist (megatron-core 0.19.2), iter_0000000, 2 shard files, local layer spec, fp32"; fi
if want mlm-llama-iter; then
  finish mlm-llama-iter "Megatron-LM training save_checkpoint (megatron/training/checkpointing.py) at iteration 10" \
    "torch_dist (Megatron-LM's megatron-core 0.20.0), iter_0000010, model + AdamW optimizer + scheduler + args, no RNG, local layer spec, fp32"; fi
echo "done: $OUT (scratch $W kept)"
