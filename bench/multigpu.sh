#!/usr/bin/env bash
# Issue 5 on the GPU machine, one device call: writes a TinyLlama-1.1B-shaped random checkpoint (PyTorch), then runs
# bench/multigpu.ts — the same QLoRA job on 1×1 / 2×1 / 1×2 / 2×2 layouts of local worker processes, one worker per
# GPU round-robin (on a one-GPU machine they share it: the multi-process GPU path, not scaling).
#   here: bash bench/multigpu-pack.sh ; device: carry [".device", "core/engine/cuda/build"], "bash bench/multigpu.sh"
# Environment: MG_LAYOUTS (default 1x1,2x1,1x2,2x2), MG_STEPS (6), MG_SEQ (1024), MG_GBS (16), MG_MICRO (4).
set -uo pipefail
cd "$(dirname "$0")/.."
source .device/env.sh
OUT=${OUT:-/tmp/dqlora-mgpu}
mkdir -p "$OUT"
export PATH=$PWD/.device/bin:$PATH
export DQLORA_CUDA_ADDON=$PWD/core/engine/cuda/build/dqlora_cuda.node
# MG_BUNDLES: the directory of the bundles (default .device; e.g. a baseline build packed beside it for an A/B call)
B=${MG_BUNDLES:-$PWD/.device}
export DQLORA_WORKER_ENTRY=$B/worker.mjs
export DQLORA_COMPUTE_ENTRY=$B/compute.mjs
export DQLORA_TRANSPORT_ENTRY=$B/transport-thread.mjs
export DQLORA_ALLREDUCE_ENTRY=$B/allreduce-thread.mjs
export DQLORA_LOG_LEVEL=${DQLORA_LOG_LEVEL:-warn}
nvidia-smi -L | tee "$OUT/log.txt"
node -e 'const a=require(process.env.DQLORA_CUDA_ADDON); console.log("cuda devices:", a.deviceCount().count)' 2>&1 | tee -a "$OUT/log.txt"
# MG_MPS=1: run the layouts under CUDA MPS (processes sharing a GPU then run kernels concurrently), when the
# control daemon exists on the machine; the log says whether it ran.
if [ "${MG_MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "CUDA MPS: started" | tee -a "$OUT/log.txt"
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
else
  echo "CUDA MPS: not used (MG_MPS=${MG_MPS:-0}; control daemon $(command -v nvidia-cuda-mps-control || echo absent))" | tee -a "$OUT/log.txt"
fi
MODEL=/tmp/dqlora-mgpu-model
# (written once per machine: a second run in the same call reuses it)
[ -f "$MODEL/config.json" ] || PYTHONUNBUFFERED=1 timeout 200 python3 bench/gpu/torch_bench.py --save "$MODEL" --no-train --seq "${MG_SEQ:-1024}" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
MG=$B/multigpu.mjs; [ -f "$MG" ] || MG=$PWD/.device/multigpu.mjs
timeout ${MG_TIMEOUT:-420} node "$MG" --model "$MODEL" --tokenizer .device/tok --out "$OUT/run" \
  --layouts "${MG_LAYOUTS:-1x1,2x1,1x2,2x2}" --steps "${MG_STEPS:-6}" --seq "${MG_SEQ:-1024}" --global-batch "${MG_GBS:-16}" --micro "${MG_MICRO:-4}" --backend cuda \
  2>&1 | tee -a "$OUT/log.txt"
cp "$OUT/run/multigpu.md" "$OUT/run"/timeline-*.json "$OUT/" 2>/dev/null
rm -rf "$OUT/run"
