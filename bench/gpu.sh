#!/usr/bin/env bash
# The GPU benchmark in one device call: builds the CUDA addon, runs the cuda tests (vs the cpu backend), times
# the ops and a QLoRA training step of a TinyLlama-shaped layer stack through the Backend, then the same shape in
# PyTorch + PEFT, and prints one comparison table. Logs and JSON go to $OUT (the device tool fetches them).
#
#   here:        bash bench/gpu/pack.sh
#   device run:  carry [".device"], command "bash bench/gpu.sh"   (optionally BENCH_LAYERS=2 for a quick run)
set -uo pipefail
cd "$(dirname "$0")/.."
source .device/env.sh
OUT=${OUT:-/tmp/dqlora-gpu}
mkdir -p "$OUT"
L=${BENCH_LAYERS:-22} BATCH=${BENCH_BATCH:-8} SEQ=${BENCH_SEQ:-1024} STEPS=${BENCH_STEPS:-5}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

echo "== build"
DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} node worker/engine/cuda/build.mjs 2>&1 | tee "$OUT/build.txt"
export DQLORA_CUDA_ADDON=$PWD/worker/engine/cuda/build/dqlora_cuda.node
[ -f "$DQLORA_CUDA_ADDON" ] || { echo "addon not built"; cp worker/engine/cuda/build/build.log "$OUT/" 2>/dev/null; exit 1; }

echo "== cuda tests"
timeout 240 node --test --test-reporter=spec .device/cuda-ops.test.mjs 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== dqlora cuda bench"
timeout 240 node .device/cuda-bench.mjs --layers "$L" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --json "$OUT/cuda-bench.json" 2>&1 | grep -v '^DQLORA_JSON' | tee "$OUT/cuda-bench.txt"

echo "== pytorch + peft"
PYTHONUNBUFFERED=1 timeout 200 python3 bench/gpu/torch_bench.py --layers "$L" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --json "$OUT/torch-bench.json" 2>&1 | grep -v '^TORCH_JSON' | tee "$OUT/torch-bench.txt"

# The full-model comparison (worker/model through the Backend, same checkpoint as transformers) goes here once
# the model code exists: bench/gpu/model-bench.ts, bundled by pack.sh.
if [ -f .device/model-bench.mjs ]; then
  echo "== full model"
  node .device/model-bench.mjs --json "$OUT/model-bench.json" 2>&1 | tee "$OUT/model-bench.txt"
fi

echo "== summary"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
d, t = load('cuda-bench.json'), load('torch-bench.json')
rows = []
if d:
    tr = d['train']
    rows.append(('dqlora cuda (NF4 base)', tr['tokensPerSec'], tr['peakReservedGiB'], tr['tokensPerSec'] * tr['flopsPerToken'] / ((t or d)['gemmTflops'] * 1e12)))
if t:
    rows.append(('pytorch + peft (bf16 base)', t['tokensPerSec'], t['peakGiB'], t['mfu']))
ceil = (t or d or {}).get('gemmTflops', 0)
print(f"{'':28} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6}   (bf16 GEMM ceiling {ceil:.0f} TFLOP/s)")
for n, tok, mem, mfu in rows:
    print(f"{n:28} {tok:10.0f} {mem:9.2f} {mfu * 100:5.1f}%")
if d and t:
    print(f"speed ratio dqlora / torch: {d['train']['tokensPerSec'] / t['tokensPerSec']:.2f}x")
PY
exit $tests_rc
