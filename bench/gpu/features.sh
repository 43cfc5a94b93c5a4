#!/usr/bin/env bash
# Issue-13 fixtures and checks in one device call (see bench/gpu/pack-features.sh for the packing, run here first):
#  1. transformers + PEFT reference numbers: quantization none (test/fixtures/golden-noquant/*/expected.json) and
#     (the DoRA fixtures are made by make_dora_golden.py / make_dora_trained.py) — CPU torch, fp32;
#  2. the cuda addon built here and test/engine/cuda-features.test.ts (dense linear, DoRA ops, packed attention,
#     packed model step, noquant eval vs transformers, DoRA step) on the GPU.
#  3. PEFT loads the DoRA adapter dqlora saved (test/reference/check_peft_loads_dora.py → $OUT/dora-ours).
# Everything lands in $OUT; copy the fixtures into test/fixtures/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/../.."
source .device/env.sh
OUT=${OUT:-/tmp/dqlora-features}
mkdir -p "$OUT"
LOG=$OUT/log.txt
T0=$(date +%s)
stamp() { echo "== $1 (t+$(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
stamp "python fixtures"
CUDA_VISIBLE_DEVICES= timeout 150 python3 test/reference/make_noquant_golden.py --noquant test/fixtures/golden-noquant 2>&1 | tail -30 | tee -a "$LOG"
mkdir -p "$OUT/noquant"
for c in test/fixtures/golden-noquant/*/; do n=$(basename "$c"); [ -f "$c/expected.json" ] && mkdir -p "$OUT/noquant/$n" && cp "$c/expected.json" "$OUT/noquant/$n/"; done
stamp "PEFT loads the DoRA adapter dqlora saved"
(cd test/fixtures/golden/llama-gqa && OUT=$OUT/dora-ours CUDA_VISIBLE_DEVICES= timeout 120 python3 ../../../reference/check_peft_loads_dora.py) 2>&1 | tail -5 | tee -a "$LOG"
stamp "build cuda addon"
DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} timeout 150 node core/engine/cuda/build.mjs 2>&1 | tail -5 | tee -a "$LOG"
export DQLORA_CUDA_ADDON=$PWD/core/engine/cuda/build/dqlora_cuda.node
stamp "cuda feature tests"
DQLORA_ROOT=$PWD timeout 120 node --test --test-reporter=spec .device/cuda-features.test.mjs 2>&1 | tail -60 | tee -a "$LOG"
DQLORA_ATTN=v1 DQLORA_ROOT=$PWD timeout 60 node --test --test-reporter=spec --test-name-pattern="packed attention" .device/cuda-features.test.mjs 2>&1 | tail -15 | sed 's/^/[attention v1] /' | tee -a "$LOG"
stamp "packing benchmark (cuda)"
DQLORA_ROOT=$PWD timeout 60 node .device/packing-bench.mjs --backend cuda --steps 10 --mbs 8,32 2>/dev/null | tee -a "$LOG" | tee "$OUT/packing-cuda.md"
stamp done
