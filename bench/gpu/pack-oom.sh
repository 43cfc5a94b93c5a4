#!/usr/bin/env bash
# Run HERE before the device call of bench/gpu/oom-demo.sh (issue 13, OOM-safe micro-batches): node + Node-API
# headers into .device/ (git-ignored), esbuild bundles of the two entry points (node_modules does not travel), and a
# local build of the cuda addon when nvcc is here (same nvcc 13 as the GPU machine; the script builds there when the
# carried one does not load). Works in a git worktree. Then call the device `run` tool with
#   carry: [".device", "core/engine/cuda/build"]   command: bash bench/gpu/oom-demo.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .device/include .device/node-addon-api
node_bin=$(readlink -f "$(command -v node)")
[ -s .device/node.xz ] && [ .device/node.xz -nt "$node_bin" ] || xz -T0 -6 -c "$node_bin" > .device/node.xz
hdr=$(dirname "$node_bin")/../include/node; [ -f "$hdr/node_api.h" ] || hdr=/usr/include/node
cp "$hdr"/node_api.h "$hdr"/node_api_types.h "$hdr"/js_native_api.h "$hdr"/js_native_api_types.h .device/include/
cp node_modules/node-addon-api/napi.h node_modules/node-addon-api/napi-inl.h node_modules/node-addon-api/napi-inl.deprecated.h .device/node-addon-api/
cat > .device/env.sh <<'EOS'
_dev=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/node/bin
[ -x /tmp/node/bin/node ] || { xz -dc "$_dev/node.xz" > /tmp/node/bin/node && chmod +x /tmp/node/bin/node; }
export PATH=/tmp/node/bin:$PATH
export NAPI_INCLUDE=$_dev/include
echo "device env: node $(node --version), GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
EOS
bundle() {
  node_modules/.bin/esbuild "$1" --bundle --platform=node --format=esm --target=node20 --log-level=warning \
    --external:'*.node' --outfile="$2" \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);"
}
bundle test/engine/cuda-oom.test.ts .device/cuda-oom.test.mjs
bundle bench/oom-demo.ts .device/oom-demo.mjs
if command -v nvcc >/dev/null; then
  NAPI_INCLUDE=${NAPI_INCLUDE:-$PWD/.device/include} DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} node core/engine/cuda/build.mjs
fi
du -sh .device core/engine/cuda/build
