// The native addon against the TypeScript kernels on shapes big enough to take the blocked, multithreaded paths
// (edge tiles, several KC blocks, skinny outputs), and bit-identical results for 1 vs 2 threads. Skipped when
// the addon is not built (DQLORA_CPU_NATIVE=0 or no compiler). Agreement bound: 1e-5 norm-relative — both
// compute float32 products; TS sums in float64, native in float32 with FMA, so they differ by float32 roundoff
// of K-term sums (K ≤ 4000 here: ~1e-6).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createCpuBackend, cpuData, type CpuBackend } from '../../core/engine/cpu.ts';
import { loadCpuNative } from '../../core/engine/cpu/native.ts';
import type { Tensor } from '../../core/engine/backend.ts';
import { rand, randInt, randomNf4, relErr } from './helpers.ts';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeRandomLlama } from '../../coordinator/example/model.ts';
import { Trainer } from '../../core/train/trainer.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';

const native = loadCpuNative();
const AGREE = 1e-5;

describe('cpu native kernels vs TypeScript kernels', { skip: native ? false : 'native addon not built' }, () => {
  const ts = createCpuBackend({ native: false });
  const n1 = createCpuBackend({ native: true, threads: 1 });
  const n2 = createCpuBackend({ native: true, threads: 2 });
  const up = (be: CpuBackend, d: Float32Array | Int32Array, shape: number[]): Tensor => be.upload(d, shape);
  const bits = (t: Tensor): Uint32Array => { const d = cpuData(t); return new Uint32Array(d.buffer, d.byteOffset, d.length); };
  const same = (a: Tensor, b: Tensor, what: string): void => {
    const x = bits(a), y = bits(b);
    assert.ok(x.length === y.length && x.every((v, i) => v === y[i]), `${what}: 1 vs 2 threads differ`);
  };

  it(`dispatches to a vector ISA on this machine (${native?.isa()})`, () => {
    assert.ok(['avx512', 'avx2', 'scalar'].includes(native!.isa()));
  });

  it('sgemm: transposes, alpha, accumulate, edge tiles and multi-KC sums agree; 1 and 2 threads give the same bits', () => {
    // The last rows take the skinny (LoRA-rank) kernels: N ≤ 16, M ≤ 16 (run transposed), both, ragged row blocks.
    for (const [M, N, K] of [[300, 520, 300], [131, 256, 1100], [37, 1000, 64], [2, 3000, 17], [1037, 16, 300], [299, 7, 2100], [13, 700, 1500], [5, 9, 33], [16, 16, 1]]) {
      for (const transA of [false, true]) for (const transB of [false, true]) {
        const a = rand(M * K, M + K), b = rand(K * N, N + 3 * K), c0 = rand(M * N, 5);
        const run = (be: CpuBackend): Tensor => {
          const out = be.upload(c0, [M, N]);
          be.matmul(up(be, a, transA ? [K, M] : [M, K]), up(be, b, transB ? [N, K] : [K, N]), { transA, transB, alpha: 0.75, out, accumulate: true });
          return out;
        };
        const r0 = run(ts), r1 = run(n1), r2 = run(n2);
        assert.ok(relErr(cpuData(r2), cpuData(r0)) < AGREE, `${M}x${N}x${K} ${transA} ${transB}: ${relErr(cpuData(r2), cpuData(r0))}`);
        same(r1, r2, `sgemm ${M}x${N}x${K}`);
      }
    }
  });

  for (const double of [false, true]) {
    it(`nf4 linear forward and backward agree${double ? ' (double quant)' : ''}`, () => {
      const [N, O, I] = [200, 300, 262];
      const w = randomNf4(O, I, 17, { double, blocksize: double ? 64 : 128 });
      const x = rand(N * I, 18), dy = rand(N * O, 19);
      const res = [ts, n1, n2].map((be) => {
        const q = be.uploadNf4(w);
        return [be.nf4Linear(up(be, x, [N, I]), q), be.nf4LinearBackward(up(be, dy, [N, O]), q)];
      });
      for (const k of [0, 1]) {
        assert.ok(relErr(cpuData(res[2][k]), cpuData(res[0][k])) < AGREE, `nf4 ${k ? 'backward' : 'forward'}`);
        same(res[1][k], res[2][k], 'nf4');
      }
    });
  }

  it('attention forward and backward agree (GQA, padding, empty rows, T not a tile multiple)', () => {
    const d = { B: 3, T: 70, Hq: 6, Hk: 2, D: 16 }, scale = 0.25;
    const nq = d.B * d.T * d.Hq * d.D, nk = d.B * d.T * d.Hk * d.D;
    const q = rand(nq, 1, -2, 2), k = rand(nk, 2, -2, 2), v = rand(nk, 3), g = rand(nq, 4);
    const mask = new Int32Array(d.B * d.T).fill(1);
    for (let t = 60; t < 70; t++) mask[t] = 0;            // right padding
    for (let t = 0; t < 5; t++) mask[d.T + t] = 0;         // left padding: 5 empty rows
    for (let t = 0; t < 70; t += 3) mask[2 * d.T + t] = 0; // holes
    const res = [ts, n1, n2].map((be) => {
      const Q = up(be, q, [d.B, d.T, d.Hq, d.D]), K = up(be, k, [d.B, d.T, d.Hk, d.D]), V = up(be, v, [d.B, d.T, d.Hk, d.D]);
      const M = up(be, mask, [d.B, d.T]);
      const s = be.attention(Q, K, V, M, scale);
      const b = be.attentionBackward(up(be, g, Q.shape as number[]), Q, K, V, M, s, scale);
      return [s.out, s.lse, b.dq, b.dk, b.dv];
    });
    ['out', 'lse', 'dq', 'dk', 'dv'].forEach((name, i) => {
      same(res[1][i], res[2][i], name);
      const a = cpuData(res[2][i]).slice(), r = cpuData(res[0][i]).slice();
      if (name === 'lse') for (let j = 0; j < r.length; j++) if (r[j] === -Infinity) { assert.equal(a[j], -Infinity); a[j] = r[j] = 0; }
      assert.ok(relErr(a, r) < AGREE, `${name}: ${relErr(a, r)}`);
    });
  });

  it('cross-entropy (with gradient, in place) and dropout agree; dropout bits are identical', () => {
    const [N, V] = [37, 3001];
    const x = rand(N * V, 7, -6, 6), t = randInt(N, 8, 0, V);
    t[3] = -100; t[20] = -100;
    const res = [ts, n2].map((be) => {
      const X = up(be, x, [N, V]);
      const a = be.crossEntropy(X, up(be, t, [N]));
      const b = be.crossEntropy(X, up(be, t, [N]), { gradScale: 1 / 35, inPlace: true });
      return { a, b, d: cpuData(b.dlogits!) };
    });
    assert.ok(Math.abs(res[1].a.lossSum - res[0].a.lossSum) / res[0].a.lossSum < AGREE);
    assert.equal(res[1].b.count, 35);
    assert.ok(relErr(res[1].d, res[0].d) < AGREE);
    const xs = rand(50 * 300, 9);
    for (const p of [0.1, 0.5, 1 / 3, 0.99999]) {
      const key = { p, k0: 0xdeadbeef, k1: 7, stream: 3, rowSample: randInt(50, 10, 0, 1 << 30), rowPos: randInt(50, 11, 0, 4096) };
      assert.deepEqual(Array.from(cpuData(n2.dropout(up(n2, xs, [50, 300]), key))), Array.from(cpuData(ts.dropout(up(ts, xs, [50, 300]), key))), `p = ${p}`);
    }
  });

  // Sizes span several 16384-element jobs with ragged tails, so the threaded paths and the vector tails both run.
  const runAll = <T>(f: (be: CpuBackend) => T): T[] => [ts, n1, n2].map(f);
  const exact = (a: Tensor, b: Tensor, what: string): void => {
    const x = cpuData(a), y = cpuData(b);
    assert.equal(x.length, y.length, what);
    for (let i = 0; i < x.length; i++) if (!Object.is(x[i], y[i])) assert.fail(`${what}: element ${i} is ${x[i]}, TS has ${y[i]}`);
  };

  it('swiglu forward and backward agree (fast exp within 1e-5, extreme gates), 1 and 2 threads give the same bits', () => {
    const [N, I] = [61, 1033];
    const g = rand(N * I, 101, -12, 12), u = rand(N * I, 102), dh = rand(N * I, 103);
    for (const [i, v] of [[0, 0], [1, -0], [2, 87.5], [3, -87.5], [4, 100], [5, -100], [6, 1e-30], [7, -3e4], [8, 3e4]]) g[i] = v;
    const res = runAll((be) => {
      const G = up(be, g, [N, I]), U = up(be, u, [N, I]);
      const b = be.swigluBackward(up(be, dh, [N, I]), G, U);
      return [be.swiglu(G, U), b.dgate, b.dup];
    });
    ['h', 'dgate', 'dup'].forEach((name, k) => {
      same(res[1][k], res[2][k], `swiglu ${name}`);
      const e = relErr(cpuData(res[2][k]), cpuData(res[0][k]));
      assert.ok(e < AGREE, `swiglu ${name}: ${e}`);
      assert.ok(cpuData(res[2][k]).every(Number.isFinite), `swiglu ${name}: all finite`);
    });
    // Elementwise, not just norm-relative: silu's relative error stays small where it is not tiny.
    const h = cpuData(res[2][0]), hr = cpuData(res[0][0]);
    for (let i = 0; i < h.length; i++) if (Math.abs(hr[i]) > 1e-3) assert.ok(Math.abs(h[i] - hr[i]) <= 1e-5 * Math.abs(hr[i]), `h[${i}] ${h[i]} vs ${hr[i]}`);
  });

  it('rmsnorm forward and backward agree; y has the TS bits whenever rstd does', () => {
    const [N, H] = [131, 333];
    const x = rand(N * H, 111, -3, 3), w = rand(H, 112, 0.5, 1.5), dy = rand(N * H, 113);
    const res = runAll((be) => {
      const X = up(be, x, [N, H]), W = up(be, w, [H]);
      const { y, rstd } = be.rmsnorm(X, W, 1e-6);
      return [y, rstd, be.rmsnormBackward(up(be, dy, [N, H]), X, W, rstd)];
    });
    ['y', 'rstd', 'dx'].forEach((name, k) => {
      same(res[1][k], res[2][k], `rmsnorm ${name}`);
      const e = relErr(cpuData(res[2][k]), cpuData(res[0][k]));
      assert.ok(e < AGREE, `rmsnorm ${name}: ${e}`);
    });
    const r0 = cpuData(res[0][1]), r2 = cpuData(res[2][1]), y0 = cpuData(res[0][0]), y2 = cpuData(res[2][0]);
    for (let n = 0; n < N; n++) if (r0[n] === r2[n]) for (let j = 0; j < H; j++) assert.equal(y2[n * H + j], y0[n * H + j]);
  });

  it('rope gives the TS bits: forward, inverse, mscale, partial rotary, repeated and scattered positions', () => {
    const [N, nh, D] = [300, 5, 24];
    const x = rand(N * nh * D, 121, -2, 2);
    const posSets = [
      Int32Array.from({ length: N }, (_, i) => i % 100),              // B × T layout: a table over [0, 100)
      Int32Array.from({ length: N }, (_, i) => (i * 7919) % 100000),  // range > N: one cos/sin row per token
      Int32Array.from({ length: N }, (_, i) => 50 + (i % 3)),
    ];
    for (const pos of posSets) for (const rd of [24, 16]) for (const inverse of [false, true]) {
      const half = rd / 2, invFreq = Float32Array.from({ length: half }, (_, i) => 1 / Math.pow(10000, (2 * i) / rd));
      const res = runAll((be) => be.rope(up(be, x, [N, nh, D]), up(be, pos, [N]), up(be, invFreq, [half]), { rotaryDim: rd, mscale: inverse ? 1.1 : 1, inverse }));
      exact(res[1], res[0], `rope rd=${rd} inverse=${inverse}`);
      exact(res[2], res[0], `rope 2T rd=${rd} inverse=${inverse}`);
    }
  });

  it('axpy, scale, sumRows, adamw and embedding give the TS bits; sumSquares agrees and is thread-count independent', () => {
    const n = 3 * 16384 + 77;
    const a = rand(n, 131), b = rand(n, 132), g = rand(n, 133);
    for (const be of [n1, n2]) {
      const pairs = [ts, be].map((e) => {
        const A = up(e, a, [n]);
        e.axpy(A, up(e, b, [n]), -0.37);
        e.scale(A, 1.7);
        return A;
      });
      exact(pairs[1], pairs[0], 'axpy + scale');
      const aliased = [ts, be].map((e) => { const A = up(e, a, [n]); return e.axpy(A, A, 0.5); });
      exact(aliased[1], aliased[0], 'axpy with b = a');
    }
    const ss = [ts, n1, n2].map((e) => e.sumSquares(up(e, a, [n])));
    assert.equal(ss[1], ss[2]);
    assert.ok(Math.abs(ss[1] - ss[0]) <= 1e-12 * ss[0], `sumSquares ${ss[1]} vs ${ss[0]}`);
    assert.equal(n1.sumSquares(n1.zeros([0])), 0);
    for (const [N, C] of [[129, 700], [3, 5], [1000, 40]]) {
      const x = rand(N * C, 134 + C);
      const res = runAll((e) => e.sumRows(up(e, x, [N, C])));
      exact(res[1], res[0], `sumRows ${N}x${C}`); exact(res[2], res[0], `sumRows 2T ${N}x${C}`);
    }
    const hyper = { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    for (const weightDecay of [0, 0.01]) {
      const res = runAll((e) => {
        const P = up(e, a, [n]), M = e.zeros([n]), V = e.zeros([n]);
        for (let step = 1; step <= 3; step++) e.adamw(P, up(e, step === 2 ? b : g, [n]), M, V, { ...hyper, weightDecay, step });
        return [P, M, V];
      });
      for (let k = 0; k < 3; k++) { exact(res[1][k], res[0][k], `adamw ${k}`); exact(res[2][k], res[0][k], `adamw 2T ${k}`); }
    }
    const [V, H] = [50, 300], table = rand(V * H, 140), ids = randInt(2000, 141, 0, V);
    const emb = runAll((e) => e.embedding(up(e, ids, [20, 100]), up(e, table, [V, H])));
    assert.deepEqual(emb[2].shape, [20, 100, H]);
    exact(emb[1], emb[0], 'embedding'); exact(emb[2], emb[0], 'embedding 2T');
    ids[1500] = V;
    assert.throws(() => n2.embedding(up(n2, ids, [2000]), up(n2, table, [V, H])), /token id 50 at position 1500/);
  });

  it('the AVX2 and scalar kernels (forced with DQLORA_CPU_ISA) agree with the TypeScript kernels; elementwise bits equal across ISAs', () => {
    const script = `
      import { createCpuBackend, cpuData } from './core/engine/cpu.ts';
      const ts = createCpuBackend({ native: false }), nb = createCpuBackend({ threads: 2 });
      const M = 77, N = 90, K = 300, a = new Float32Array(M * K).map((_, i) => Math.sin(i)), b = new Float32Array(K * N).map((_, i) => Math.cos(i * 0.7));
      const r = [ts, nb].map((be) => cpuData(be.matmul(be.upload(a, [M, K]), be.upload(b, [N, K]), { transB: true })));
      let e = 0, m = 0; for (let i = 0; i < r[0].length; i++) { e = Math.max(e, Math.abs(r[0][i] - r[1][i])); m = Math.max(m, Math.abs(r[0][i])); }
      const n = 40000, g = new Float32Array(n).map((_, i) => Math.sin(i * 0.013) * 20), u = new Float32Array(n).map((_, i) => Math.cos(i * 0.7));
      const w = new Float32Array(400).map((_, i) => 1 + Math.sin(i) * 0.1);
      const G = nb.upload(g, [100, 400]), U = nb.upload(u, [100, 400]);
      const bw = nb.swigluBackward(U, G, U), rn = nb.rmsnorm(G, nb.upload(w, [400]), 1e-5);
      const outs = [nb.swiglu(G, U), bw.dgate, bw.dup, rn.y, rn.rstd, nb.rmsnormBackward(U, G, nb.upload(w, [400]), rn.rstd)];
      let h = 0x811c9dc5;
      for (const t of outs) for (const v of new Uint32Array(cpuData(t).buffer, cpuData(t).byteOffset, t.size)) h = Math.imul(h ^ v, 16777619) >>> 0;
      h = Math.imul(h ^ Math.round(nb.sumSquares(G) * 1e6), 16777619) >>> 0;
      console.log(JSON.stringify({ isa: nb.native.isa(), err: e / m, hash: h }));`;
    const hashes: number[] = [];
    for (const isa of [native!.isa(), 'avx2', 'scalar']) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        cwd: new URL('../..', import.meta.url).pathname, env: { ...process.env, DQLORA_CPU_ISA: isa }, encoding: 'utf8',
      });
      assert.equal(r.status, 0, r.stderr);
      const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { isa: string; err: number; hash: number };
      if (isa === 'avx2' && native!.isa() === 'scalar') continue; // machine without AVX2
      assert.equal(out.isa, isa);
      assert.ok(out.err < AGREE, `${isa}: ${out.err}`);
      hashes.push(out.hash);
    }
    // The elementwise kernels are one source compiled per ISA with no FMA contraction: the same bits on every ISA.
    assert.ok(hashes.every((h) => h === hashes[0]), `elementwise results differ between ISAs: ${hashes.join(', ')}`);
  });

  it('QLoRA training steps (dropout, checkpointing) give the same LoRA bits on 1 and 2 threads', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-native-det-'));
    try {
      writeRandomLlama(dir, { hiddenSize: 64, intermediateSize: 176, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: 300,
        maxPositionEmbeddings: 128, tieWordEmbeddings: true, ropeTheta: 10000, rmsNormEps: 1e-5, embedStd: 0.125 }, 3);
      const [B, T, V] = [4, 48, 300];
      const data = Array.from({ length: 3 * B }, (_, i) => {
        const ids = randInt(T - (i % 5), 150 + i, 0, V);
        return { inputIds: ids, labels: ids.slice(), sourceIndex: i };
      });
      const train = (threads: number): Float32Array[] => {
        const be = createCpuBackend({ native: true, threads });
        const stage = loadStage(be, dir, fullModelSpec(loadModelConfig(dir)), {
          lora: { r: 8, alpha: 16, dropout: 0.1, useRslora: false, targetModules: 'all-linear' }, seed: 4, gradientCheckpointing: true });
        const tr = new Trainer(be, [stage], data, { epochs: 1, microBatchSize: B, gradAccum: 1, replicas: 1, lr: 1e-3, schedule: 'constant',
          warmupSteps: 0, weightDecay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1, seed: 5, padId: 0 }, { configHash: '', dataHash: '' });
        for (let i = 0; i < 3; i++) tr.step();
        return stage.loraParams().flatMap((p) => [p.A, p.B].map((t) => cpuData(t).slice()));
      };
      const a = train(1), b = train(2);
      assert.equal(a.length, b.length);
      assert.ok(a.filter((_, i) => i % 2 === 1).every((x) => x.some((v) => v !== 0)), 'every LoRA B (zero at init) was trained');
      a.forEach((x, i) => assert.deepEqual(new Uint32Array(x.buffer), new Uint32Array(b[i].buffer), `LoRA tensor ${i}`));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('bad arguments throw instead of touching memory out of bounds', () => {
    const a = new Float32Array(6), c = new Float32Array(4);
    assert.throws(() => native!.sgemm(false, false, 2, 2, 3, 1, a, 3, new Float32Array(5), 2, 0, c, 2, 1), RangeError);
    assert.throws(() => native!.sgemm(false, false, 2, 2, 3, 1, a, 3, new Float64Array(6) as unknown as Float32Array, 2, 0, c, 2, 1), TypeError);
  });
});
