# Sourced (from the repository root) by the scripts that pack a device call: bench/gpu/pack*.sh,
# bench/multigpu-pack.sh. node_modules does not travel, so entry points go as esbuild bundles; .device/ is git-ignored.

# node (xz) + Node-API headers + a .device/env.sh that unpacks and puts them on PATH there. Unlike
# ../shared/tools/device-pack this works in a git worktree (it writes nothing under .git).
pack_node() {
  mkdir -p .device/include
  local node_bin hdr
  node_bin=$(readlink -f "$(command -v node)")
  [ -s .device/node.xz ] && [ .device/node.xz -nt "$node_bin" ] || xz -T0 -6 -c "$node_bin" > .device/node.xz
  hdr=$(dirname "$node_bin")/../include/node; [ -f "$hdr/node_api.h" ] || hdr=/usr/include/node
  cp "$hdr"/node_api.h "$hdr"/node_api_types.h "$hdr"/js_native_api.h "$hdr"/js_native_api_types.h .device/include/
  cat > .device/env.sh <<'EOS'
_dev=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/node/bin
[ -x /tmp/node/bin/node ] || { xz -dc "$_dev/node.xz" > /tmp/node/bin/node && chmod +x /tmp/node/bin/node; }
export PATH=/tmp/node/bin:$PATH
export NAPI_INCLUDE=$_dev/include
echo "device env: node $(node --version), GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
EOS
}

# The node-addon-api headers, for building the cuda addon there.
pack_addon_headers() {
  mkdir -p .device/node-addon-api
  cp node_modules/node-addon-api/napi.h node_modules/node-addon-api/napi-inl.h node_modules/node-addon-api/napi-inl.deprecated.h .device/node-addon-api/
}

# bundle ENTRY.ts OUT.mjs: one ESM file for node 20, native addons left external.
bundle() {
  node_modules/.bin/esbuild "$1" --bundle --platform=node --format=esm --target=node20 --log-level=warning \
    --external:'*.node' --outfile="$2" \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);"
}

# A local build of the cuda addon (same nvcc 13 as the GPU machine, runtime linked statically) where nvcc is here:
# carried as core/engine/cuda/build, it saves the device a build.
build_cuda_here() {
  if command -v nvcc >/dev/null; then
    NAPI_INCLUDE=${NAPI_INCLUDE:-$PWD/.device/include} DQLORA_CUDA_ARCHS=${DQLORA_CUDA_ARCHS:-90} node core/engine/cuda/build.mjs
  fi
}
