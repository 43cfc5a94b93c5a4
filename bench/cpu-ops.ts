// cpu backend op benchmark: matmul GFLOP/s for the shapes of a d256 × 4-layer Llama at 8 × 256 tokens (TS kernels
// vs the native addon, 1 vs 2 threads) against a peak measured in the same run (register-resident FMA loop in the
// addon), NF4 throughput, and attention at T = 256. `runCpuOpsBench()` returns the markdown; run directly to print.
//   node --import tsx bench/cpu-ops.ts            (DQLORA_BENCH_QUICK=1 for a short run)

import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { createCpuBackend, type CpuBackend } from '../core/engine/cpu.ts';
import { loadCpuNative } from '../core/engine/cpu/native.ts';
import { dequantizeNf4, quantizeNf4 } from '../core/engine/nf4.ts';
import type { Tensor } from '../core/engine/backend.ts';

const QUICK = process.env.DQLORA_BENCH_QUICK === '1';

/** Best seconds per call over repetitions lasting about `budget` seconds (at least one call after a warm-up). */
function time(fn: () => void, budget = QUICK ? 0.15 : 0.6, warm = true): number {
  if (warm) fn();
  let best = Infinity, spent = 0;
  do {
    const t0 = process.hrtime.bigint();
    fn();
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    best = Math.min(best, s); spent += s;
  } while (spent < budget);
  return best;
}

function randTensor(be: CpuBackend, shape: number[], seed: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1), d = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; d[i] = (s / 4294967296 - 0.5) * 0.2; }
  return be.upload(d, shape);
}

const fmt = (x: number, d = 1): string => (Number.isFinite(x) ? x.toFixed(d) : '—');

export async function runCpuOpsBench(): Promise<string> {
  const native = loadCpuNative();
  const ts = createCpuBackend({ native: false });
  const n1 = native ? createCpuBackend({ native: true, threads: 1 }) : null;
  const n2 = native ? createCpuBackend({ native: true, threads: 2 }) : null;
  const lines: string[] = [];
  const cpu = os.cpus()[0]?.model ?? 'unknown cpu';
  lines.push(`cpu ops — ${new Date().toISOString().slice(0, 10)}, ${cpu}, ${os.availableParallelism()} cores, node ${process.version}, native: ${native ? native.isa() : 'not built'}`);
  lines.push('');
  // Best of many short windows: on a shared machine a long window measures the neighbours, not the core.
  const peak = (t: number): number => { let b = NaN; for (let i = 0; i < 16 && native; i++) b = Math.max(native.peakGflops(25, t), Number.isNaN(b) ? 0 : b); return b; };
  const peak1 = peak(1), peak2 = peak(2);
  lines.push(`Peak (measured FMA loop, ${native?.isa() ?? '—'}, best of 16 × 25 ms): ${fmt(peak1)} GFLOP/s on 1 thread, ${fmt(peak2)} GFLOP/s on 2 threads.`);
  lines.push(`Load average at start: ${os.loadavg().map((x) => x.toFixed(1)).join(' / ')} (timings are best-of; a loaded machine lowers them).`);
  lines.push('');

  // ---- matmul ----
  // N = B·T = 2048 tokens; the head runs in the model's chunks of max(512, ⌊2^22 / V⌋) rows.
  const shapes: { name: string; M: number; N: number; K: number; transB: boolean; tsOk: boolean }[] = [
    { name: 'x·Wᵀ attn proj', M: 2048, N: 256, K: 256, transB: true, tsOk: true },
    { name: 'x·Wᵀ MLP up (I=688)', M: 2048, N: 688, K: 256, transB: true, tsOk: true },
    { name: 'x·Wᵀ MLP down', M: 2048, N: 256, K: 688, transB: true, tsOk: true },
    { name: 'dy·W (backward, I=688)', M: 2048, N: 256, K: 688, transB: false, tsOk: true },
    { name: 'head V=2000 (chunk 2048)', M: 2048, N: 2000, K: 256, transB: true, tsOk: true },
    { name: 'head V=32000 (chunk 512)', M: 512, N: 32000, K: 256, transB: true, tsOk: !QUICK },
    { name: 'head bwd dY V=32000 (chunk 512)', M: 512, N: 256, K: 32000, transB: false, tsOk: !QUICK },
    { name: 'LoRA A x·Aᵀ (r=8)', M: 2048, N: 8, K: 256, transB: true, tsOk: true },
  ];
  lines.push('| matmul M×N×K | TS GFLOP/s | native 1T | native 2T | 2T % of peak |');
  lines.push('|---|---:|---:|---:|---:|');
  for (const s of shapes) {
    const flops = 2 * s.M * s.N * s.K;
    const rate = (be: CpuBackend | null, ok = true): number => {
      if (!be || !ok) return NaN;
      const a = randTensor(be, [s.M, s.K], 1), b = randTensor(be, s.transB ? [s.N, s.K] : [s.K, s.N], 2);
      const out = be.zeros([s.M, s.N]);
      const t = time(() => be.matmul(a, b, { transB: s.transB, out }), undefined, be.native !== null);
      be.free(a); be.free(b); be.free(out);
      return flops / t / 1e9;
    };
    const rTs = rate(ts, s.tsOk), r1 = rate(n1), r2 = rate(n2);
    lines.push(`| ${s.name} ${s.M}×${s.N}×${s.K} | ${fmt(rTs, 2)} | ${fmt(r1)} | ${fmt(r2)} | ${fmt((100 * r2) / peak2, 0)}% |`);
  }
  lines.push('');

  // ---- NF4 ----
  {
    const [O, I] = [688, 256], n = O * I;
    const w = new Float32Array(n).map((_, i) => Math.sin(i * 0.37) * 0.05);
    let q = quantizeNf4(w, [O, I], { doubleQuant: true });
    const tq = time(() => { q = quantizeNf4(w, [O, I], { doubleQuant: true }); });
    const out = new Float32Array(n);
    const td = time(() => dequantizeNf4(q, out));
    const mb = (n * 4) / 1e6;
    lines.push(`| NF4 (TS, nf4.ts) [${O}, ${I}] + double quant | MB/s of float32 |`);
    lines.push('|---|---:|');
    lines.push(`| quantize | ${fmt(mb / tq, 0)} |`);
    lines.push(`| dequantize | ${fmt(mb / td, 0)} |`);
    lines.push('');
    lines.push('| nf4Linear 2048×688×256 | TS GFLOP/s | native 1T | native 2T |');
    lines.push('|---|---:|---:|---:|');
    const flops = 2 * 2048 * O * I;
    for (const dir of ['forward y = x·Wᵀ', 'backward dx = dy·W'] as const) {
      const rate = (be: CpuBackend | null): number => {
        if (!be) return NaN;
        const qw = be.uploadNf4(q);
        const x = randTensor(be, dir.startsWith('f') ? [2048, I] : [2048, O], 3);
        const t = time(() => be.free(dir.startsWith('f') ? be.nf4Linear(x, qw) : be.nf4LinearBackward(x, qw)));
        be.freeQuantized(qw); be.free(x);
        return flops / t / 1e9;
      };
      lines.push(`| ${dir} | ${fmt(rate(ts), 2)} | ${fmt(rate(n1))} | ${fmt(rate(n2))} |`);
    }
    lines.push('');
  }

  // ---- elementwise / normalisation ----
  {
    const [N, H, I, nh, D] = [2048, 256, 704, 8, 32];
    lines.push(`| elementwise, ${N} tokens (H ${H}, I ${I}, ${nh}×${D} heads) | TS ms | native 1T ms | native 2T ms |`);
    lines.push('|---|---:|---:|---:|');
    const row = (name: string, op: (be: CpuBackend) => () => void): void => {
      const ms = [ts, n1, n2].map((be) => (be ? time(op(be)) * 1e3 : NaN));
      lines.push(`| ${name} | ${ms.map((x) => fmt(x, 2)).join(' | ')} |`);
    };
    row(`swiglu fwd [${N}, ${I}]`, (be) => { const g = randTensor(be, [N, I], 1), u = randTensor(be, [N, I], 2); return () => be.free(be.swiglu(g, u)); });
    row(`swiglu bwd [${N}, ${I}]`, (be) => {
      const g = randTensor(be, [N, I], 1), u = randTensor(be, [N, I], 2), d = randTensor(be, [N, I], 3);
      return () => { const r = be.swigluBackward(d, g, u); be.free(r.dgate); be.free(r.dup); };
    });
    row(`rmsnorm fwd [${N}, ${H}]`, (be) => { const x = randTensor(be, [N, H], 1), w = randTensor(be, [H], 2); return () => { const r = be.rmsnorm(x, w, 1e-5); be.free(r.y); be.free(r.rstd); }; });
    row(`rmsnorm bwd [${N}, ${H}]`, (be) => {
      const x = randTensor(be, [N, H], 1), w = randTensor(be, [H], 2), d = randTensor(be, [N, H], 3), r = be.rmsnorm(x, w, 1e-5);
      return () => be.free(be.rmsnormBackward(d, x, w, r.rstd));
    });
    row(`rope [${N}, ${nh}, ${D}]`, (be) => {
      const x = randTensor(be, [N, nh, D], 1), pos = be.upload(Int32Array.from({ length: N }, (_, i) => i % 256), [N]);
      const f = be.upload(Float32Array.from({ length: D / 2 }, (_, i) => 1 / Math.pow(10000, (2 * i) / D)), [D / 2]);
      return () => be.free(be.rope(x, pos, f, { rotaryDim: D }));
    });
    row(`dropout p=0.1 [${N}, ${I}] (Philox per element)`, (be) => {
      const x = randTensor(be, [N, I], 1), ids = Int32Array.from({ length: N }, (_, i) => i);
      return () => be.free(be.dropout(x, { p: 0.1, k0: 1, k1: 2, stream: 3, rowSample: ids, rowPos: ids }));
    });
    row(`axpy [${N}, ${I}]`, (be) => { const a = randTensor(be, [N, I], 1), b = randTensor(be, [N, I], 2); return () => be.axpy(a, b, 1e-3); });
    row('adamw 28 × [704, 16] (one step of the example\'s LoRA B)', (be) => {
      const ps = Array.from({ length: 28 }, (_, i) => [randTensor(be, [704, 16], i), randTensor(be, [704, 16], 100 + i), be.zeros([704, 16]), be.zeros([704, 16])]);
      return () => { for (const [p, g, m, v] of ps) be.adamw(p, g, m, v, { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: 1 }); };
    });
    lines.push('');
  }

  // ---- attention ----
  {
    const [B, T, H, D] = [8, 256, 4, 64];
    lines.push(`| attention B=${B} T=${T} Hq=Hk=${H} D=${D} (causal) | TS ms | native 1T ms | native 2T ms |`);
    lines.push('|---|---:|---:|---:|');
    const res = [ts, n1, n2].map((be) => {
      if (!be) return [NaN, NaN];
      const q = randTensor(be, [B, T, H, D], 4), k = randTensor(be, [B, T, H, D], 5), v = randTensor(be, [B, T, H, D], 6);
      const mask = be.upload(new Int32Array(B * T).fill(1), [B, T]);
      const g = randTensor(be, [B, T, H, D], 7);
      let saved = be.attention(q, k, v, mask, 0.125);
      const budget = be.native ? undefined : 0.01;
      const tf = time(() => { saved = be.attention(q, k, v, mask, 0.125); }, budget, be.native !== null);
      const tb = time(() => { be.attentionBackward(g, q, k, v, mask, saved, 0.125); }, budget, be.native !== null);
      return [tf * 1e3, tb * 1e3];
    });
    lines.push(`| forward | ${res.map((r) => fmt(r[0])).join(' | ')} |`);
    lines.push(`| backward | ${res.map((r) => fmt(r[1])).join(' | ')} |`);
  }
  return lines.join('\n');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  console.log(await runCpuOpsBench());
}
