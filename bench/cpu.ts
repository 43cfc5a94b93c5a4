// `npm run bench`: the CPU backend's numbers, as markdown tables.
//   1. QLoRA training tokens/s on the example model's shape (d256 × 4 layers, GQA 8/4, ff 704, V 2048) at
//      batch 8 × seq 256, with and without gradient checkpointing — and PyTorch on the same shape in the same run
//      (bench/torch_baseline.py with Debian's python3-torch, 2 threads, fp32, dense base weights) when available.
//   2. Forward / backward time per decoder layer.
//   3. Op-level numbers from bench/cpu-ops.ts (matmul GFLOP/s vs peak, NF4 throughput, attention).
// Usage: npm run bench [-- --quick]   (results are recorded by hand in bench/RESULTS.md with date and machine)
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCpuBackend } from '../core/engine/cpu.ts';
import { loadStage } from '../core/model/loader.ts';
import { fullModelSpec, type LlamaStage } from '../core/model/llama.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { writeRandomLlama, EXAMPLE_SHAPE } from '../coordinator/example/model.ts';
import { Trainer } from '../core/train/trainer.ts';
import { CounterRng } from '../common/rng.ts';
import type { Example } from '../coordinator/data/tokenize.ts';
import type { Backend } from '../core/engine/backend.ts';

const quick = process.argv.includes('--quick');
const B = 8, T = 256, V = 2048, STEPS = quick ? 2 : 4;

function randomExamples(n: number, len: number, vocab: number): Example[] {
  const rng = new CounterRng(5, 6);
  return Array.from({ length: n }, (_, i) => {
    const ids = Int32Array.from({ length: len }, () => rng.int(vocab));
    return { inputIds: ids, labels: ids.slice(), sourceIndex: i };
  });
}

function trainTokensPerSecond(be: Backend, dir: string, checkpointing: boolean): number {
  const cfg = loadModelConfig(dir);
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: { r: 16, alpha: 32, dropout: 0, useRslora: false, targetModules: 'all-linear' }, seed: 1, gradientCheckpointing: checkpointing });
  const data = randomExamples(B * (STEPS + 1), T, V);
  const tr = new Trainer(be, [stage], data, { epochs: 1, microBatchSize: B, gradAccum: 1, replicas: 1, lr: 1e-4, schedule: 'constant', warmupSteps: 0, weightDecay: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1, seed: 1, padId: 0 }, { configHash: '', dataHash: '' });
  tr.step(); // warm-up
  const t0 = performance.now();
  let tokens = 0;
  for (let i = 0; i < STEPS; i++) tokens += tr.step().tokens;
  return tokens / ((performance.now() - t0) / 1000);
}

function layerTimes(be: Backend, stage: LlamaStage): { fwd: number; bwd: number } {
  // One layer's share: time the whole stage forward (no grad) and forward+backward, divide by layers.
  const ex = randomExamples(B, T, V);
  const ids = new Int32Array(B * T), keyMask = new Int32Array(B * T).fill(1), positions = new Int32Array(B * T), targets = new Int32Array(B * T);
  ex.forEach((e, b) => { ids.set(e.inputIds, b * T); for (let t = 0; t < T; t++) { positions[b * T + t] = t; targets[b * T + t] = t + 1 < T ? e.inputIds[t + 1] : -100; } });
  const batch = { B, T, ids, keyMask, positions, targets, sampleIds: Int32Array.from({ length: B }, (_, i) => i) };
  const L = stage.cfg.numLayers;
  stage.forward(0, batch, undefined, { train: false });
  let t0 = performance.now();
  stage.forward(0, batch, undefined, { train: false });
  const fwd = (performance.now() - t0) / L;
  t0 = performance.now();
  stage.forward(1, batch, undefined, { train: true, gradScale: 1e-4 });
  const tf = performance.now();
  stage.backward(1);
  const bwd = (performance.now() - tf) / L;
  void be;
  return { fwd, bwd };
}

function torchBaseline(checkpointing: boolean): { tps: number; version: string } | string {
  const py = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
  const r = spawnSync(py, [join(import.meta.dirname, 'torch_baseline.py'), '--hidden', '256', '--layers', '4', '--heads', '8', '--kv-heads', '4', '--ff', '704', '--vocab', String(V), '--batch', String(B), '--seq', String(T), '--rank', '16', '--steps', String(STEPS), '--threads', '2', ...(checkpointing ? ['--checkpointing'] : [])], { encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) return `not measured (${(r.stderr || r.error?.message || '').trim().split('\n').at(-1)}; install python3-torch)`;
  const j = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { tokens_per_second: number; torch: string };
  return { tps: j.tokens_per_second, version: j.torch };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-bench-'));
  writeRandomLlama(dir, { ...EXAMPLE_SHAPE, vocabSize: V, tieWordEmbeddings: true }, 1);
  const be = createCpuBackend();
  const out: string[] = [];
  out.push(`## CPU backend — ${new Date().toISOString().slice(0, 10)}, ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}, native kernels: ${be.native ? "yes" : "no (pure TS)"}`);
  out.push('', `### QLoRA training throughput: Llama d256 × 4 layers (GQA 8/4, ff 704, V ${V}, tied), batch ${B} × seq ${T}, LoRA r=16 all-linear`, '');
  out.push('| engine | gradient checkpointing | tokens/s | vs PyTorch |', '|---|---|---|---|');
  for (const ck of [true, false]) {
    const ours = trainTokensPerSecond(be, dir, ck);
    const tb = torchBaseline(ck);
    if (typeof tb === 'string') {
      out.push(`| dqlora cpu (NF4 base) | ${ck ? 'on' : 'off'} | ${ours.toFixed(0)} | — |`, `| PyTorch (dense fp32 base) | ${ck ? 'on' : 'off'} | ${tb} | |`);
    } else {
      out.push(`| dqlora cpu (NF4 base) | ${ck ? 'on' : 'off'} | ${ours.toFixed(0)} | ${(ours / tb.tps).toFixed(2)}× |`, `| PyTorch ${tb.version} (dense fp32 base, OpenBLAS, 2 threads) | ${ck ? 'on' : 'off'} | ${tb.tps.toFixed(0)} | 1.00× |`);
    }
  }
  const stage = loadStage(be, dir, fullModelSpec(loadModelConfig(dir)), { lora: { r: 16, alpha: 32, dropout: 0, useRslora: false, targetModules: 'all-linear' }, seed: 1 });
  const lt = layerTimes(be, stage);
  out.push('', `### Per decoder layer (${B}×${T} tokens; backward includes the checkpointing recompute and the head's share is excluded)`, '');
  out.push('| forward ms | backward ms |', '|---|---|', `| ${lt.fwd.toFixed(1)} | ${lt.bwd.toFixed(1)} |`);
  const opsPath = join(import.meta.dirname, 'cpu-ops.ts');
  if (existsSync(opsPath)) {
    const mod = await import('./cpu-ops.ts') as { runCpuOpsBench?: () => Promise<string> };
    if (mod.runCpuOpsBench) out.push('', await mod.runCpuOpsBench());
  }
  process.stdout.write(out.join('\n') + '\n');
}

await main();
