// Every cpu backend op, forward against a float64 reference and backward against central finite differences
// (float64) of the scalar loss L = Σ out · R with a random R. Runs once on the TypeScript kernels and once on
// the native addon when it is built.
//
// Tolerances (norm-relative, max|err| / max|ref|): the backend computes in float32 (unit roundoff 6e-8); sums
// of ≤ 100 terms and a few chained ops stay below ~1e-6, so forward checks use 1e-5. Finite differences in
// float64 with h = 1e-6 have truncation error ~h² and cancellation error ~1e-16/h ≈ 1e-10, so the gap to the
// analytic float32 backward is float32 roundoff again: backward checks use 1e-4 (softmax/exp chains).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createCpuBackend, cpuData, type CpuBackend } from '../../core/engine/cpu.ts';
import { loadCpuNative } from '../../core/engine/cpu/native.ts';
import { philox4x32, u32ToUnit } from '../../common/rng.ts';
import { BackendError, ShapeError } from '../../common/errors.ts';
import {
  attentionRef, crossEntropyRef, dequantDense, dot, matmulRef, numGrad, rand, randInt, randomNf4, relErr, rmsnormRef, ropeRef, swigluRef,
} from './helpers.ts';

const FWD = 1e-5, BWD = 1e-4;

const variants: { name: string; make: () => CpuBackend }[] = [{ name: 'ts', make: () => createCpuBackend({ native: false }) }];
if (loadCpuNative()) variants.push({ name: 'native', make: () => createCpuBackend({ native: true, threads: 2 }) });

for (const { name, make } of variants) {
  describe(`cpu backend (${name} kernels)`, () => {
    const be = make();
    it(`uses the ${name} kernels`, () => assert.equal(be.native !== null, name === 'native'));

    it('matmul: all transpose combinations, alpha and accumulate match float64', () => {
      for (const [M, N, K] of [[5, 7, 9], [13, 33, 17], [1, 1, 1], [26, 40, 3]]) {
        for (const transA of [false, true]) for (const transB of [false, true]) {
          const a = rand(M * K, M + K), b = rand(K * N, N * 7 + K);
          const A = be.upload(a, transA ? [K, M] : [M, K]), B = be.upload(b, transB ? [N, K] : [K, N]);
          const ref = matmulRef(a, b, M, N, K, transA, transB);
          const c = be.matmul(A, B, { transA, transB, alpha: 0.5 });
          assert.deepEqual(c.shape, [M, N]);
          assert.ok(relErr(cpuData(c), ref.map((x) => 0.5 * x)) < FWD, `alpha ${M}x${N}x${K} ${transA} ${transB}`);
          const init = rand(M * N, 99);
          const out = be.upload(init, [M, N]);
          be.matmul(A, B, { transA, transB, out, accumulate: true });
          assert.ok(relErr(cpuData(out), ref.map((x, i) => x + init[i])) < FWD, `accumulate ${transA} ${transB}`);
          const out2 = be.upload(new Float32Array(M * N).fill(NaN), [M, N]);
          be.matmul(A, B, { transA, transB, out: out2 }); // overwrite ignores old contents, even NaN
          assert.ok(relErr(cpuData(out2), ref) < FWD);
          for (const t of [A, B, c, out, out2]) be.free(t);
        }
      }
    });

    it('matmul: leading dims of a fold into rows; inner-dim mismatch is a ShapeError', () => {
      const a = rand(2 * 3 * 4, 1), b = rand(4 * 5, 2);
      const c = be.matmul(be.upload(a, [2, 3, 4]), be.upload(b, [4, 5]));
      assert.deepEqual(c.shape, [2, 3, 5]);
      assert.ok(relErr(cpuData(c), matmulRef(a, b, 6, 5, 4, false, false)) < FWD);
      assert.throws(() => be.matmul(be.upload(a, [6, 4]), be.upload(b, [5, 4])), ShapeError);
    });

    for (const double of [false, true]) {
      it(`nf4Linear / nf4LinearBackward equal the dense dequantized weight${double ? ' (double quant)' : ''}`, () => {
        const [O, I, N] = [13, 67, 6]; // odd `in`: rows start mid-byte and mid-block
        const w = randomNf4(O, I, 5 + (double ? 1 : 0), { double });
        const dense = dequantDense(w);
        const q = be.uploadNf4(w);
        assert.deepEqual(Array.from(cpuData(be.dequantize(q))), Array.from(dense), 'dequantize is exact');
        const x = rand(N * I, 7), bias = rand(O, 8);
        const y = be.nf4Linear(be.upload(x, [N, I]), q, be.upload(bias, [O]));
        const ref = matmulRef(x, dense, N, O, I, false, true).map((v, i) => v + bias[i % O]);
        assert.ok(relErr(cpuData(y), ref) < FWD);
        const dy = rand(N * O, 9);
        const dx = be.nf4LinearBackward(be.upload(dy, [N, O]), q);
        assert.deepEqual(dx.shape, [N, I]);
        assert.ok(relErr(cpuData(dx), matmulRef(dy, dense, N, I, O, false, false)) < FWD);
        be.freeQuantized(q);
        assert.throws(() => be.nf4Linear(be.upload(x, [N, I]), q), BackendError);
      });
    }

    it('nf4Linear: a weight whose sizes do not fit its shape is a ShapeError', () => {
      const w = randomNf4(4, 8, 3);
      assert.throws(() => be.uploadNf4({ ...w, packed: w.packed.subarray(1) }), ShapeError);
      assert.throws(() => be.uploadNf4({ ...w, absmax: new Float32Array(7) }), ShapeError);
    });

    it('rmsnorm forward matches float64; backward matches finite differences', () => {
      const [N, H, eps] = [4, 10, 1e-5];
      const x = rand(N * H, 11), w = rand(H, 12, 0.5, 1.5), R = rand(N * H, 13);
      const X = be.upload(x, [N, H]), W = be.upload(w, [H]);
      const { y, rstd } = be.rmsnorm(X, W, eps);
      assert.ok(relErr(cpuData(y), rmsnormRef(x, w, N, H, eps)) < FWD);
      const dx = be.rmsnormBackward(be.upload(R, [N, H]), X, W, rstd);
      const g = numGrad((xx) => dot(rmsnormRef(xx, w, N, H, eps), R), x);
      assert.ok(relErr(cpuData(dx), g) < BWD, `rmsnorm dx err ${relErr(cpuData(dx), g)}`);
    });

    it('rope: HF rotate_half values (base 10000, partial rotary), inverse undoes forward, inverse is the backward', () => {
      const [N, nh, D] = [5, 3, 8];
      for (const rd of [8, 4]) {
        const half = rd / 2;
        const invFreq = Float32Array.from({ length: half }, (_, i) => 1 / Math.pow(10000, (2 * i) / rd));
        const x = rand(N * nh * D, 21), pos = Int32Array.from([0, 1, 2, 7, 100]);
        const X = be.upload(x, [N, nh, D]), P = be.upload(pos, [N]), F = be.upload(invFreq, [half]);
        const y = be.rope(X, P, F, { rotaryDim: rd });
        assert.ok(relErr(cpuData(y), ropeRef(x, pos, invFreq, N, nh, D, rd, 1, false)) < FWD);
        const back = be.rope(y, P, F, { rotaryDim: rd, inverse: true });
        assert.ok(relErr(cpuData(back), x) < FWD);
        // Backward with mscale: the gradient of Σ rope(x)·R is rope(R, inverse).
        const R = rand(N * nh * D, 22);
        const dx = be.rope(be.upload(R, [N, nh, D]), P, F, { rotaryDim: rd, mscale: 1.3, inverse: true });
        const g = numGrad((xx) => dot(ropeRef(xx, pos, invFreq, N, nh, D, rd, 1.3, false), R), x);
        assert.ok(relErr(cpuData(dx), g) < BWD);
      }
    });

    it('attention: GQA, causal, key padding, fully padded rows → zeros; backward matches finite differences', () => {
      const d = { B: 2, T: 5, Hq: 4, Hk: 2, D: 8 }, scale = 1 / Math.sqrt(8);
      const nq = d.B * d.T * d.Hq * d.D, nk = d.B * d.T * d.Hk * d.D;
      const q = rand(nq, 31, -2, 2), k = rand(nk, 32, -2, 2), v = rand(nk, 33), R = rand(nq, 34);
      // batch 0 right-padded; batch 1 left-padded so its queries 0 and 1 see no real key.
      const mask = Int32Array.from([1, 1, 1, 1, 0, 0, 0, 1, 1, 1]);
      const Q = be.upload(q, [d.B, d.T, d.Hq, d.D]), K = be.upload(k, [d.B, d.T, d.Hk, d.D]), V = be.upload(v, [d.B, d.T, d.Hk, d.D]);
      const Mk = be.upload(mask, [d.B, d.T]);
      const saved = be.attention(Q, K, V, Mk, scale);
      const ref = attentionRef(q, k, v, mask, d, scale);
      assert.ok(relErr(cpuData(saved.out), ref) < FWD);
      const o = cpuData(saved.out), rowLen = d.Hq * d.D;
      for (const t of [0, 1]) for (let j = 0; j < rowLen; j++) assert.equal(o[(d.T + t) * rowLen + j], 0);
      // causality: changing a later key/value does not change earlier outputs
      const k2 = k.slice(); k2[((0 * d.T + 3) * d.Hk + 1) * d.D] += 5;
      const out2 = cpuData(be.attention(Q, be.upload(k2, K.shape), V, Mk, scale).out);
      for (let i = 0; i < 3 * rowLen; i++) assert.equal(out2[i], o[i]);

      const { dq, dk, dv } = be.attentionBackward(be.upload(R, Q.shape), Q, K, V, Mk, saved, scale);
      const gq = numGrad((x) => dot(attentionRef(x, k, v, mask, d, scale), R), q);
      const gk = numGrad((x) => dot(attentionRef(q, x, v, mask, d, scale), R), k);
      const gv = numGrad((x) => dot(attentionRef(q, k, x, mask, d, scale), R), v);
      assert.ok(relErr(cpuData(dq), gq) < BWD, `dq ${relErr(cpuData(dq), gq)}`);
      assert.ok(relErr(cpuData(dk), gk) < BWD, `dk ${relErr(cpuData(dk), gk)}`);
      assert.ok(relErr(cpuData(dv), gv) < BWD, `dv ${relErr(cpuData(dv), gv)}`);
    });

    it('swiglu forward matches float64; backward matches finite differences', () => {
      const n = 24, g = rand(n, 41, -4, 4), u = rand(n, 42), R = rand(n, 43);
      const G = be.upload(g, [4, 6]), U = be.upload(u, [4, 6]);
      assert.ok(relErr(cpuData(be.swiglu(G, U)), swigluRef(g, u)) < FWD);
      const { dgate, dup } = be.swigluBackward(be.upload(R, [4, 6]), G, U);
      assert.ok(relErr(cpuData(dgate), numGrad((x) => dot(swigluRef(x, u), R), g)) < BWD);
      assert.ok(relErr(cpuData(dup), numGrad((x) => dot(swigluRef(g, x), R), u)) < BWD);
    });

    it('dropout: p = 0 is identity; mask bits equal an independent Philox evaluation; same key, same mask; rate ≈ p', () => {
      const [N, C] = [64, 512];
      const x = rand(N * C, 51, 0.5, 1.5), X = be.upload(x, [N, C]);
      const rowSample = randInt(N, 52, 0, 1000), rowPos = Int32Array.from({ length: N }, (_, i) => i % 17);
      const key = { p: 0.3, k0: 0x12345678, k1: 0x9abcdef0, stream: 37, rowSample, rowPos };
      assert.deepEqual(Array.from(cpuData(be.dropout(X, { ...key, p: 0 }))), Array.from(x));
      const y = cpuData(be.dropout(X, key));
      const w = new Uint32Array(4), sc = Math.fround(1 / 0.7);
      let dropped = 0;
      for (let n = 0; n < N; n++) for (let j = 0; j < C; j++) {
        philox4x32(j, rowPos[n], rowSample[n], 37, 0x12345678, 0x9abcdef0, w);
        const keep = u32ToUnit(w[0]) >= 0.3;
        assert.equal(y[n * C + j], keep ? Math.fround(x[n * C + j] * sc) : 0);
        if (!keep) dropped++;
      }
      assert.ok(Math.abs(dropped / (N * C) - 0.3) < 0.015, `rate ${dropped / (N * C)}`); // 6σ
      assert.deepEqual(Array.from(cpuData(be.dropout(X, key))), Array.from(y), 'same key → same mask');
      assert.notDeepEqual(Array.from(cpuData(be.dropout(X, { ...key, stream: 38 }))), Array.from(y));
    });

    it('crossEntropy: ignores −100, sums losses, counts targets, gradient and in-place gradient', () => {
      const [N, V] = [6, 11];
      const x = rand(N * V, 61, -3, 3), t = Int32Array.from([3, -100, 0, 10, -100, 7]);
      const X = be.upload(x, [N, V]), Tg = be.upload(t, [N]);
      const r = be.crossEntropy(X, Tg);
      assert.equal(r.count, 4);
      assert.equal(r.dlogits, undefined);
      assert.ok(Math.abs(r.lossSum - crossEntropyRef(x, t, N, V)) / crossEntropyRef(x, t, N, V) < FWD);
      const g = be.crossEntropy(X, Tg, { gradScale: 0.25 });
      const fd = numGrad((xx) => 0.25 * crossEntropyRef(xx, t, N, V), x);
      assert.ok(relErr(cpuData(g.dlogits!), fd) < BWD);
      for (let j = 0; j < V; j++) assert.equal(cpuData(g.dlogits!)[V + j], 0, 'ignored row has zero gradient');
      assert.deepEqual(Array.from(cpuData(X)), Array.from(x), 'not in place: logits untouched');
      const ip = be.crossEntropy(X, Tg, { gradScale: 0.25, inPlace: true });
      assert.equal(ip.dlogits, X);
      assert.deepEqual(Array.from(cpuData(X)), Array.from(cpuData(g.dlogits!)));
      assert.equal(ip.lossSum, g.lossSum);
      assert.throws(() => be.crossEntropy(X, be.upload(Int32Array.from([3, 11, 0, 0, 0, 0]), [N])), ShapeError);
      assert.throws(() => be.crossEntropy(X, be.upload(Int32Array.from([3, -1, 0, 0, 0, 0]), [N])), ShapeError);
    });

    it('adamw: three steps with weight decay match a float64 evaluation of torch\'s formula', () => {
      const n = 50, h = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1 };
      const p0 = rand(n, 71), P = be.upload(p0, [n]), M = be.zeros([n]), Vt = be.zeros([n]);
      const p = Float64Array.from(p0), m = new Float64Array(n), v = new Float64Array(n);
      for (let step = 1; step <= 3; step++) {
        const g = rand(n, 72 + step);
        be.adamw(P, be.upload(g, [n]), M, Vt, { ...h, step });
        for (let i = 0; i < n; i++) {
          p[i] *= 1 - h.lr * h.weightDecay;
          m[i] = h.beta1 * m[i] + (1 - h.beta1) * g[i];
          v[i] = h.beta2 * v[i] + (1 - h.beta2) * g[i] * g[i];
          const bc1 = 1 - h.beta1 ** step, bc2 = 1 - h.beta2 ** step;
          p[i] -= (h.lr / bc1) * m[i] / (Math.sqrt(v[i]) / Math.sqrt(bc2) + h.eps);
        }
      }
      // float32 storage of p (|p| ≤ 1) bounds the error near 1e-7 of |p| per step.
      assert.ok(relErr(cpuData(P), p) < 1e-6, `p ${relErr(cpuData(P), p)}`);
      assert.ok(relErr(cpuData(M), m) < 1e-6);
      assert.ok(relErr(cpuData(Vt), v) < 1e-5);
    });

    it('axpy, scale, sumSquares, sumRows', () => {
      const a = rand(12, 81), b = rand(12, 82);
      const A = be.upload(a, [3, 4]);
      be.axpy(A, be.upload(b, [3, 4]), -2);
      assert.ok(relErr(cpuData(A), a.map((x, i) => x - 2 * b[i])) < FWD);
      be.scale(A, 3);
      assert.ok(relErr(cpuData(A), a.map((x, i) => 3 * (x - 2 * b[i]))) < FWD);
      assert.ok(Math.abs(be.sumSquares(be.upload(a, [12])) - dot(a, a)) < 1e-12);
      const s = cpuData(be.sumRows(be.upload(a, [3, 4])));
      assert.deepEqual(Array.from(s), [0, 1, 2, 3].map((j) => Math.fround(a[j] + a[4 + j] + a[8 + j])));
    });

    it('embedding gathers rows; an id outside the vocabulary is a ShapeError naming it', () => {
      const table = rand(5 * 3, 91);
      const e = cpuData(be.embedding(be.upload(Int32Array.from([4, 0, 4]), [3]), be.upload(table, [5, 3])));
      assert.deepEqual(Array.from(e), [...table.slice(12, 15), ...table.slice(0, 3), ...table.slice(12, 15)]);
      const before = be.memoryInUse();
      assert.throws(() => be.embedding(be.upload(Int32Array.from([1, 5]), [2]), be.upload(table, [5, 3])), /token id 5 at position 1/);
      assert.throws(() => be.embedding(be.upload(Int32Array.from([-1]), [1]), be.upload(table, [5, 3])), ShapeError);
      assert.ok(be.memoryInUse() > before); // the uploads above are still live, the failed output is not
    });
  });
}

describe('cpu backend memory bookkeeping', () => {
  it('freed float32 buffers are reused: zeros() is zero again, the old tensor stays dead, memoryInUse counts live tensors only', () => {
    for (const native of [false, true]) {
      const be = createCpuBackend({ native });
      const n = 5000;
      const a = be.upload(rand(n, 201), [50, 100]);
      const buf = cpuData(a).buffer;
      be.free(a);
      assert.equal(be.memoryInUse(), 0);
      const z = be.zeros([100, 50]);
      assert.equal(cpuData(z).buffer, buf, 'same length → the freed buffer comes back');
      assert.ok(cpuData(z).every((v) => v === 0), 'zeros() clears a reused buffer');
      assert.throws(() => cpuData(a), BackendError, 'the freed tensor does not see its buffer again');
      assert.equal(be.memoryInUse(), n * 4);
      // An op output that reuses a dirty buffer is fully written.
      const x = be.upload(rand(n, 202), [n]);
      be.free(z);
      const y = be.upload(rand(n, 203), [n]);
      const s = be.swiglu(x, y);
      const ref = createCpuBackend({ native: false, reuseBytes: 0 });
      assert.equal(s.size, n);
      assert.ok(relErr(cpuData(s), cpuData(ref.swiglu(ref.upload(rand(n, 202), [n]), ref.upload(rand(n, 203), [n])))) < 1e-5);
      // Small buffers and reuseBytes: 0 are never reused; views and double frees are ignored.
      const off = createCpuBackend({ native, reuseBytes: 0 });
      const b = off.zeros([n]), bb = cpuData(b).buffer;
      off.free(b); off.free(b);
      assert.notEqual(cpuData(off.zeros([n])).buffer, bb);
      const v = be.rows(be.zeros([2, n]), 0, 1);
      be.free(v);
      assert.equal(cpuData(v).length, n);
    }
  });

  it('downloadAsync resolves to download\'s values (a copy, as of the call); a dead tensor rejects instead of throwing', async () => {
    const be = createCpuBackend({ native: false });
    const t = be.upload(Float32Array.from([1, 2, 3]), [3]);
    const p = be.downloadAsync(t);
    be.scale(t, 2);
    assert.deepEqual(await p, Float32Array.from([1, 2, 3]));
    assert.deepEqual(await be.downloadAsync(be.upload(Int32Array.from([7, -1]), [2])), Int32Array.from([7, -1]));
    be.free(t);
    const dead = be.downloadAsync(t);
    await assert.rejects(dead, BackendError);
  });

  it('raw bf16 bits: upload widens them exactly into the f32 activation; downloadActAsync gives float32 back', async () => {
    const be = createCpuBackend({ native: false });
    const bits = Uint16Array.from([0x3f80, 0xc040, 0x0001, 0x7f80, 0x8000, 0x4049]); // 1, -3, smallest subnormal, +inf, -0, 3.140625
    const want = Float32Array.from([1, -3, 2 ** -133, Infinity, -0, 3.140625]);
    const t = be.upload(bits, [2, 3], 'act');
    assert.equal(t.dtype, 'f32');
    const got = await be.downloadActAsync(t);
    assert.ok(got instanceof Float32Array);
    assert.deepEqual(got, want);
    // into memory the caller supplies (a reused array: stale contents are overwritten whole)
    const mem = new Float32Array(6).fill(7).buffer;
    const asked: number[] = [];
    const into = await be.downloadActAsync(t, (bytes) => { asked.push(bytes); return mem; });
    assert.deepEqual(asked, [24]);
    assert.equal(into.buffer, mem);
    assert.deepEqual(into, want);
    assert.throws(() => be.upload(bits, [6]), /raw bf16 bits, for dtype 'bf16' or 'act'/);
    assert.throws(() => be.upload(bits, [6], 'f32'), /raw bf16 bits/);
  });

  it('memoryInUse counts live tensors and NF4 weights; free releases; views share storage', () => {
    const be = createCpuBackend({ native: false });
    assert.equal(be.memoryInUse(), 0);
    const a = be.zeros([4, 8]);
    const b = be.upload(Int32Array.from([1, 2, 3]), [3]);
    assert.equal(be.memoryInUse(), 4 * 8 * 4 + 3 * 4);
    const q = be.uploadNf4(randomNf4(4, 64, 1));
    const qBytes = q.bytes;
    assert.ok(qBytes >= 128 + 4 * 4, 'packed codes + absmax');
    assert.equal(be.memoryInUse(), 4 * 8 * 4 + 12 + qBytes);
    // rows view: writes land in the parent; free on the view is a no-op
    const r = be.rows(a, 1, 3);
    assert.deepEqual(r.shape, [2, 8]);
    be.matmul(be.upload(new Float32Array([1, 2]), [2, 1]), be.upload(new Float32Array(8).fill(1), [1, 8]), { out: r });
    assert.deepEqual(Array.from(cpuData(a)).slice(8, 24), [...new Array(8).fill(1), ...new Array(8).fill(2)]);
    const live = be.memoryInUse();
    be.free(r);
    assert.equal(be.memoryInUse(), live);
    be.free(a);
    assert.throws(() => cpuData(r), BackendError, 'the view dies with its parent');
    assert.throws(() => be.scale(a, 2), BackendError, 'use after free');
    be.free(a); // double free is harmless
    be.free(b);
    be.freeQuantized(q);
    assert.equal(be.memoryInUse(), live - 4 * 8 * 4 - 12 - qBytes);
    const x = be.zeros([2, 6]);
    const y = be.reshape(x, [3, 4]);
    assert.throws(() => be.reshape(x, [5]), ShapeError);
    be.free(y);
    assert.throws(() => cpuData(x), BackendError, 'reshape shares storage');
    assert.deepEqual([be.actDtype, be.zeros([1], 'act').dtype, be.zeros([1], 'bf16').dtype], ['f32', 'f32', 'f32']);
  });
});
