// Float64 references and numeric helpers for the engine tests. Everything here is the "obviously correct"
// version of an op: plain loops in float64, no blocking, no tricks.

import { CounterRng, mixKey } from '../../common/rng.ts';
import type { Nf4Weight } from '../../core/engine/backend.ts';

/** Deterministic uniform values in [lo, hi). */
export function rand(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const r = new CounterRng(mixKey(seed, 0x7e57), mixKey(n, 1));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = lo + (hi - lo) * r.next();
  return out;
}

export function randInt(n: number, seed: number, lo: number, hi: number): Int32Array {
  const r = new CounterRng(mixKey(seed, 0x1a7), mixKey(n, 2));
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) out[i] = lo + r.int(hi - lo);
  return out;
}

/** max |a − b| / max |b| (norm-relative error; b is the reference). */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= num)) num = d; // NaN propagates
    den = Math.max(den, Math.abs(b[i]));
  }
  return den === 0 ? num : num / den;
}

/** Central finite differences of f at x, in float64. */
export function numGrad(f: (x: Float64Array) => number, x0: ArrayLike<number>, h = 1e-6): Float64Array {
  const x = Float64Array.from(x0), g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const xi = x[i];
    x[i] = xi + h; const fp = f(x);
    x[i] = xi - h; const fm = f(x);
    x[i] = xi;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** op(A) · op(B) in float64. */
export function matmulRef(a: ArrayLike<number>, b: ArrayLike<number>, M: number, N: number, K: number, transA: boolean, transB: boolean): Float64Array {
  const c = new Float64Array(M * N);
  for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) {
    let s = 0;
    for (let k = 0; k < K; k++) s += (transA ? a[k * M + i] : a[i * K + k]) * (transB ? b[j * K + k] : b[k * N + j]);
    c[i * N + j] = s;
  }
  return c;
}

export function rmsnormRef(x: ArrayLike<number>, w: ArrayLike<number>, N: number, H: number, eps: number): Float64Array {
  const y = new Float64Array(N * H);
  for (let n = 0; n < N; n++) {
    let ss = 0;
    for (let j = 0; j < H; j++) ss += x[n * H + j] ** 2;
    const r = 1 / Math.sqrt(ss / H + eps);
    for (let j = 0; j < H; j++) y[n * H + j] = x[n * H + j] * r * w[j];
  }
  return y;
}

/** HF rotate_half rope, float64 angles; inverse rotates by −θ. */
export function ropeRef(x: ArrayLike<number>, pos: ArrayLike<number>, invFreq: ArrayLike<number>, N: number, nh: number, D: number, rd: number, mscale: number, inverse: boolean): Float64Array {
  const y = Float64Array.from(x), half = rd / 2;
  for (let n = 0; n < N; n++) for (let h = 0; h < nh; h++) for (let i = 0; i < half; i++) {
    const o = (n * nh + h) * D, th = pos[n] * invFreq[i];
    const c = Math.cos(th) * mscale, s = (inverse ? -1 : 1) * Math.sin(th) * mscale;
    const x1 = x[o + i], x2 = x[o + i + half];
    y[o + i] = x1 * c - x2 * s;
    y[o + i + half] = x2 * c + x1 * s;
  }
  return y;
}

export interface Dims { B: number; T: number; Hq: number; Hk: number; D: number }

export function attentionRef(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, mask: ArrayLike<number>, d: Dims, scale: number): Float64Array {
  const { B, T, Hq, Hk, D } = d, out = new Float64Array(B * T * Hq * D), g = Hq / Hk;
  for (let b = 0; b < B; b++) for (let h = 0; h < Hq; h++) for (let t = 0; t < T; t++) {
    const kh = Math.floor(h / g), qo = ((b * T + t) * Hq + h) * D;
    const sc: number[] = [], idx: number[] = [];
    for (let s = 0; s <= t; s++) {
      if (!mask[b * T + s]) continue;
      let z = 0;
      for (let e = 0; e < D; e++) z += q[qo + e] * k[((b * T + s) * Hk + kh) * D + e];
      sc.push(z * scale); idx.push(s);
    }
    if (sc.length === 0) continue;
    const m = Math.max(...sc), ex = sc.map((z) => Math.exp(z - m)), sum = ex.reduce((a, c) => a + c, 0);
    for (let j = 0; j < idx.length; j++) for (let e = 0; e < D; e++) out[qo + e] += ex[j] / sum * v[((b * T + idx[j]) * Hk + kh) * D + e];
  }
  return out;
}

export function swigluRef(g: ArrayLike<number>, u: ArrayLike<number>): Float64Array {
  const h = new Float64Array(g.length);
  for (let i = 0; i < g.length; i++) h[i] = g[i] / (1 + Math.exp(-g[i])) * u[i];
  return h;
}

/** Sum of per-row cross-entropy losses (ignore −100). */
export function crossEntropyRef(x: ArrayLike<number>, t: ArrayLike<number>, N: number, V: number): number {
  let total = 0;
  for (let n = 0; n < N; n++) {
    if (t[n] === -100) continue;
    let m = -Infinity;
    for (let j = 0; j < V; j++) m = Math.max(m, x[n * V + j]);
    let s = 0;
    for (let j = 0; j < V; j++) s += Math.exp(x[n * V + j] - m);
    total += Math.log(s) + m - x[n * V + t[n]];
  }
  return total;
}

/** A random NF4 weight (random codes and scales; optionally double-quantized). */
export function randomNf4(out: number, inDim: number, seed: number, opts: { blocksize?: number; double?: boolean } = {}): Nf4Weight {
  const n = out * inDim, bs = opts.blocksize ?? 64, nb = Math.ceil(n / bs);
  const packed = Uint8Array.from(randInt(Math.ceil(n / 2), seed, 0, 256));
  const table = Float32Array.from([-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1]);
  if (!opts.double) {
    return { shape: [out, inDim], packed, blocksize: bs, quantMap: table, absmax: rand(nb, seed + 1, 0.01, 0.2), sourceDtype: 'float32' };
  }
  const dyn = rand(256, seed + 2, -1, 1).sort();
  return {
    shape: [out, inDim], packed, blocksize: bs, quantMap: table, sourceDtype: 'bfloat16',
    absmax: Uint8Array.from(randInt(nb, seed + 3, 0, 256)),
    nested: { absmax: rand(Math.ceil(nb / 256), seed + 4, 0.02, 0.05), quantMap: dyn, blocksize: 256, offset: Math.fround(0.1) },
  };
}

/** Independent dense dequantization of a host NF4 weight (spec §1.5 / §2), float32 [out, in]. */
export function dequantDense(w: Nf4Weight): Float32Array {
  const [o, i] = w.shape, n = o * i, out = new Float32Array(n);
  for (let k = 0; k < n; k++) {
    const byte = w.packed[k >> 1], code = k % 2 === 0 ? byte >> 4 : byte & 15;
    const b = Math.floor(k / w.blocksize);
    let s: number;
    if (w.nested) s = Math.fround(Math.fround(w.nested.quantMap[w.absmax[b]] * w.nested.absmax[Math.floor(b / w.nested.blocksize)]) + w.nested.offset);
    else s = w.absmax[b];
    out[k] = Math.fround(w.quantMap[code] * s);
  }
  return out;
}
