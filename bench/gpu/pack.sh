#!/usr/bin/env bash
# Run HERE (no GPU), before the device call: packs what bench/gpu.sh needs on the GPU machine into .device/
# (git-ignored): node + Node-API headers (../shared/tools/device-pack), the node-addon-api headers, and one
# esbuild bundle per entry point (node_modules is too big to carry). Then call the device `run` tool with
#   carry: [".device"]   command: bash bench/gpu.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
../shared/tools/device-pack >/dev/null
mkdir -p .device/node-addon-api
cp node_modules/node-addon-api/napi.h node_modules/node-addon-api/napi-inl.h node_modules/node-addon-api/napi-inl.deprecated.h .device/node-addon-api/
bundle() {
  node_modules/.bin/esbuild "$1" --bundle --platform=node --format=esm --target=node20 --log-level=warning \
    --external:'*.node' --outfile="$2" \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);"
}
bundle test/engine/cuda-ops.test.ts .device/cuda-ops.test.mjs
bundle bench/gpu/cuda-bench.ts .device/cuda-bench.mjs
# The full-model comparison (worker/model) is bundled here once it exists: bench/gpu/model-bench.ts.
if [ -f bench/gpu/model-bench.ts ]; then bundle bench/gpu/model-bench.ts .device/model-bench.mjs; fi
du -sh .device
