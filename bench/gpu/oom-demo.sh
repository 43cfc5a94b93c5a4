#!/usr/bin/env bash
# Issue 13 (OOM-safe micro-batches) on the GPU machine, one device call of < 500 s:
#  1. the cuda addon (the carried build, else built here) and test/engine/cuda-oom.test.ts: OutOfMemoryError from a
#     cudaMalloc beyond the device and from the pool budget, the native scratch path, leak-free undo, a split step;
#  2. a Llama-2-7B-shaped random checkpoint written by PyTorch (bench/gpu/torch_bench.py --save: d4096, ff 11008,
#     32 heads, OOM_LAYERS layers, V 32000, bf16 safetensors);
#  3. bench/oom-demo.ts on it: micro-batch OOM_MICRO at OOM_SEQ under a pool budget just above what OOM_MICRO/2
#     needs (split, then the loss curves side by side with OOM_MICRO/2 asked directly and OOM_MICRO with room),
#     micro_batch_size: auto under that budget, and with no budget and gradient checkpointing off, micro-batches of
#     OOM_REAL_SEQ tokens doubled from OOM_REAL_MICRO until the device itself runs out of memory, that run split and
#     compared with the size it settled on; each with peak memory and the split messages.
#   here:   bash bench/gpu/pack-oom.sh
#   device: carry [".device", "core/engine/cuda/build"], command "bash bench/gpu/oom-demo.sh"
# Environment: OOM_LAYERS (32), OOM_SEQ (1024), OOM_MICRO (16), OOM_GA (1), OOM_STEPS (5), OOM_REAL_MICRO (8),
#   OOM_REAL_MAX (512), OOM_REAL_SEQ (1024), OOM_REAL_STEPS (3), OOM_PARTS (cap,auto,real), OOM_BUDGET_S (480: the
#   whole call).
# What comes back in $OUT: log.txt (everything), oom-demo.md (the tables), oom-demo.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
source .device/env.sh
OUT=${OUT:-/tmp/dqlora-oom}
MODEL=${OOM_MODEL:-/tmp/dqlora-oom-7b}
mkdir -p "$OUT"
LOG=$OUT/log.txt
T0=$(date +%s)
BUDGET=${OOM_BUDGET_S:-480}
stamp() { echo "== $1 (t+$(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee -a "$LOG"
df -h /tmp 2>&1 | tail -1 | tee -a "$LOG"
export DQLORA_CUDA_ADDON=$PWD/core/engine/cuda/build/dqlora_cuda.node
export DQLORA_LOG_LEVEL=${DQLORA_LOG_LEVEL:-warn}
addon_ok() { [ -f "$DQLORA_CUDA_ADDON" ] && node -e 'const a=require(process.env.DQLORA_CUDA_ADDON); process.exit(a.deviceCount().count > 0 && typeof a.poolSetLimit === "function" ? 0 : 1)' 2>>"$LOG"; }
stamp "cuda addon"
if addon_ok; then
  echo "using the carried addon ($(cat core/engine/cuda/build/stamp.txt 2>/dev/null | head -c 80))" | tee -a "$LOG"
else
  DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} timeout 240 node core/engine/cuda/build.mjs 2>&1 | tail -3 | tee -a "$LOG"
  addon_ok || { echo "the cuda addon does not load" | tee -a "$LOG"; cat core/engine/cuda/build/build.log >> "$LOG" 2>/dev/null; exit 1; }
fi
rc=0
stamp "cuda OOM tests"
timeout 120 node --test --test-reporter=spec .device/cuda-oom.test.mjs 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
stamp "7B-shaped checkpoint (PyTorch, ${OOM_LAYERS:-32} layers)"
if [ ! -f "$MODEL/model.safetensors" ]; then
  PYTHONUNBUFFERED=1 timeout "$(( $(left) < 200 ? $(left) : 200 ))" python3 bench/gpu/torch_bench.py --hidden 4096 --ff 11008 --layers "${OOM_LAYERS:-32}" \
    --heads 32 --kv-heads 32 --seq 2048 --save "$MODEL" --no-train 2>&1 | tail -3 | tee -a "$LOG"
fi
[ -f "$MODEL/model.safetensors" ] || { echo "no checkpoint written" | tee -a "$LOG"; exit 1; }
stamp "oom demo ($(left) s left)"
timeout "$(( $(left) - 5 ))" node .device/oom-demo.mjs --model "$MODEL" --parts "${OOM_PARTS:-cap,auto,real}" \
  --seq "${OOM_SEQ:-1024}" --micro "${OOM_MICRO:-16}" --grad-accum "${OOM_GA:-1}" --steps "${OOM_STEPS:-5}" \
  --real-micro "${OOM_REAL_MICRO:-8}" --real-max "${OOM_REAL_MAX:-512}" --real-seq "${OOM_REAL_SEQ:-1024}" --real-steps "${OOM_REAL_STEPS:-3}" \
  --json "$OUT/oom-demo.json" --md "$OUT/oom-demo.md" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
stamp done
exit $rc
