#!/usr/bin/env bash
# The GPU benchmark in one device call: builds the CUDA addon, runs the cuda tests (ops vs the cpu backend, the
# golden fixtures, a 200-step training run vs the cpu backend), then the full-model benchmark: a TinyLlama-1.1B-
# shaped and a Llama-2-7B-shaped random-init checkpoint written by PyTorch, trained by PyTorch + PEFT and by dqlora
# (core/model + coordinator/train.ts on the cuda backend) side by side, and writes a markdown table.
# Optionally the older per-op / layer-stack microbenchmark (part `layer`).
#
#   here:        bash bench/gpu/pack.sh        (bundles + node; add BENCH_PREBUILT=1 below to reuse a local build)
#   device run:  carry [".device", "core/engine/cuda/build"], command "bash bench/gpu.sh"
# Environment: BENCH_PARTS (default "build,ops,modeltests,model"; add "layer" for the microbenchmark),
#   BENCH_PREBUILT=1 (skip the build when the carried addon loads), BENCH_TL_RUNS / BENCH_7B_RUNS
#   (<checkpointing>x<batch> lists), BENCH_7B_TORCH_RUNS, BENCH_STEPS.
# What comes back in $OUT: log.txt (everything), results.md (the table), results.json, curves.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source .device/env.sh
OUT=${OUT:-/tmp/dqlora-gpu}
WORK=/tmp/dqlora-bench
MODELS=${BENCH_MODELS:-/tmp/dqlora-models}
mkdir -p "$OUT" "$WORK" "$MODELS"
PARTS=${BENCH_PARTS:-build,ops,modeltests,model}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
LOG="$OUT/log.txt"
say() { echo "$@" | tee -a "$LOG"; }
STEPS=${BENCH_STEPS:-3}
SEQ=${BENCH_SEQ:-1024}
TL_RUNS=${BENCH_TL_RUNS:-0x32,1x32}
L7_RUNS=${BENCH_7B_RUNS:-1x1,1x4,1x8}
L7_TORCH_RUNS=${BENCH_7B_TORCH_RUNS:-1x1,1x4}
T0=$(date +%s)
stamp() { say "== $1 (t+$(( $(date +%s) - T0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
df -h /tmp 2>&1 | tail -1 | tee -a "$LOG"

export DQLORA_CUDA_ADDON=$PWD/core/engine/cuda/build/dqlora_cuda.node
addon_ok() { [ -f "$DQLORA_CUDA_ADDON" ] && node -e 'const a=require(process.env.DQLORA_CUDA_ADDON); process.exit(a.deviceCount().count > 0 ? 0 : 1)' 2>>"$LOG"; }
if has build; then
  stamp build
  if [ "${BENCH_PREBUILT:-0}" = 1 ] && addon_ok; then
    say "using the carried addon ($(cat core/engine/cuda/build/stamp.txt 2>/dev/null))"
  else
    DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} node core/engine/cuda/build.mjs 2>&1 | tee -a "$LOG"
  fi
fi
addon_ok || { say "addon not built / does not load"; cat core/engine/cuda/build/build.log >> "$LOG" 2>/dev/null; exit 1; }
rc=0

if has ops; then
  stamp "cuda op tests"
  timeout 240 node --test --test-reporter=spec .device/cuda-ops.test.mjs 2>&1 | tee -a "$LOG"
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    rc=1
    # The mma.sync attention (v2) is the newest kernel: if the op tests fail, the rest runs on the WMMA one.
    if grep -q "✖ causal GQA attention" "$LOG"; then export DQLORA_ATTN=v1; say "attention v2 failed its test: DQLORA_ATTN=v1 from here on"; fi
  fi
fi
if has modeltests; then
  stamp "cuda model tests (golden fixtures, 200 steps vs cpu)"
  DQLORA_CURVE_OUT=$OUT/curves.json timeout 240 node --test --test-reporter=spec .device/cuda-golden.test.mjs .device/cuda-train.test.mjs .device/cuda-chatglm.test.mjs 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi

if has layer; then
  stamp "layer-stack microbenchmark"
  L=${BENCH_LAYERS:-22} BATCH=${BENCH_BATCH:-8}
  timeout 240 node .device/cuda-bench.mjs --layers "$L" --batch "$BATCH" --seq "$SEQ" --steps 5 --json "$WORK/cuda-bench.json" 2>&1 | grep -v '^DQLORA_JSON' | tee -a "$LOG"
  PYTHONUNBUFFERED=1 timeout 200 python3 bench/gpu/torch_bench.py --layers "$L" --runs "0x$BATCH" --seq "$SEQ" --steps 5 --json "$WORK/torch-layer.json" 2>&1 | grep -v '^TORCH_JSON' | tee -a "$LOG"
fi

if has model; then
  stamp "TinyLlama-1.1B shape: pytorch + peft (writes the checkpoint)"
  PYTHONUNBUFFERED=1 timeout 240 python3 bench/gpu/torch_bench.py --save "$MODELS/tinyllama" --runs "$TL_RUNS" --seq "$SEQ" --steps "$STEPS" \
    --json "$WORK/torch-tinyllama.json" 2>&1 | grep -v '^TORCH_JSON' | tee -a "$LOG"
  stamp "TinyLlama-1.1B shape: dqlora cuda"
  timeout 240 node .device/model-bench.mjs --model "$MODELS/tinyllama" --runs "$TL_RUNS" --seq "$SEQ" --steps "$STEPS" --label tinyllama \
    --json "$WORK/dq-tinyllama.json" 2>&1 | tee -a "$LOG"
  rm -rf "$MODELS/tinyllama"
  stamp "Llama-2-7B shape: pytorch + peft (writes the checkpoint)"
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/gpu/torch_bench.py --hidden 4096 --ff 11008 --layers 32 --heads 32 --kv-heads 32 \
    --save "$MODELS/llama7b" --runs "$L7_TORCH_RUNS" --seq "$SEQ" --steps "$STEPS" --json "$WORK/torch-7b.json" 2>&1 | grep -v '^TORCH_JSON' | tee -a "$LOG"
  stamp "Llama-2-7B shape: dqlora cuda"
  timeout 300 node .device/model-bench.mjs --model "$MODELS/llama7b" --runs "$L7_RUNS" --seq "$SEQ" --steps "$STEPS" --label llama-7b \
    --json "$WORK/dq-7b.json" 2>&1 | tee -a "$LOG"
fi

stamp summary
python3 bench/gpu/summarize.py "$WORK" "$OUT/results.json" > "$OUT/results.md" 2>>"$LOG"
cat "$OUT/results.md" | tee -a "$LOG"
stamp done
exit $rc
