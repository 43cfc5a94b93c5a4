#!/usr/bin/env node
// Builds the optional cpu kernels addon into core/engine/cpu-native/build/dqlora_cpu.node with one g++ call
// (no node-gyp: works offline, using the headers of the node that runs this script). Never fails the install:
// on any problem it prints one line and exits 0, and the cpu backend uses its TypeScript kernels.
//
// No -march=native: the binary must run on any x86-64. The AVX-512 / AVX2 kernels carry per-function target
// attributes and are chosen at load time. -ffp-contract=off keeps the compiler from fusing a·b + c on its own,
// so the arithmetic is exactly what the source says (and the AVX-512 / AVX2 / baseline copies of the elementwise
// kernels give the same bits); -fno-math-errno lets sqrt vectorise (nothing reads errno). Env: CXX (compiler), DQLORA_SKIP_NATIVE=1 (skip).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');
const out = join(here, 'build', 'dqlora_cpu.node');
const say = (msg) => { console.log(`dqlora: cpu-native: ${msg}`); process.exit(0); };

if (process.env.DQLORA_SKIP_NATIVE === '1') say('skipped (DQLORA_SKIP_NATIVE=1)');
if (process.platform !== 'linux' && process.platform !== 'darwin') say(`not built on ${process.platform}; using TypeScript kernels`);

// node_api.h: beside this node binary (official tarballs, distro packages), else node-gyp's header cache.
const prefix = dirname(dirname(process.execPath));
const candidates = [
  join(prefix, 'include', 'node'),
  '/usr/include/node',
  '/usr/local/include/node',
  join(process.env.HOME ?? '', '.cache', 'node-gyp', process.versions.node, 'include', 'node'),
];
const nodeInc = candidates.find((d) => existsSync(join(d, 'node_api.h')));
if (!nodeInc) say('node headers (node_api.h) not found; using TypeScript kernels');

let addonInc;
try {
  addonInc = dirname(createRequire(join(root, 'package.json')).resolve('node-addon-api/package.json'));
} catch {
  say('node-addon-api is not installed; using TypeScript kernels');
}

const src = join(here, 'src');
const sources = readdirSync(src).map((f) => join(src, f));
const newest = Math.max(...sources.map((f) => statSync(f).mtimeMs), statSync(fileURLToPath(import.meta.url)).mtimeMs);
if (existsSync(out) && statSync(out).mtimeMs > newest && !process.argv.includes('--force')) say('up to date');

mkdirSync(dirname(out), { recursive: true });
const cxx = process.env.CXX ?? 'g++';
// Built beside the target and renamed over it: a process loading the addon meanwhile sees the old or the new file, never half of one.
const tmp = `${out}.${process.pid}.tmp`;
const args = [
  '-O3', '-std=c++17', '-shared', '-fPIC', '-pthread', '-fvisibility=hidden', '-ffp-contract=off', '-fno-math-errno',
  '-DNAPI_VERSION=8', '-DNAPI_CPP_EXCEPTIONS', '-DNODE_ADDON_API_DISABLE_DEPRECATED',
  `-I${nodeInc}`, `-I${addonInc}`, join(src, 'addon.cc'), '-o', tmp,
];
if (process.platform === 'darwin') args.push('-undefined', 'dynamic_lookup');
const t0 = Date.now();
const r = spawnSync(cxx, args, { encoding: 'utf8' });
if (r.error || r.status !== 0) {
  const why = r.error ? r.error.message : (r.stderr || '').split('\n').find((l) => l.includes('error')) ?? `exit ${r.status}`;
  rmSync(tmp, { force: true });
  rmSync(out, { force: true }); // never leave a stale binary built from older sources
  say(`build failed (${why.trim()}); using TypeScript kernels`);
}
renameSync(tmp, out);
say(`built ${out} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
