#!/usr/bin/env bash
# Issue 9 in one device call (under 600 s on an H100): the cuda op tests, then on the GPU machine's host the transport and
# all-reduce micro-benchmarks, then bench/multigpu.sh under CUDA MPS. Writes everything under $OUT.
#   here: bash bench/multigpu-pack.sh ; device: carry [".device", "core/engine/cuda/build/dqlora_cuda.node"],
#   command "bash bench/gpu/distributed-all.sh"
set -u
cd "$(dirname "$0")/../.."
source .device/env.sh
export PATH=$PWD/.device/bin:$PATH
export DQLORA_CUDA_ADDON=$PWD/core/engine/cuda/build/dqlora_cuda.node
R=${OUT:-/tmp/dqlora-issue9}; mkdir -p "$R"
nproc; uptime
timeout 150 node --test --test-reporter=spec .device/cuda-ops.test.mjs > "$R/cuda-ops.txt" 2>&1; grep -E "^# (tests|pass|fail)|✖" "$R/cuda-ops.txt" | head -12
timeout 90 node .device/transport.mjs --reps 5 --sizes 16,64 --inflight 1 > "$R/transport.txt" 2>&1; tail -4 "$R/transport.txt"
timeout 150 node .device/allreduce.mjs --sizes 4,16,64 --ranks 2,4 --reps 5 --impl thread,inline > "$R/allreduce.txt" 2>&1; tail -16 "$R/allreduce.txt"
OUT=$R/multigpu MG_MPS=1 MG_STEPS=6 MG_TIMEOUT=250 bash bench/multigpu.sh > "$R/multigpu.log" 2>&1; grep -A8 '^| layout' "$R/multigpu.log"; grep '^- ' "$R/multigpu.log"
