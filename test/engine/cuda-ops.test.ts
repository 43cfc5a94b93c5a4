// The cuda backend agrees with the cpu backend (the reference) op by op, on random inputs, within bf16
// tolerances (forward ≤ 1e-2, gradients ≤ 3e-2, norm-relative); NF4 quantization on the GPU gives the same
// bytes as the CPU; a 100-step training loop keeps device memory flat; CUDA errors become JS exceptions.
// Skipped as a whole (with the reason) where the addon is not built or no GPU is visible — CI has no GPU.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { Backend, Tensor } from '../../core/engine/backend.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { NULL_PTR, loadNative } from '../../core/engine/cuda/native.ts';
import { quantizeNf4 } from '../../core/engine/nf4.ts';
import { bf16ToF32, f32ToBf16 } from '../../common/halfprec.ts';
import { BackendError, ShapeError } from '../../common/errors.ts';
import { mixKey } from '../../common/rng.ts';
import { matmulRef, rand, randInt, relErr } from './helpers.ts';

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try {
  cuda = createCudaBackend();
} catch (e) {
  skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`;
}
const cpu = createCpuBackend();

/** Rounds to bf16 and back, so cpu and cuda see the same inputs. */
function bf(x: Float32Array): Float32Array {
  return bf16ToF32(f32ToBf16(x));
}
function dl(b: Backend, t: Tensor): Float32Array {
  return b.download(t) as Float32Array;
}
/** The same activation on both backends: bf16 on cuda, its f32 image on cpu. */
function both(x: Float32Array, shape: number[]): [Tensor, Tensor] {
  const r = bf(x);
  return [cuda!.upload(r, shape, 'act'), cpu.upload(r, shape, 'act')];
}
function close(name: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number): void {
  const e = relErr(got, want);
  assert.ok(e <= tol, `${name}: relative error ${e.toExponential(3)} > ${tol}`);
}

describe('cuda backend vs cpu backend', { skip }, () => {
  const g = (): CudaBackend => cuda!;

  it('uploads and downloads every dtype; bf16 rounds to nearest even', () => {
    const x = rand(1000, 1, -3, 3);
    assert.deepEqual(dl(g(), g().upload(x, [10, 100])), x);
    assert.deepEqual(dl(g(), g().upload(x, [1000], 'act')), bf(x));
    const ids = randInt(77, 2, -5, 1000);
    assert.deepEqual(g().download(g().upload(ids, [77])), ids);
    const u = new Uint8Array([0, 1, 255, 7, 128]);
    assert.deepEqual(g().download(g().upload(u, [5])), u);
    const z = g().zeros([3, 5], 'act');
    assert.deepEqual(dl(g(), z), new Float32Array(15));
    const v = g().rows(g().upload(x, [10, 100]), 3, 5);
    assert.deepEqual(dl(g(), v), x.subarray(300, 500));
  });

  it('downloadAsync: the values of download for every dtype, and [0]', async () => {
    const b = g();
    const x = rand(3000, 31, -3, 3);
    for (const t of [b.upload(x, [30, 100]), b.upload(x, [3000], 'act'), b.upload(randInt(77, 32, -5, 1000), [77]),
      b.upload(new Uint8Array([0, 1, 255, 7, 128]), [5]), b.rows(b.upload(x, [30, 100]), 3, 5), b.zeros([0])]) {
      const got = await b.downloadAsync(t);
      assert.deepEqual(got, b.download(t));
    }
  });

  it('raw bf16 bits: upload(Uint16Array, act) stores them as they are, downloadActAsync returns them untouched; f32 tensors come back as float32', async () => {
    const b = g();
    const x = rand(3000, 33, -3, 3);
    const viaF32 = b.upload(x, [30, 100], 'act');                // bf16 on cuda: RNE of x
    const bits = await b.downloadActAsync(viaF32);
    assert.ok(bits instanceof Uint16Array, 'a bf16 activation comes back as raw bits');
    assert.deepEqual(bits, f32ToBf16(x));
    const again = b.upload(bits, [30, 100], 'act');
    assert.deepEqual(b.download(again), b.download(viaF32));
    assert.deepEqual(b.download(again), bf16ToF32(bits));
    const f = b.upload(x, [3000], 'f32');
    assert.deepEqual(await b.downloadActAsync(f), x);
    // into memory the caller supplies (a reused array: stale contents are overwritten whole), both dtypes
    const asked: number[] = [];
    const stale = (bytes: number): ArrayBuffer => { asked.push(bytes); return new Uint8Array(bytes).fill(0xa5).buffer; };
    const bits2 = await b.downloadActAsync(viaF32, stale);
    assert.ok(bits2 instanceof Uint16Array);
    assert.deepEqual(bits2, f32ToBf16(x));
    assert.deepEqual(await b.downloadActAsync(f, stale), x);
    assert.deepEqual(asked, [6000, 12000]);
    // an array over shared memory (the all-reduce's gradient buckets) uploads as it is, offset included
    const shared = new Float32Array(new SharedArrayBuffer(4 * 3010), 40, 3000);
    shared.set(x);
    assert.deepEqual(b.download(b.upload(shared, [3000], 'f32')), x);
    assert.throws(() => b.upload(bits, [3000]), /raw bf16 bits/);
    assert.throws(() => b.upload(bits, [3000], 'f32'), /raw bf16 bits/);
  });

  it('downloadAsync: ordered after the work queued before it, a snapshot against later writes, and the JS thread keeps queueing kernels while it copies', async (t) => {
    const b = g();
    const n = 4096, K = 24;
    const a = b.upload(rand(n * n, 41), [n, n]), w = b.upload(rand(n * n, 42), [n, n]);
    const y = b.matmul(a, w, { alpha: 1 / 64 });
    const want = b.download(y); // synchronous: the reference bits
    const busy = (alpha = 1 / 64): void => { for (let k = 0; k < K; k++) b.matmul(a, w, { alpha, out: y }); };
    // How long K matmuls keep the GPU busy (queue + wait).
    b.synchronize();
    let t0 = performance.now();
    busy();
    b.synchronize();
    const gpuMs = performance.now() - t0;
    b.scale(y, 0);
    b.synchronize();

    busy();                                   // y is rewritten K times; the last write gives `want` again
    t0 = performance.now();
    const p = b.downloadAsync(y);             // must see the last of those writes...
    let settled = false;
    void p.then(() => { settled = true; });
    b.scale(y, 0);                            // ...and none of these later ones
    busy(1 / 32);
    const queueMs = performance.now() - t0;
    await new Promise((r) => setImmediate(r));
    const pendingWhileBusy = !settled;
    const got = await p;
    const resolvedMs = performance.now() - t0;
    t.diagnostic(`K=${K} f32 ${n}³ matmuls: GPU ${gpuMs.toFixed(1)} ms; downloadAsync + scale + K matmuls queued in ${queueMs.toFixed(2)} ms; the 64 MiB copy resolved after ${resolvedMs.toFixed(1)} ms`);
    assert.deepEqual(got, want, 'downloadAsync did not return y as of the call');
    b.synchronize();
    assert.ok(pendingWhileBusy, 'the promise resolved before the queued work could have finished');
    // Queueing the copy and K more matmuls took a fraction of the GPU time: the JS thread never waited.
    assert.ok(queueMs < gpuMs / 2, `queueing took ${queueMs.toFixed(1)} ms, the GPU work ${gpuMs.toFixed(1)} ms`);
    const after = b.download(y) as Float32Array;
    close('y after the later matmuls', after, (want as Float32Array).map((v) => 2 * v), 1e-6);
    for (const t of [a, w, y]) b.free(t);
  });

  it('matmul: every transpose combination, bf16 and f32, alpha, accumulate, mixed dtypes', () => {
    const M = 67, N = 45, K = 130;
    for (const [tA, tB] of [[false, false], [true, false], [false, true], [true, true]] as const) {
      const a = bf(rand(M * K, 10)), b = bf(rand(K * N, 11));
      const ref = matmulRef(a, b, M, N, K, tA, tB);
      const ca = g().upload(a, tA ? [K, M] : [M, K], 'bf16'), cb = g().upload(b, tB ? [N, K] : [K, N], 'bf16');
      close(`bf16 ${tA}${tB}`, dl(g(), g().matmul(ca, cb, { transA: tA, transB: tB })), ref, 1e-2);
      const fa = g().upload(a, tA ? [K, M] : [M, K]), fb = g().upload(b, tB ? [N, K] : [K, N]);
      close(`f32 ${tA}${tB}`, dl(g(), g().matmul(fa, fb, { transA: tA, transB: tB, alpha: 0.5 })), ref.map((v) => v * 0.5), 1e-5);
      // accumulate into an existing out
      const out = g().upload(new Float32Array(M * N).fill(1), [M, N]);
      g().matmul(fa, fb, { transA: tA, transB: tB, out, accumulate: true });
      close(`accumulate ${tA}${tB}`, dl(g(), out), ref.map((v) => v + 1), 1e-5);
      // mixed bf16 × f32 (activations × LoRA weights) → f32
      const mixed = g().matmul(ca, fb, { transA: tA, transB: tB });
      assert.equal(mixed.dtype, 'f32');
      close(`mixed ${tA}${tB}`, dl(g(), mixed), ref, 1e-2);
    }
    // f32 × f32 accumulated into a bf16 out (LoRA branch added to a base output)
    const a = rand(8 * 16, 3), b = rand(16 * 4, 4);
    const out = g().upload(new Float32Array(32).fill(2), [8, 4], 'act');
    g().matmul(g().upload(a, [8, 16]), g().upload(b, [16, 4]), { out, accumulate: true });
    // (runs on bf16-rounded operands, as autocast: operand and output rounding together stay within 2e-2)
    close('f32→bf16 accumulate', dl(g(), out), matmulRef(a, b, 8, 4, 16, false, false).map((v) => v + 2), 2e-2);
    // leading dims flatten: x [2, 3, 16] · W [16, 5] → [2, 3, 5]
    const y = g().matmul(g().upload(rand(96, 5), [2, 3, 16]), g().upload(rand(80, 6), [16, 5]));
    assert.deepEqual([...y.shape], [2, 3, 5]);
    assert.throws(() => g().matmul(g().zeros([3, 4]), g().zeros([5, 6])), ShapeError);
  });

  it('NF4 quantize on the GPU gives the CPU bytes; dequantize and NF4 linear match', () => {
    const cases: { shape: [number, number]; bs: number; dq: boolean; zeroBlock?: boolean }[] = [
      { shape: [96, 130], bs: 64, dq: true },
      { shape: [33, 65], bs: 64, dq: true },      // odd element count, block crossing rows
      { shape: [256, 300], bs: 128, dq: true, zeroBlock: true },
      { shape: [40, 64], bs: 64, dq: false },
      { shape: [512, 520], bs: 64, dq: true },    // > 256 blocks: several nested blocks
    ];
    for (const c of cases) {
      const n = c.shape[0] * c.shape[1];
      const w = rand(n, 20 + n, -0.2, 0.2);
      for (let i = 0; i < n; i += 97) w[i] *= 10; // outliers
      if (c.zeroBlock) w.fill(0, 0, c.bs);
      const want = quantizeNf4(w, c.shape, { blocksize: c.bs, doubleQuant: c.dq });
      const got = g().quantizeNf4(w, c.shape, { blocksize: c.bs, doubleQuant: c.dq });
      assert.deepEqual(got.packed, want.packed, `packed codes ${c.shape}`);
      assert.deepEqual(got.absmax, want.absmax, `absmax ${c.shape}`);
      assert.deepEqual(got.nested?.absmax, want.nested?.absmax, `nested absmax ${c.shape}`);
      assert.equal(got.nested?.offset, want.nested?.offset);
      // dequantize: exact float32 agreement
      const qc = g().uploadNf4(want), qp = cpu.uploadNf4(want);
      assert.deepEqual(dl(g(), g().dequantize(qc)), dl(cpu, cpu.dequantize(qp)));
      // y = x · Wᵀ + b, dx = dy · W
      const rows = 37;
      const [xc, xp] = both(rand(rows * c.shape[1], 30), [rows, c.shape[1]]);
      const bias = rand(c.shape[0], 31);
      const yc = g().nf4Linear(xc, qc, g().upload(bias, [c.shape[0]]));
      close(`nf4Linear ${c.shape}`, dl(g(), yc), dl(cpu, cpu.nf4Linear(xp, qp, cpu.upload(bias, [c.shape[0]]))), 1e-2);
      const [dyc, dyp] = both(rand(rows * c.shape[0], 32), [rows, c.shape[0]]);
      close(`nf4LinearBackward ${c.shape}`, dl(g(), g().nf4LinearBackward(dyc, qc)), dl(cpu, cpu.nf4LinearBackward(dyp, qp)), 1e-2);
      g().freeQuantized(qc);
    }
  });

  it('axpy, scale, sumSquares, sumRows', () => {
    const a = rand(5000, 40), b = rand(5000, 41);
    const ca = g().upload(a, [50, 100]), cb = g().upload(b, [50, 100], 'act');
    g().axpy(ca, cb, -0.25);
    g().scale(ca, 3);
    const want = a.map((v, i) => (v - 0.25 * bf(b)[i]) * 3);
    close('axpy+scale', dl(g(), ca), want, 1e-6);
    let ss = 0;
    for (const v of want) ss += v * v;
    assert.ok(Math.abs(g().sumSquares(ca) - ss) / ss < 1e-5);
    const sr = dl(g(), g().sumRows(ca));
    const ref = new Float64Array(100);
    for (let i = 0; i < 5000; i++) ref[i % 100] += want[i];
    close('sumRows', sr, ref, 1e-5);
    const big = g().upload(rand(300 * 7, 42), [300, 7], 'act');
    close('sumRows bf16 many rows', dl(g(), g().sumRows(big)), dl(cpu, cpu.sumRows(cpu.upload(dl(g(), big), [300, 7]))), 1e-5);
  });

  it('embedding, rmsnorm and its backward, swiglu and its backward', () => {
    const V = 50, H = 96, N = 40;
    const table = bf(rand(V * H, 50));
    const ids = randInt(N, 51, 0, V);
    const ec = g().embedding(g().upload(ids, [N]), g().upload(table, [V, H], 'act'));
    assert.deepEqual(dl(g(), ec), dl(cpu, cpu.embedding(cpu.upload(ids, [N]), cpu.upload(table, [V, H]))));
    assert.throws(() => g().embedding(g().upload(new Int32Array([1, V]), [2]), g().upload(table, [V, H])), ShapeError);

    const [xc, xp] = both(rand(N * H, 52, -2, 2), [N, H]);
    const w = rand(H, 53, 0.5, 1.5);
    const rc = g().rmsnorm(xc, g().upload(w, [H]), 1e-5), rp = cpu.rmsnorm(xp, cpu.upload(w, [H]), 1e-5);
    close('rmsnorm y', dl(g(), rc.y), dl(cpu, rp.y), 1e-2);
    close('rmsnorm rstd', dl(g(), rc.rstd), dl(cpu, rp.rstd), 1e-5);
    const [dyc, dyp] = both(rand(N * H, 54), [N, H]);
    close('rmsnormBackward', dl(g(), g().rmsnormBackward(dyc, xc, g().upload(w, [H]), rc.rstd)), dl(cpu, cpu.rmsnormBackward(dyp, xp, cpu.upload(w, [H]), rp.rstd)), 3e-2);

    const [gc, gp] = both(rand(N * H, 55, -4, 4), [N, H]);
    const [uc, up] = both(rand(N * H, 56), [N, H]);
    close('swiglu', dl(g(), g().swiglu(gc, uc)), dl(cpu, cpu.swiglu(gp, up)), 1e-2);
    const sb = g().swigluBackward(dyc, gc, uc), sp = cpu.swigluBackward(dyp, gp, up);
    close('swiglu dgate', dl(g(), sb.dgate), dl(cpu, sp.dgate), 3e-2);
    close('swiglu dup', dl(g(), sb.dup), dl(cpu, sp.dup), 3e-2);
  });

  it('rope: forward, inverse (backward), partial rotary, mscale', () => {
    const N = 24, nh = 3;
    for (const [D, rd, ms] of [[64, 64, 1], [32, 16, 1.3]] as const) {
      const [xc, xp] = both(rand(N * nh * D, 60 + D), [N, nh, D]);
      const pos = randInt(N, 61, 0, 2000);
      const inv = Float32Array.from({ length: rd / 2 }, (_, i) => Math.pow(10000, (-2 * i) / rd));
      for (const inverse of [false, true]) {
        const yc = g().rope(xc, g().upload(pos, [N]), g().upload(inv, [rd / 2]), { rotaryDim: rd, mscale: ms, inverse });
        const yp = cpu.rope(xp, cpu.upload(pos, [N]), cpu.upload(inv, [rd / 2]), { rotaryDim: rd, mscale: ms, inverse });
        close(`rope D${D} rd${rd} inverse=${inverse}`, dl(g(), yc), dl(cpu, yp), 1e-2);
      }
    }
  });

  it('dropout: the same mask bits as the cpu backend (Philox counter layout)', () => {
    const N = 33, C = 257;
    const x = bf(rand(N * C, 70, 0.5, 1.5)); // nonzero, so y = 0 exactly where dropped
    const key = { p: 0.3, k0: mixKey(7), k1: mixKey(8), stream: 5, rowSample: randInt(N, 71, 0, 1 << 30), rowPos: randInt(N, 72, 0, 4096) };
    const yc = dl(g(), g().dropout(g().upload(x, [N, C], 'act'), key));
    const yp = dl(cpu, cpu.dropout(cpu.upload(x, [N, C]), key));
    let kept = 0;
    for (let i = 0; i < N * C; i++) {
      assert.equal(yc[i] === 0, yp[i] === 0, `mask differs at ${i}`);
      if (yp[i] !== 0) kept++;
    }
    assert.ok(kept > 0.6 * N * C && kept < 0.8 * N * C, `kept ${kept}`);
    close('dropout values', yc, yp, 1e-2);
    assert.deepEqual(dl(g(), g().dropout(g().upload(x, [N, C], 'act'), { ...key, p: 0 })), x);
  });

  it('cross-entropy: loss sum, count, dlogits (separate and in place), ignored rows, bad targets', () => {
    const N = 19, V = 3001;
    const logits = bf(rand(N * V, 80, -6, 6));
    const t = randInt(N, 81, 0, V);
    t[3] = -100; t[10] = -100;
    const lc = g().upload(logits, [N, V], 'act'), tc = g().upload(t, [N]);
    const rp = cpu.crossEntropy(cpu.upload(logits, [N, V]), cpu.upload(t, [N]), { gradScale: 0.5 });
    const rc = g().crossEntropy(lc, tc, { gradScale: 0.5 });
    assert.equal(rc.count, 17);
    assert.equal(rc.count, rp.count);
    assert.ok(Math.abs(rc.lossSum - rp.lossSum) / rp.lossSum < 1e-4, `${rc.lossSum} vs ${rp.lossSum}`);
    close('dlogits', dl(g(), rc.dlogits!), dl(cpu, rp.dlogits!), 3e-2);
    const ri = g().crossEntropy(lc, tc, { gradScale: 0.5, inPlace: true });
    assert.equal(ri.dlogits, lc);
    close('dlogits in place', dl(g(), lc), dl(cpu, rp.dlogits!), 3e-2);
    const noGrad = g().crossEntropy(g().upload(logits, [N, V], 'act'), tc);
    assert.equal(noGrad.dlogits, undefined);
    t[0] = V;
    assert.throws(() => g().crossEntropy(g().upload(logits, [N, V], 'act'), g().upload(t, [N])), ShapeError);
  });

  it('adamw: torch semantics, same as the cpu backend over several steps', () => {
    const n = 1000;
    const p0 = rand(n, 90), mk = (b: Backend) => ({ p: b.upload(p0, [n]), m: b.zeros([n], 'f32'), v: b.zeros([n], 'f32') });
    const sc = mk(g()), sp = mk(cpu);
    for (let step = 1; step <= 5; step++) {
      const grad = rand(n, 91 + step);
      const h = { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step };
      g().adamw(sc.p, g().upload(grad, [n]), sc.m, sc.v, h);
      cpu.adamw(sp.p, cpu.upload(grad, [n]), sp.m, sp.v, h);
    }
    close('adamw p', dl(g(), sc.p), dl(cpu, sp.p), 1e-5);
    close('adamw v', dl(g(), sc.v), dl(cpu, sp.v), 1e-4); // v: g² in f32, FMA order differs
  });

  it('causal GQA attention with key padding: forward and backward, D 16–128, T not a tile multiple', () => {
    for (const [B, T, Hq, Hk, D] of [[2, 100, 4, 2, 64], [1, 130, 2, 1, 128], [2, 64, 2, 2, 32], [1, 200, 8, 2, 16]] as const) {
      const mask = new Int32Array(B * T).fill(1);
      mask[0] = 0;                                  // sequence 0: query 0 has no valid key → zeros
      for (let t = T - 7; t < T; t++) mask[t] = 0;  // right padding of sequence 0
      if (B > 1) for (let t = 0; t < 5; t++) mask[T + t] = 0; // left padding of sequence 1
      const [qc, qp] = both(rand(B * T * Hq * D, 100 + D), [B, T, Hq, D]);
      const [kc, kp] = both(rand(B * T * Hk * D, 101 + D), [B, T, Hk, D]);
      const [vc, vp] = both(rand(B * T * Hk * D, 102 + D), [B, T, Hk, D]);
      const mc = g().upload(mask, [B, T]), mp = cpu.upload(mask, [B, T]);
      const scale = 1 / Math.sqrt(D);
      const sc = g().attention(qc, kc, vc, mc, scale), spp = cpu.attention(qp, kp, vp, mp, scale);
      const oc = dl(g(), sc.out), op = dl(cpu, spp.out);
      close(`attention out ${[B, T, Hq, Hk, D]}`, oc, op, 1e-2);
      for (let i = 0; i < Hq * D; i++) assert.equal(oc[i], 0, 'row with no valid key must be zero');
      const lc = dl(g(), sc.lse), lp = dl(cpu, spp.lse);
      for (let i = 0; i < lc.length; i++) if (Number.isFinite(lp[i])) assert.ok(Math.abs(lc[i] - lp[i]) < 2e-2, `lse ${i}: ${lc[i]} vs ${lp[i]}`);
      const [dc, dp] = both(rand(B * T * Hq * D, 103 + D), [B, T, Hq, D]);
      const gc = g().attentionBackward(dc, qc, kc, vc, mc, sc, scale);
      const gp = cpu.attentionBackward(dp, qp, kp, vp, mp, spp, scale);
      close(`attention dq ${[B, T, Hq, Hk, D]}`, dl(g(), gc.dq), dl(cpu, gp.dq), 3e-2);
      close(`attention dk ${[B, T, Hq, Hk, D]}`, dl(g(), gc.dk), dl(cpu, gp.dk), 3e-2);
      close(`attention dv ${[B, T, Hq, Hk, D]}`, dl(g(), gc.dv), dl(cpu, gp.dv), 3e-2);
    }
  });

  it('a 100-step NF4 + LoRA + attention + loss training loop keeps device memory flat', () => {
    const b = g();
    const B = 2, T = 64, H = 128, Hq = 2, D = 64, V = 300, r = 8;
    const q = b.uploadNf4(quantizeNf4(rand(H * H, 120, -0.1, 0.1), [H, H]));
    const loraA = b.upload(rand(r * H, 121, -0.05, 0.05), [r, H]), loraB = b.zeros([H, r], 'f32');
    const opt = [loraA, loraB].map((p) => ({ p, m: b.zeros(p.shape, 'f32'), v: b.zeros(p.shape, 'f32') }));
    const head = b.upload(rand(V * H, 122, -0.1, 0.1), [V, H], 'act');
    const mask = b.upload(new Int32Array(B * T).fill(1), [B, T]);
    const ids = b.upload(randInt(B * T, 123, 0, V), [B * T]);
    const targets = b.upload(randInt(B * T, 124, 0, V), [B * T]);
    const losses: number[] = [];
    let memAfter10 = 0;
    // The pool is shared with the tests before this one (their freed blocks stay cached): measure this loop's growth.
    b.releaseCache();
    const reservedBefore = b.poolStats().reserved;
    for (let step = 1; step <= 100; step++) {
      const x = b.embedding(ids, head);                                   // [N, H]
      const base = b.nf4Linear(x, q);                                     // [N, H]
      const h = b.matmul(x, loraA, { transB: true });                     // [N, r] f32
      b.matmul(h, loraB, { transB: true, out: base, accumulate: true, alpha: 2 });
      const qkv = b.reshape(base, [B, T, Hq, D]);
      const att = b.attention(qkv, qkv, qkv, mask, 1 / 8);
      const flat = b.reshape(att.out, [B * T, H]);
      const logits = b.matmul(flat, head, { transB: true });              // [N, V]
      const ce = b.crossEntropy(logits, targets, { gradScale: 1 / (B * T), inPlace: true });
      losses.push(ce.lossSum / ce.count);
      const dflat = b.matmul(logits, head);                               // [N, H]
      const g3 = b.attentionBackward(b.reshape(dflat, [B, T, Hq, D]), qkv, qkv, qkv, mask, att, 1 / 8);
      const dbase = b.reshape(g3.dq, [B * T, H]);
      b.axpy(dbase, g3.dk); b.axpy(dbase, g3.dv);
      const dB = b.matmul(dbase, h, { transA: true, alpha: 2 });          // [H, r]
      const dh = b.matmul(dbase, loraB, { alpha: 2 });                    // [N, r]
      const dA = b.matmul(dh, x, { transA: true });                       // [r, H]
      const dx = b.nf4LinearBackward(dbase, q);
      for (const [i, gr] of [dA, dB].entries()) b.adamw(opt[i].p, gr, opt[i].m, opt[i].v, { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step });
      for (const t of [x, base, h, att.out, att.lse, logits, dflat, g3.dq, g3.dk, g3.dv, dB, dh, dA, dx]) b.free(t);
      if (step === 10) memAfter10 = b.memoryInUse();
      if (step > 10) assert.equal(b.memoryInUse(), memAfter10, `memory in use grew at step ${step}`);
    }
    assert.ok(losses.every(Number.isFinite));
    assert.ok(losses[99] < losses[0], `loss went from ${losses[0]} to ${losses[99]}`);
    const grown = b.poolStats().reserved - reservedBefore;
    assert.ok(grown < 64 << 20, `the pool grew by ${grown} B over the loop`);
  });

  it('errors: use after free, another backend\'s tensor, and CUDA failures become exceptions with file:line', () => {
    const t = g().upload(rand(10, 1), [10]);
    g().free(t);
    assert.throws(() => g().download(t), BackendError);
    assert.throws(() => g().download(cpu.upload(rand(4, 1), [4])), BackendError);
    assert.throws(() => loadNative().alloc(2 ** 52), /cudaMalloc.*at runtime\.cu:\d+/);
    assert.throws(() => loadNative().convert(NULL_PTR, 7 as never, NULL_PTR, 0, 4), /dtype code 7.*at \w+\.cu:\d+/);
    // the process is still healthy
    assert.deepEqual(dl(g(), g().upload(new Float32Array([1, 2]), [2])), new Float32Array([1, 2]));
  });
});
