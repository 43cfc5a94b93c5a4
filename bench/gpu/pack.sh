#!/usr/bin/env bash
# Run HERE (no GPU), before the device call: packs what bench/gpu.sh needs on the GPU machine into .device/
# (git-ignored): node + Node-API headers (../shared/tools/device-pack), the node-addon-api headers, and one
# esbuild bundle per entry point (node_modules is too big to carry). Then call the device `run` tool with
#   carry: [".device"]   command: bash bench/gpu.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
../shared/tools/device-pack >/dev/null
source bench/gpu/pack-common.sh
pack_addon_headers
bundle test/engine/cuda-ops.test.ts .device/cuda-ops.test.mjs
bundle test/model/cuda-golden.test.ts .device/cuda-golden.test.mjs
bundle test/model/cuda-train.test.ts .device/cuda-train.test.mjs
bundle test/model/cuda-chatglm.test.ts .device/cuda-chatglm.test.mjs
bundle bench/gpu/cuda-bench.ts .device/cuda-bench.mjs
bundle bench/gpu/model-bench.ts .device/model-bench.mjs
# A local build (same nvcc 13.0 as the GPU machine, CUDA runtime linked statically) saves the device a minute:
# carry core/engine/cuda/build too and run with BENCH_PREBUILT=1 (gpu.sh builds there if it does not load).
build_cuda_here
du -sh .device
