#!/usr/bin/env bash
# Run HERE before the device call of bench/gpu/features.sh: node + Node-API headers + node-addon-api headers into
# .device/ (git-ignored), and esbuild bundles of the two entry points (node_modules does not travel). Works in a git
# worktree (where ../shared/tools/device-pack cannot write .git/info). Then: run carry [".device"],
# command "bash bench/gpu/features.sh".
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
source bench/gpu/pack-common.sh
pack_node
pack_addon_headers
bundle test/engine/cuda-features.test.ts .device/cuda-features.test.mjs
bundle bench/packing.ts .device/packing-bench.mjs
du -sh .device
