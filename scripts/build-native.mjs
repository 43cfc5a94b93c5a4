#!/usr/bin/env node
// Runs at `npm ci` / `npm install` (package.json "install" script). Builds the optional native addons:
//   core/engine/cpu-native  — C++ CPU kernels (g++), speeds up the cpu backend; the pure TS path is used without it
//   core/engine/cuda        — the CUDA backend (nvcc + cuBLAS), only where nvcc exists
// Each addon has its own build.mjs. A failed or skipped build prints one line and never fails the install.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (process.env.DQLORA_SKIP_NATIVE === '1') {
  console.log('dqlora: DQLORA_SKIP_NATIVE=1, native addons not built (pure TypeScript cpu backend only)');
  process.exit(0);
}
for (const addon of ['core/engine/cpu-native', 'core/engine/cuda']) {
  const script = join(root, addon, 'build.mjs');
  if (!existsSync(script)) continue;
  const r = spawnSync(process.execPath, [script], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) console.log(`dqlora: ${addon} was not built (exit ${r.status}); continuing without it`);
}
