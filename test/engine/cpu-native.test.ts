// The native addon against the TypeScript kernels on shapes big enough to take the blocked, multithreaded paths
// (edge tiles, several KC blocks, skinny outputs), and bit-identical results for 1 vs 2 threads. Skipped when
// the addon is not built (DQLORA_CPU_NATIVE=0 or no compiler). Agreement bound: 1e-5 norm-relative — both
// compute float32 products; TS sums in float64, native in float32 with FMA, so they differ by float32 roundoff
// of K-term sums (K ≤ 4000 here: ~1e-6).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createCpuBackend, cpuData, type CpuBackend } from '../../worker/engine/cpu.ts';
import { loadCpuNative } from '../../worker/engine/cpu/native.ts';
import type { Tensor } from '../../worker/engine/backend.ts';
import { rand, randInt, randomNf4, relErr } from './helpers.ts';

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
    for (const [M, N, K] of [[300, 520, 300], [131, 256, 1100], [37, 1000, 64], [2, 3000, 17]]) {
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
    const key = { p: 0.1, k0: 0xdeadbeef, k1: 7, stream: 3, rowSample: randInt(50, 10, 0, 1 << 30), rowPos: randInt(50, 11, 0, 4096) };
    assert.deepEqual(Array.from(cpuData(n2.dropout(up(n2, xs, [50, 300]), key))), Array.from(cpuData(ts.dropout(up(ts, xs, [50, 300]), key))));
  });

  it('the AVX2 and scalar kernels (forced with DQLORA_CPU_ISA) agree with the TypeScript kernels', () => {
    const script = `
      import { createCpuBackend, cpuData } from './worker/engine/cpu.ts';
      const ts = createCpuBackend({ native: false }), nb = createCpuBackend({ threads: 2 });
      const M = 77, N = 90, K = 300, a = new Float32Array(M * K).map((_, i) => Math.sin(i)), b = new Float32Array(K * N).map((_, i) => Math.cos(i * 0.7));
      const r = [ts, nb].map((be) => cpuData(be.matmul(be.upload(a, [M, K]), be.upload(b, [N, K]), { transB: true })));
      let e = 0, m = 0; for (let i = 0; i < r[0].length; i++) { e = Math.max(e, Math.abs(r[0][i] - r[1][i])); m = Math.max(m, Math.abs(r[0][i])); }
      console.log(JSON.stringify({ isa: nb.native.isa(), err: e / m }));`;
    for (const isa of ['avx2', 'scalar']) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        cwd: new URL('../..', import.meta.url).pathname, env: { ...process.env, DQLORA_CPU_ISA: isa }, encoding: 'utf8',
      });
      assert.equal(r.status, 0, r.stderr);
      const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { isa: string; err: number };
      if (isa === 'avx2' && native!.isa() === 'scalar') continue; // machine without AVX2
      assert.equal(out.isa, isa);
      assert.ok(out.err < AGREE, `${isa}: ${out.err}`);
    }
  });

  it('bad arguments throw instead of touching memory out of bounds', () => {
    const a = new Float32Array(6), c = new Float32Array(4);
    assert.throws(() => native!.sgemm(false, false, 2, 2, 3, 1, a, 3, new Float32Array(5), 2, 0, c, 2, 1), RangeError);
    assert.throws(() => native!.sgemm(false, false, 2, 2, 3, 1, a, 3, new Float64Array(6) as unknown as Float32Array, 2, 0, c, 2, 1), TypeError);
  });
});
