// Full-model QLoRA training benchmark on the cuda backend (run by bench/gpu.sh on the GPU machine): a real
// Hugging Face checkpoint (written by torch_bench.py --save, the same weights PyTorch trains) loaded through
// core/model/loader.ts (NF4 + double quant on the GPU), trained by core/train/trainer.ts's Trainer: LoRA r16 α32
// on all 7 linears, AdamW, grad-norm clipping 1.0, constant lr. Each run = (gradient checkpointing, batch) at one
// sequence length; the stage weights are loaded once and shared by the runs.
//
// Usage: node model-bench.mjs --model DIR --runs 1x32,0x32 [--seq 1024] [--steps 3] [--label name] [--json out.json]
//   --runs: comma list of <checkpointing 0|1>x<batch>.
// Per run: median step time → tokens/s, MFU against the bf16 GEMM rate measured here, pool peak (live and
// reserved) and device memory in use (cudaMemGetInfo), the losses, whether memory in use stayed flat.

import { writeFileSync } from 'node:fs';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadStageWeights } from '../../core/model/loader.ts';
import { LlamaStage, fullModelSpec, type LoraConfig } from '../../core/model/llama.ts';
import { Trainer, type TrainSettings } from '../../core/train/trainer.ts';
import type { Example } from '../../coordinator/data/tokenize.ts';

function opt(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : undefined;
}
const modelDir = opt('model');
if (!modelDir) throw new Error('model-bench: --model DIR is required');
const T = Number(opt('seq') ?? 1024), steps = Number(opt('steps') ?? 3), label = opt('label') ?? modelDir;
const runs = (opt('runs') ?? '1x8').split(',').map((s) => { const [c, b] = s.split('x').map(Number); return { ckpt: c === 1, batch: b }; });
const jsonPath = opt('json');
const GiB = 2 ** 30;
const log = (s: string): void => { process.stdout.write(`[model-bench ${label}] ${s}\n`); };

// --cpu: a dry run of this script on the cpu backend (tiny models only), to check it without a GPU.
const be: CudaBackend = process.argv.includes('--cpu') ? cpuStandIn() : createCudaBackend();
function cpuStandIn(): CudaBackend {
  const cpu = createCpuBackend();
  const stats = { inUse: 0, cached: 0, peakInUse: 0, reserved: 0, peakReserved: 0, liveBlocks: 0 };
  return Object.assign(cpu, {
    info: { name: 'cpu' }, synchronize: () => {}, trim: () => {}, resetPeak: () => {},
    poolStats: () => ({ ...stats, inUse: cpu.memoryInUse() }),
  }) as unknown as CudaBackend;
}
const res: Record<string, unknown> = { label, device: be.info, seq: T, steps };

// ---- bf16 GEMM ceiling through our cuBLASLt path (8192³, median of 10 after 3) ------------------------------
function timeMs(fn: () => void, reps: number, warm: number): number {
  for (let i = 0; i < warm; i++) fn();
  be.synchronize();
  const ts: number[] = [];
  for (let i = 0; i < reps; i++) { const t0 = performance.now(); fn(); be.synchronize(); ts.push(performance.now() - t0); }
  ts.sort((a, b) => a - b);
  return ts[ts.length >> 1];
}
{
  const n = process.argv.includes('--cpu') ? 256 : 8192;
  const x = new Float32Array(n * n);
  for (let i = 0; i < x.length; i++) x[i] = ((i * 2654435761) >>> 0) / 4294967296 - 0.5;
  const A = be.upload(x, [n, n], 'bf16'), B = be.upload(x, [n, n], 'bf16'), C = be.zeros([n, n], 'bf16');
  const ms = timeMs(() => { be.matmul(A, B, { out: C, transB: true }); }, 10, 3);
  res.gemmTflops = 2 * n ** 3 / (ms * 1e-3) / 1e12;
  for (const t of [A, B, C]) be.free(t);
  be.trim();
  log(`bf16 GEMM 8192³: ${(res.gemmTflops as number).toFixed(0)} TFLOP/s`);
}

// ---- attention alone at this model's shape (B8): the WMMA kernels (DQLORA_ATTN=v1) against the mma.sync ones ----
function attentionBench(c: { numHeads: number; numKvHeads: number; headDim: number }): Record<string, number> {
  const Bq = 8, Hq = c.numHeads, Hk = c.numKvHeads, D = c.headDim, n = Bq * T;
  const rnd = (len: number, seed: number): Float32Array => { const a = new Float32Array(len); let s = seed; for (let i = 0; i < len; i++) { s = (s * 1664525 + 1013904223) >>> 0; a[i] = s / 4294967296 - 0.5; } return a; };
  const q = be.upload(rnd(n * Hq * D, 1), [Bq, T, Hq, D], 'bf16'), k = be.upload(rnd(n * Hk * D, 2), [Bq, T, Hk, D], 'bf16');
  const v = be.upload(rnd(n * Hk * D, 3), [Bq, T, Hk, D], 'bf16'), dO = be.upload(rnd(n * Hq * D, 4), [Bq, T, Hq, D], 'bf16');
  const mask = be.upload(new Int32Array(n).fill(1), [Bq, T]);
  const flops = 4 * Bq * Hq * T * T * D / 2; // causal: half of the 2 products of 2·T·T·D each
  const out: Record<string, number> = {};
  const results: Record<string, Float32Array[]> = {};
  for (const ver of ['v1', 'v2']) {
    process.env.DQLORA_ATTN = ver;
    const f = timeMs(() => { const s = be.attention(q, k, v, mask, 1 / Math.sqrt(D)); be.free(s.out); be.free(s.lse); }, 5, 2);
    const s = be.attention(q, k, v, mask, 1 / Math.sqrt(D));
    const bw = timeMs(() => { const r = be.attentionBackward(dO, q, k, v, mask, s, 1 / Math.sqrt(D)); be.free(r.dq); be.free(r.dk); be.free(r.dv); }, 5, 2);
    const r = be.attentionBackward(dO, q, k, v, mask, s, 1 / Math.sqrt(D));
    results[ver] = [s.out, r.dq, r.dk, r.dv].map((x) => be.download(x) as Float32Array);
    for (const x of [s.out, s.lse, r.dq, r.dk, r.dv]) be.free(x);
    Object.assign(out, { [`${ver}FwdMs`]: f, [`${ver}BwdMs`]: bw, [`${ver}FwdTflops`]: flops / (f * 1e-3) / 1e12, [`${ver}BwdTflops`]: 2.5 * flops / (bw * 1e-3) / 1e12 });
    log(`attention ${ver} B${Bq} T${T} ${Hq}/${Hk}×${D}: fwd ${f.toFixed(3)} ms (${out[`${ver}FwdTflops`].toFixed(0)} TFLOP/s), bwd ${bw.toFixed(3)} ms (${out[`${ver}BwdTflops`].toFixed(0)} TFLOP/s)`);
  }
  delete process.env.DQLORA_ATTN;
  ['out', 'dq', 'dk', 'dv'].forEach((nm, i) => {
    const a = results.v1[i], b = results.v2[i];
    let num = 0, den = 0;
    for (let j = 0; j < a.length; j++) { num = Math.max(num, Math.abs(a[j] - b[j])); den = Math.max(den, Math.abs(a[j])); }
    out[`v2VsV1Err_${nm}`] = num / den;
  });
  log(`attention v2 vs v1 (max err / max): ${['out', 'dq', 'dk', 'dv'].map((nm) => `${nm} ${out[`v2VsV1Err_${nm}`].toExponential(2)}`).join(', ')}`);
  for (const x of [q, k, v, dO, mask]) be.free(x);
  be.trim();
  return out;
}

// ---- load -----------------------------------------------------------------------------------------------
const cfg = loadModelConfig(modelDir);
if (!process.argv.includes('--cpu') && !process.argv.includes('--no-attn')) res.attention = attentionBench(cfg);
const lora: LoraConfig = { r: 16, alpha: 32, dropout: 0, useRslora: false, targetModules: 'all-linear' };
const spec = fullModelSpec(cfg);
be.resetPeak();
const t0 = performance.now();
const w = ModelWeights.open(modelDir);
let lastPct = -1;
const weights = loadStageWeights(be, cfg, w, spec, {
  lora, seed: 1,
  onProgress: (d, n) => { const p = Math.floor((d / n) * 10); if (p !== lastPct) { lastPct = p; log(`loading ${d}/${n} (${((performance.now() - t0) / 1000).toFixed(1)} s)`); } },
});
w.close();
be.synchronize();
const loadS = (performance.now() - t0) / 1000;
const loadPeak = be.poolStats();
be.trim();
const weightsBytes = be.memoryInUse();
const H = cfg.hiddenSize, I = cfg.intermediateSize, L = cfg.numLayers, V = cfg.vocabSize, Hq = cfg.numHeads, Hk = cfg.numKvHeads, D = cfg.headDim;
const layerParams = H * Hq * D * 2 + 2 * H * Hk * D + 3 * H * I;
const flopsPerToken = 4 * (L * layerParams + V * H) + L * 6 * T * Hq * D;
let loraParams = 0;
for (const lw of weights.layers) for (const lin of Object.values(lw.linears)) if (lin.lora) loraParams += lin.lora.A.size + lin.lora.B.size;
res.model = { H, I, L, V, Hq, Hk, D, params: L * layerParams + 2 * V * H, loraParams };
res.load = { seconds: loadS, weightsGiB: weightsBytes / GiB, loadPeakReservedGiB: loadPeak.peakReserved / GiB };
res.flopsPerToken = flopsPerToken;
log(`loaded in ${loadS.toFixed(1)} s: ${(weightsBytes / GiB).toFixed(2)} GiB on the device (NF4 base + bf16 embed/head + LoRA and AdamW state), ${(loraParams / 1e6).toFixed(1)} M LoRA params`);

// ---- runs -------------------------------------------------------------------------------------------------
/** Deterministic random token sequences of length T (all positions trained, as torch_bench's labels=ids). */
function examples(n: number, seed: number): Example[] {
  const out: Example[] = [];
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    const ids = new Int32Array(T);
    for (let t = 0; t < T; t++) { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; ids[t] = s % V; }
    out.push({ inputIds: ids, labels: ids, sourceIndex: i });
  }
  return out;
}

const results: Record<string, unknown>[] = [];
for (const run of runs) {
  const B = run.batch, N = B * T;
  const name = `ckpt=${run.ckpt ? 1 : 0} B${B}`;
  const stage = new LlamaStage(be, cfg, spec, weights, { gradientCheckpointing: run.ckpt });
  const settings: TrainSettings = {
    epochs: 1000, maxSteps: steps + 1, microBatchSize: B, gradAccum: 1, replicas: 1, lr: 1e-4, schedule: 'constant',
    warmupSteps: 0, weightDecay: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 1, padId: 0,
  };
  // One batch trained again and again, like torch_bench.py (its loss then falls visibly in a few steps on both).
  const trainer = new Trainer(be, [stage], examples(B, 7 + B), settings, { configHash: 'bench', dataHash: 'bench' });
  be.trim();
  be.resetPeak();
  const r: Record<string, unknown> = { ckpt: run.ckpt, batch: B, seq: T };
  try {
    const losses: number[] = [];
    const stepMs: number[] = [];
    let memAfterFirst = 0;
    for (let s = 0; s <= steps; s++) {
      be.synchronize();
      const ts = performance.now();
      losses.push(trainer.step().loss);
      be.synchronize();
      if (s === 0) memAfterFirst = be.memoryInUse(); else stepMs.push(performance.now() - ts);
    }
    stepMs.sort((a, b) => a - b);
    const med = stepMs[stepMs.length >> 1];
    const st = be.poolStats();
    const tokS = N / (med / 1000);
    Object.assign(r, {
      stepMs, stepMsMedian: med, tokensPerSec: tokS, mfu: (tokS * flopsPerToken) / ((res.gemmTflops as number) * 1e12), losses,
      peakInUseGiB: st.peakInUse / GiB, peakReservedGiB: st.peakReserved / GiB,
      deviceUsedGiB: st.deviceTotal !== undefined && st.deviceFree !== undefined ? (st.deviceTotal - st.deviceFree) / GiB : undefined,
      memoryFlat: be.memoryInUse() === memAfterFirst,
    });
    log(`${name}: ${med.toFixed(1)} ms/step, ${tokS.toFixed(0)} tok/s, MFU ${((r.mfu as number) * 100).toFixed(1)}%, peak live ${(st.peakInUse / GiB).toFixed(2)} GiB, reserved ${(st.peakReserved / GiB).toFixed(2)} GiB, device used ${(r.deviceUsedGiB as number)?.toFixed(2)} GiB, losses ${losses.map((x) => x.toFixed(4)).join(' ')}`);
  } catch (e) {
    r.error = String((e as Error).message).split('\n')[0];
    log(`${name}: FAILED ${r.error}`);
    stage.reset();
  }
  results.push(r);
  be.trim();
}
res.runs = results;
if (jsonPath) writeFileSync(jsonPath, JSON.stringify(res, null, 2));
log('done');
