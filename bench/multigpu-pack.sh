#!/usr/bin/env bash
# Run HERE before the device call of bench/multigpu.sh: packs into .device/ (git-ignored) the node binary and
# headers (pack_node), esbuild bundles of bench/multigpu.ts, bench/allreduce.ts and the worker CLI (node_modules is
# too big to carry), the nats-server binary (for replicas > 1) and the example tokenizer, and builds the CUDA addon
# here (same nvcc 13.0 as the GPU machine). Then: run tool, carry [".device", "core/engine/cuda/build"],
# command "bash bench/multigpu.sh".
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
source bench/gpu/pack-common.sh
pack_node # (what ../shared/tools/device-pack does, also in a git worktree)
bundle bench/multigpu.ts .device/multigpu.mjs
bundle worker/cli.ts .device/worker.mjs
bundle worker/runtime/compute-main.ts .device/compute.mjs
bundle worker/transport/thread-main.ts .device/transport-thread.mjs
# The all-reduce's threads: the bundles above (worker, allreduce bench) start .device/allreduce-thread.mjs, next to them.
bundle worker/allreduce-main.ts .device/allreduce-thread.mjs
# the transport and all-reduce micro-benchmarks, for the same device call: node .device/transport.mjs, .device/allreduce.mjs
bundle bench/transport.ts .device/transport.mjs
# the cuda op tests (bench/gpu/distributed-all.sh runs them first)
bundle test/engine/cuda-ops.test.ts .device/cuda-ops.test.mjs
bundle bench/allreduce.ts .device/allreduce.mjs
# The bundles resolve a few package files at load time (the status page's uPlot): give them a node_modules there.
mkdir -p .device/node_modules && rm -rf .device/node_modules/uplot && cp -r node_modules/uplot .device/node_modules/
mkdir -p .device/bin .device/tok
cp "$(command -v nats-server)" .device/bin/
node --import tsx -e "import('./coordinator/example/assets.ts').then((m) => console.log(m.ensureExampleAssets().modelDir))" >/dev/null
cp examples-cache/example-v1/model/tokenizer.json examples-cache/example-v1/model/tokenizer_config.json examples-cache/example-v1/model/special_tokens_map.json .device/tok/
[ -f core/engine/cuda/build/dqlora_cuda.node ] || build_cuda_here
du -sh .device
