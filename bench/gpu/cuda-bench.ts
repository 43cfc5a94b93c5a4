// CUDA backend benchmark (run by bench/gpu.sh on the GPU machine): per-op timings, the bf16 GEMM ceiling through
// our cuBLASLt path, and a QLoRA training-step microbenchmark of a Llama layer stack written directly against
// the Backend ops (NF4 base + fp32 LoRA on all 7 linear layers, RoPE, flash attention, SwiGLU, RMSNorm, LM head
// + chunk-free cross-entropy, AdamW on the LoRA weights), no gradient checkpointing.
// Usage: node cuda-bench.mjs [--layers 22] [--batch 8] [--seq 1024] [--steps 5] [--json out.json]
// Prints a table; the JSON (with every number) is written where --json says.

import { writeFileSync } from 'node:fs';
import type { Tensor } from '../../core/engine/backend.ts';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
}
const jsonPath = (() => { const i = process.argv.indexOf('--json'); return i > 0 ? process.argv[i + 1] : undefined; })();

// TinyLlama-1.1B shape.
const cfg = { H: 2048, I: 5632, Hq: 32, Hk: 4, D: 64, V: 32000, L: arg('layers', 22), B: arg('batch', 8), T: arg('seq', 1024), r: 16, alpha: 32 };
const steps = arg('steps', 5);

const b: CudaBackend = createCudaBackend();
const results: Record<string, unknown> = { device: b.info, config: cfg };
const gib = (x: number) => x / 2 ** 30;

/** Fast deterministic uniform floats in [-a, a) (xorshift32). */
function randn(n: number, a: number, seed: number): Float32Array {
  const o = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    o[i] = ((s / 4294967296) * 2 - 1) * a;
  }
  return o;
}

/** Median ms of `reps` runs of fn (synchronised), after `warm` warm-ups. */
function time(fn: () => void, reps = 10, warm = 2): number {
  for (let i = 0; i < warm; i++) fn();
  b.synchronize();
  const ts: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    b.synchronize();
    ts.push(performance.now() - t0);
  }
  ts.sort((x, y) => x - y);
  return ts[Math.floor(ts.length / 2)];
}

const rows: [string, string, string][] = [];
function report(name: string, ms: number, work: string): void {
  rows.push([name, ms.toFixed(3), work]);
  (results.ops as Record<string, number>)[name] = ms;
}
results.ops = {};

// ---- ceilings & per-op timings ---------------------------------------------------------------------------
{
  const n = 8192;
  const A = b.upload(randn(n * n, 1, 1), [n, n], 'bf16'), B2 = b.upload(randn(n * n, 1, 2), [n, n], 'bf16');
  const C = b.zeros([n, n], 'bf16');
  const ms = time(() => { b.matmul(A, B2, { out: C }); }, 10, 3);
  const tflops = (2 * n ** 3) / (ms * 1e-3) / 1e12;
  results.gemmTflops = tflops;
  report('gemm bf16 8192³ (cuBLASLt)', ms, `${tflops.toFixed(0)} TFLOP/s`);
  for (const t of [A, B2, C]) b.free(t);
}
const { H, I, Hq, Hk, D, V, L, B, T, r } = cfg;
const N = B * T;
{
  const x = b.upload(randn(N * H, 1, 3), [N, H], 'act');
  const w = b.uploadNf4(b.quantizeNf4(randn(I * H, 0.05, 4), [I, H]));
  const dq = b.zeros([I, H], 'bf16');
  const msDq = time(() => { const t = b.dequantize(w); b.free(t); });
  report('nf4 dequantize 5632×2048 → f32', msDq, `${((I * H * 4.13 / 8 + I * H * 4) / (msDq * 1e-3) / 1e9).toFixed(0)} GB/s`);
  void dq;
  const msLin = time(() => { const y = b.nf4Linear(x, w); b.free(y); });
  report(`nf4Linear [${N},${H}]·[${I},${H}]ᵀ`, msLin, `${((2 * N * H * I) / (msLin * 1e-3) / 1e12).toFixed(0)} TFLOP/s`);
  const dy = b.upload(randn(N * I, 1, 5), [N, I], 'act');
  const msLinB = time(() => { const y = b.nf4LinearBackward(dy, w); b.free(y); });
  report('nf4LinearBackward', msLinB, `${((2 * N * H * I) / (msLinB * 1e-3) / 1e12).toFixed(0)} TFLOP/s`);
  const g = b.upload(randn(N * I, 3, 6), [N, I], 'act');
  const msSw = time(() => { const h = b.swiglu(g, dy); b.free(h); });
  report('swiglu [N, I]', msSw, `${((3 * N * I * 2) / (msSw * 1e-3) / 1e9).toFixed(0)} GB/s`);
  const msSwB = time(() => { const o = b.swigluBackward(dy, g, dy); b.free(o.dgate); b.free(o.dup); });
  report('swigluBackward', msSwB, `${((5 * N * I * 2) / (msSwB * 1e-3) / 1e9).toFixed(0)} GB/s`);
  const nw = b.upload(randn(H, 1, 7), [H], 'f32');
  const msRms = time(() => { const o = b.rmsnorm(x, nw, 1e-5); b.free(o.y); b.free(o.rstd); });
  report('rmsnorm [N, H]', msRms, `${((2 * N * H * 2) / (msRms * 1e-3) / 1e9).toFixed(0)} GB/s`);
  for (const t of [x, dy, g, nw, dq]) b.free(t);
  b.freeQuantized(w);
}
{
  const q = b.upload(randn(N * Hq * D, 1, 8), [B, T, Hq, D], 'act');
  const k = b.upload(randn(N * Hk * D, 1, 9), [B, T, Hk, D], 'act');
  const v = b.upload(randn(N * Hk * D, 1, 10), [B, T, Hk, D], 'act');
  const mask = b.upload(new Int32Array(N).fill(1), [B, T]);
  const flops = 4 * B * Hq * T * T * D / 2; // causal
  const msF = time(() => { const s = b.attention(q, k, v, mask, 0.125); b.free(s.out); b.free(s.lse); });
  report(`attention fwd B${B} T${T} ${Hq}/${Hk}×${D}`, msF, `${(flops / (msF * 1e-3) / 1e12).toFixed(0)} TFLOP/s`);
  const s = b.attention(q, k, v, mask, 0.125);
  const msB = time(() => { const gr = b.attentionBackward(q, q, k, v, mask, s, 0.125); b.free(gr.dq); b.free(gr.dk); b.free(gr.dv); });
  report('attention bwd', msB, `${(2.5 * flops / (msB * 1e-3) / 1e12).toFixed(0)} TFLOP/s`);
  const pos = b.upload(Int32Array.from({ length: N }, (_, i) => i % T), [N]);
  const inv = b.upload(Float32Array.from({ length: D / 2 }, (_, i) => Math.pow(10000, -2 * i / D)), [D / 2]);
  const msR = time(() => { const y = b.rope(q, pos, inv, { rotaryDim: D }); b.free(y); });
  report('rope q', msR, `${((2 * N * Hq * D * 2) / (msR * 1e-3) / 1e9).toFixed(0)} GB/s`);
  for (const t of [q, k, v, mask, s.out, s.lse, pos, inv]) b.free(t);
}
{
  const logits = b.upload(randn(N * V, 4, 11), [N, V], 'act');
  const tg = b.upload(Int32Array.from({ length: N }, (_, i) => (i * 7919) % V), [N]);
  const msCe = time(() => { b.crossEntropy(logits, tg, { gradScale: 1 / N, inPlace: true }); }, 5, 1);
  report(`crossEntropy [${N}, ${V}] + grad in place`, msCe, `${((2 * N * V * 2 + N * V * 2) / (msCe * 1e-3) / 1e9).toFixed(0)} GB/s`);
  b.free(logits); b.free(tg);
  const n = 16 * (H + H) * 7 * L;
  const p = b.upload(randn(n, 0.1, 12), [n]), gr = b.upload(randn(n, 0.1, 13), [n]), m = b.zeros([n], 'f32'), vv = b.zeros([n], 'f32');
  const msA = time(() => b.adamw(p, gr, m, vv, { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: 1 }));
  report(`adamw ${(n / 1e6).toFixed(1)}M params`, msA, `${((7 * n * 4) / (msA * 1e-3) / 1e9).toFixed(0)} GB/s`);
  for (const t of [p, gr, m, vv]) b.free(t);
}

// ---- training-step microbenchmark --------------------------------------------------------------------------
interface LoraLinear { w: ReturnType<CudaBackend['uploadNf4']>; A: Tensor; Bm: Tensor; mA: Tensor; vA: Tensor; mB: Tensor; vB: Tensor; out: number; in: number }
const s = cfg.alpha / r;
function loraLinear(out: number, inn: number, seed: number, cache: Map<string, ReturnType<CudaBackend['quantizeNf4']>>): LoraLinear {
  // Same random NF4 weight for every layer of a given shape (quantizing 1B random floats in JS would dominate);
  // each layer still holds its own device copy.
  const key = `${out}x${inn}`;
  if (!cache.has(key)) cache.set(key, b.quantizeNf4(randn(out * inn, 0.04, seed), [out, inn]));
  const w = b.uploadNf4(cache.get(key)!);
  const A = b.upload(randn(r * inn, 1 / Math.sqrt(inn), seed + 1), [r, inn]);
  const Bm = b.upload(randn(out * r, 1e-3, seed + 2), [out, r]); // nonzero B so every gradient path does real work
  return { w, A, Bm, mA: b.zeros([r, inn], 'f32'), vA: b.zeros([r, inn], 'f32'), mB: b.zeros([out, r], 'f32'), vB: b.zeros([out, r], 'f32'), out, in: inn };
}
interface LinSaved { x: Tensor; h: Tensor }
function linFwd(l: LoraLinear, x: Tensor): { y: Tensor; saved: LinSaved } {
  const y = b.nf4Linear(x, l.w);
  const h = b.matmul(x, l.A, { transB: true });                 // [N, r] f32
  b.matmul(h, l.Bm, { transB: true, out: y, accumulate: true, alpha: s });
  return { y, saved: { x, h } };
}
function linBwd(l: LoraLinear, dy: Tensor, sv: LinSaved, grads: Tensor[]): Tensor {
  const dB = b.matmul(dy, sv.h, { transA: true, alpha: s });    // [out, r]
  const dh = b.matmul(dy, l.Bm, { alpha: s });                  // [N, r]
  const dA = b.matmul(dh, sv.x, { transA: true });              // [r, in]
  const dx = b.nf4LinearBackward(dy, l.w);
  b.matmul(dh, l.A, { out: dx, accumulate: true });
  b.free(dh); b.free(sv.h);
  grads.push(dA, dB);
  return dx;
}

const cache = new Map<string, ReturnType<CudaBackend['quantizeNf4']>>();
b.resetPeak();
const layers = Array.from({ length: L }, (_, i) => ({
  q: loraLinear(Hq * D, H, 100, cache), k: loraLinear(Hk * D, H, 200, cache), v: loraLinear(Hk * D, H, 200, cache),
  o: loraLinear(H, Hq * D, 300, cache), gate: loraLinear(I, H, 400, cache), up: loraLinear(I, H, 400, cache),
  down: loraLinear(H, I, 500, cache), n1: b.upload(randn(H, 0.1, 600 + i).map((x) => 1 + x), [H]), n2: b.upload(randn(H, 0.1, 700 + i).map((x) => 1 + x), [H]),
}));
const embed = b.upload(randn(V * H, 0.02, 800), [V, H], 'act');
const head = b.upload(randn(V * H, 0.02, 801), [V, H], 'act');
const normF = b.upload(new Float32Array(H).fill(1), [H]);
const ids = b.upload(Int32Array.from({ length: N }, (_, i) => (i * 2654435761) % V >>> 0), [N]);
const targets = b.upload(Int32Array.from({ length: N }, (_, i) => (i * 40503 + 7) % V), [N]);
const mask = b.upload(new Int32Array(N).fill(1), [B, T]);
const pos = b.upload(Int32Array.from({ length: N }, (_, i) => i % T), [N]);
const invFreq = b.upload(Float32Array.from({ length: D / 2 }, (_, i) => Math.pow(10000, -2 * i / D)), [D / 2]);
const weightsBytes = b.memoryInUse();
let stepNo = 0;

function trainStep(): number {
  stepNo++;
  const x0 = b.embedding(ids, embed);
  const saved: Record<string, unknown>[] = [];
  let x = x0;
  for (const ly of layers) {
    const n1 = b.rmsnorm(x, ly.n1, 1e-5);
    const q = linFwd(ly.q, n1.y), k = linFwd(ly.k, n1.y), v = linFwd(ly.v, n1.y);
    const qr = b.rope(b.reshape(q.y, [B, T, Hq, D]), pos, invFreq, { rotaryDim: D });
    const kr = b.rope(b.reshape(k.y, [B, T, Hk, D]), pos, invFreq, { rotaryDim: D });
    b.free(q.y); b.free(k.y);
    const vr = b.reshape(v.y, [B, T, Hk, D]);
    const att = b.attention(qr, kr, vr, mask, 1 / Math.sqrt(D));
    const o = linFwd(ly.o, b.reshape(att.out, [N, H]));
    const x2 = b.axpy(o.y, x);                                     // o.y += x → residual stream
    const n2 = b.rmsnorm(x2, ly.n2, 1e-5);
    const gt = linFwd(ly.gate, n2.y), up = linFwd(ly.up, n2.y);
    const hh = b.swiglu(gt.y, up.y);
    const dn = linFwd(ly.down, hh);
    const x3 = b.axpy(dn.y, x2);
    saved.push({ x, n1, q: q.saved, k: k.saved, v: v.saved, qr, kr, vr, att, o: o.saved, x2, n2, gt, up, hh, dn: dn.saved });
    x = x3;
  }
  const nf = b.rmsnorm(x, normF, 1e-5);
  const logits = b.matmul(nf.y, head, { transB: true });          // [N, V] bf16
  const ce = b.crossEntropy(logits, targets, { gradScale: 1 / N, inPlace: true });
  const dnf = b.matmul(logits, head);                             // [N, H]
  b.free(logits);
  let dx = b.rmsnormBackward(dnf, x, normF, nf.rstd);
  b.free(dnf); b.free(nf.y); b.free(nf.rstd); b.free(x);
  const grads: Tensor[] = [];
  for (let li = L - 1; li >= 0; li--) {
    const ly = layers[li], sv = saved[li] as any; // eslint-disable-line @typescript-eslint/no-explicit-any
    // x3 = x2 + down(swiglu(gate(n2), up(n2)));  dx is d x3
    const dh = linBwd(ly.down, dx, sv.dn, grads);
    const sg = b.swigluBackward(dh, sv.gt.y, sv.up.y);
    b.free(dh); b.free(sv.hh); b.free(sv.gt.y); b.free(sv.up.y);
    const dn2 = linBwd(ly.gate, sg.dgate, sv.gt.saved, grads);
    const dn2b = linBwd(ly.up, sg.dup, sv.up.saved, grads);
    b.axpy(dn2, dn2b); b.free(dn2b); b.free(sg.dgate); b.free(sg.dup);
    const dx2 = b.rmsnormBackward(dn2, sv.x2, ly.n2, sv.n2.rstd);
    b.free(dn2); b.free(sv.n2.y); b.free(sv.n2.rstd);
    b.axpy(dx2, dx); b.free(dx); b.free(sv.x2);                   // residual
    const datt = linBwd(ly.o, dx2, sv.o, grads);
    const ag = b.attentionBackward(b.reshape(datt, [B, T, Hq, D]), sv.qr, sv.kr, sv.vr, mask, sv.att, 1 / Math.sqrt(D));
    b.free(datt); b.free(sv.att.out); b.free(sv.att.lse); b.free(sv.qr); b.free(sv.kr);
    const dq = b.rope(ag.dq, pos, invFreq, { rotaryDim: D, inverse: true });
    const dk = b.rope(ag.dk, pos, invFreq, { rotaryDim: D, inverse: true });
    b.free(ag.dq); b.free(ag.dk);
    const d1 = linBwd(ly.q, b.reshape(dq, [N, Hq * D]), sv.q, grads);
    const d2 = linBwd(ly.k, b.reshape(dk, [N, Hk * D]), sv.k, grads);
    const d3 = linBwd(ly.v, b.reshape(ag.dv, [N, Hk * D]), sv.v, grads);
    b.free(dq); b.free(dk); b.free(ag.dv); b.free(sv.vr);
    b.axpy(d1, d2); b.axpy(d1, d3); b.free(d2); b.free(d3);
    const dxi = b.rmsnormBackward(d1, sv.x, ly.n1, sv.n1.rstd);
    b.free(d1); b.free(sv.n1.y); b.free(sv.n1.rstd);
    b.axpy(dxi, dx2); b.free(dx2);
    if (li > 0) b.free(sv.x);
    dx = dxi;
  }
  b.free(dx); b.free(x0);
  // AdamW on every LoRA matrix (grads were pushed in reverse layer order: [dA, dB] per linear).
  let gi = 0;
  const h = { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: stepNo };
  for (let li = L - 1; li >= 0; li--) {
    const ly = layers[li];
    for (const l of [ly.down, ly.gate, ly.up, ly.o, ly.q, ly.k, ly.v]) {
      b.adamw(l.A, grads[gi], l.mA, l.vA, h); b.adamw(l.Bm, grads[gi + 1], l.mB, l.vB, h);
      gi += 2;
    }
  }
  for (const g of grads) b.free(g);
  return ce.lossSum / ce.count;
}

const losses: number[] = [];
losses.push(trainStep()); // warm-up: cuBLASLt plans, pool growth
const memAfterWarm = b.memoryInUse();
const stepMs: number[] = [];
for (let i = 0; i < steps; i++) {
  b.synchronize();
  const t0 = performance.now();
  losses.push(trainStep());
  b.synchronize();
  stepMs.push(performance.now() - t0);
}
stepMs.sort((x, y) => x - y);
const med = stepMs[Math.floor(stepMs.length / 2)];
const tokS = N / (med / 1000);
const layerParams = H * Hq * D * 2 + 2 * H * Hk * D + 3 * H * I;
const flopsPerToken = 4 * (L * layerParams + V * H) + L * 6 * T * Hq * D;
const mfu = (tokS * flopsPerToken) / ((results.gemmTflops as number) * 1e12);
const st = b.poolStats();
results.train = {
  stepMsMedian: med, stepMs, tokensPerSec: tokS, losses, flopsPerToken, mfuVsOwnGemm: mfu,
  weightsGiB: gib(weightsBytes), peakInUseGiB: gib(st.peakInUse), peakReservedGiB: gib(st.peakReserved),
  memoryFlat: b.memoryInUse() === memAfterWarm,
};
rows.push([`train step L${L} B${B} T${T} (median of ${steps})`, med.toFixed(1), `${tokS.toFixed(0)} tok/s, MFU ${(mfu * 100).toFixed(1)}% of our GEMM`]);
rows.push(['memory', '', `weights ${gib(weightsBytes).toFixed(2)} GiB, peak live ${gib(st.peakInUse).toFixed(2)} GiB, peak reserved ${gib(st.peakReserved).toFixed(2)} GiB, flat across steps: ${b.memoryInUse() === memAfterWarm}`]);

console.log(`\ndqlora cuda bench on ${b.info.name} (cc ${b.info.computeCapability}, ${b.info.cublasLt})`);
const w0 = Math.max(...rows.map((x) => x[0].length)), w1 = Math.max(...rows.map((x) => x[1].length));
for (const [a, m, c] of rows) console.log(`${a.padEnd(w0)}  ${m.padStart(w1)} ms  ${c}`);
console.log(`losses: ${losses.map((x) => x.toFixed(4)).join(' ')}`);
console.log('DQLORA_JSON ' + JSON.stringify(results));
if (jsonPath) writeFileSync(jsonPath, JSON.stringify(results, null, 2));
