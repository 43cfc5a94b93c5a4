#!/usr/bin/env bash
# Run HERE before the device call of bench/gpu/oom-demo.sh (issue 13, OOM-safe micro-batches): node + Node-API
# headers into .device/ (git-ignored), esbuild bundles of the two entry points (node_modules does not travel), and a
# local build of the cuda addon when nvcc is here (same nvcc 13 as the GPU machine; the script builds there when the
# carried one does not load). Works in a git worktree. Then call the device `run` tool with
#   carry: [".device", "core/engine/cuda/build"]   command: bash bench/gpu/oom-demo.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
source bench/gpu/pack-common.sh
pack_node
pack_addon_headers
bundle test/engine/cuda-oom.test.ts .device/cuda-oom.test.mjs
bundle bench/oom-demo.ts .device/oom-demo.mjs
build_cuda_here
du -sh .device core/engine/cuda/build
