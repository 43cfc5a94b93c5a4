#!/usr/bin/env node
// Builds the CUDA backend addon core/engine/cuda/build/dqlora_cuda.node with nvcc (called at `npm ci` by
// scripts/build-native.mjs, and by bench/gpu.sh on the GPU machine). Never fails the install: a missing nvcc
// or a failed build prints one line and exits 0 (the cuda backend then reports itself unavailable).
//
// - Sources (src/*.cu, src/*.cpp) compile in parallel, one nvcc per file, then link into one shared object.
// - cuBLASLt is not linked: the addon dlopens it at init (see src/gemm.cpp), so this builds where only nvcc and
//   the CUDA runtime exist (CI, the developer machines). The CUDA runtime is linked statically (nvcc default),
//   so loading the addon on a machine without a GPU or driver works and reports "no device" instead of failing.
// - Targets: sm_80 and sm_90 machine code + compute_90 PTX; DQLORA_CUDA_ARCHS="90" (comma list) overrides.
// - A content hash of sources + flags is kept in build/stamp.txt: an unchanged tree is not rebuilt (a build
//   carried to another machine is reused as is).
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, realpathSync, writeFileSync, appendFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..', '..');
const srcDir = join(here, 'src');
const buildDir = join(here, 'build');
const objDir = join(buildDir, 'obj');
const out = join(buildDir, 'dqlora_cuda.node');
const logFile = join(buildDir, 'build.log');

function say(line) { console.log(`dqlora: ${line}`); }

function findNvcc() {
  const r = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' });
  if (r.status === 0 && r.stdout.trim()) return r.stdout.trim();
  for (const p of ['/usr/local/cuda/bin/nvcc', '/usr/local/bin/nvcc']) if (existsSync(p)) return p;
  return null;
}

function findNodeHeaders() {
  const cands = [process.env.NAPI_INCLUDE, join(dirname(realpathSync(process.execPath)), '..', 'include', 'node'), '/usr/include/node'];
  return cands.find((d) => d && existsSync(join(d, 'node_api.h'))) ?? null;
}

function findAddonApi() {
  const cands = [process.env.NODE_ADDON_API_INCLUDE, join(root, '.device', 'node-addon-api')];
  try {
    cands.push(dirname(createRequire(import.meta.url).resolve('node-addon-api/package.json')));
  } catch { /* not installed */ }
  return cands.find((d) => d && existsSync(join(d, 'napi.h'))) ?? null;
}

function run(cmd, args) {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    p.stdout.on('data', (d) => { text += d; });
    p.stderr.on('data', (d) => { text += d; });
    p.on('error', (e) => resolve({ ok: false, text: String(e) }));
    p.on('close', (code) => resolve({ ok: code === 0, text }));
  });
}

async function main() {
  const nvcc = findNvcc();
  if (!nvcc) { say('nvcc not found, CUDA backend not built'); return; }
  const napi = findNodeHeaders();
  if (!napi) { say('Node-API headers (node_api.h) not found, CUDA backend not built (set NAPI_INCLUDE)'); return; }
  const addonApi = findAddonApi();
  if (!addonApi) { say('node-addon-api headers not found, CUDA backend not built (set NODE_ADDON_API_INCLUDE)'); return; }

  const archs = (process.env.DQLORA_CUDA_ARCHS ?? '80,90').split(',').map((s) => s.trim()).filter(Boolean);
  const gencode = archs.flatMap((a) => ['-gencode', `arch=compute_${a},code=sm_${a}`]);
  const last = archs[archs.length - 1];
  gencode.push('-gencode', `arch=compute_${last},code=compute_${last}`); // PTX for newer GPUs
  const common = ['-std=c++17', '-O3', '-Xcompiler', '-fPIC', '-Xcompiler', '-fvisibility=hidden', `-I${srcDir}`];

  const sources = readdirSync(srcDir).filter((f) => /\.(cu|cpp)$/.test(f)).sort();
  const hash = createHash('sha256');
  hash.update(JSON.stringify({ archs, common, nvcc: spawnSync(nvcc, ['--version'], { encoding: 'utf8' }).stdout }));
  for (const f of readdirSync(srcDir).sort()) hash.update(f).update(readFileSync(join(srcDir, f)));
  hash.update(readFileSync(fileURLToPath(import.meta.url)));
  const digest = hash.digest('hex');
  const stampFile = join(buildDir, 'stamp.txt');
  if (existsSync(out) && existsSync(stampFile) && readFileSync(stampFile, 'utf8').trim() === digest) {
    say(`CUDA backend up to date (${out})`);
    return;
  }
  mkdirSync(objDir, { recursive: true });
  writeFileSync(logFile, `nvcc ${nvcc}\narchs ${archs.join(',')}\n`);

  const t0 = Date.now();
  const jobs = sources.map((f) => {
    const obj = join(objDir, f.replace(/\.(cu|cpp)$/, '.o'));
    const args = [...common, '-c', join(srcDir, f), '-o', obj];
    if (f.endsWith('.cu')) args.push(...gencode);
    else args.push(`-I${napi}`, `-I${addonApi}`);
    return { f, obj, args };
  });
  // Longest compiles first (attention), at most availableParallelism() at once.
  jobs.sort((a, b) => (b.f.startsWith('attention') ? 1 : 0) - (a.f.startsWith('attention') ? 1 : 0));
  const width = Math.max(1, Math.min(jobs.length, availableParallelism()));
  let next = 0;
  const failures = [];
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < jobs.length) {
      const j = jobs[next++];
      const r = await run(nvcc, j.args);
      appendFileSync(logFile, `$ nvcc ${j.args.join(' ')}\n${r.text}\n`);
      if (!r.ok) failures.push({ f: j.f, text: r.text });
    }
  }));
  if (failures.length === 0) {
    const r = await run(nvcc, ['-shared', '-o', out, ...jobs.map((j) => j.obj), '-ldl', '-lpthread']);
    appendFileSync(logFile, `$ link\n${r.text}\n`);
    if (!r.ok) failures.push({ f: 'link', text: r.text });
  }
  if (failures.length > 0) {
    const first = failures[0].text.split('\n').find((l) => /error/i.test(l)) ?? failures[0].text.split('\n')[0];
    say(`CUDA backend build failed in ${failures[0].f}: ${first.trim().slice(0, 300)} (full log: ${logFile})`);
    return;
  }
  writeFileSync(stampFile, digest + '\n');
  say(`CUDA backend built in ${((Date.now() - t0) / 1000).toFixed(0)} s for sm_${archs.join(', sm_')} (${out})`);
}

main().catch((e) => { say(`CUDA backend build failed: ${String(e?.message ?? e).split('\n')[0]}`); });
