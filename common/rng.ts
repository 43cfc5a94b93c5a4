// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011), so any worker can reproduce any
// dropout mask or shuffle from (seed, epoch, step, sample, layer, ...) without shared state.
// The same function is implemented in the CUDA backend; both must give identical bits.

const M0 = 0xd2511f53, M1 = 0xcd9e8d57, W0 = 0x9e3779b9, W1 = 0xbb67ae85;

/** Philox4x32-10 of counter (c0..c3) under key (k0, k1); writes 4 uint32 into out[off..off+3]. */
export function philox4x32(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number, out: Uint32Array, off = 0): void {
  for (let r = 0; r < 10; r++) {
    const hi0 = mulhi(M0, c0), lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi(M1, c2), lo1 = Math.imul(M1, c2) >>> 0;
    const n0 = (hi1 ^ c1 ^ k0) >>> 0, n1 = lo1, n2 = (hi0 ^ c3 ^ k1) >>> 0, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 = (k0 + W0) >>> 0; k1 = (k1 + W1) >>> 0;
  }
  out[off] = c0 >>> 0; out[off + 1] = c1 >>> 0; out[off + 2] = c2 >>> 0; out[off + 3] = c3 >>> 0;
}

/** High 32 bits of the 64-bit product of two uint32. */
function mulhi(a: number, b: number): number {
  const aHi = a >>> 16, aLo = a & 0xffff, bHi = b >>> 16, bLo = b & 0xffff;
  const lolo = aLo * bLo, hilo = aHi * bLo, lohi = aLo * bHi, hihi = aHi * bHi;
  const mid = (lolo >>> 16) + (hilo & 0xffff) + (lohi & 0xffff);
  return (hihi + (hilo >>> 16) + (lohi >>> 16) + (mid >>> 16)) >>> 0;
}

/** uint32 → float in [0, 1) with 24 random bits (exact in float32). */
export function u32ToUnit(x: number): number {
  return (x >>> 8) * (1 / 16777216);
}

/** Mixes small integers into one 32-bit key word (FNV-1a over the words, then a murmur finaliser). */
export function mixKey(...words: number[]): number {
  let h = 0x811c9dc5;
  for (const w of words) {
    h = Math.imul(h ^ (w & 0xffff), 0x01000193) >>> 0;
    h = Math.imul(h ^ (w >>> 16), 0x01000193) >>> 0;
  }
  h ^= h >>> 16; h = Math.imul(h, 0x85ebca6b) >>> 0; h ^= h >>> 13; h = Math.imul(h, 0xc2b2ae35) >>> 0; h ^= h >>> 16;
  return h >>> 0;
}

/** A deterministic stream of uniform numbers for a given key: value i = philox((i, 0, 0, 0), key). */
export class CounterRng {
  private readonly buf = new Uint32Array(4);
  private counter = 0;
  constructor(readonly k0: number, readonly k1: number) {}
  /** Uniform in [0, 1). */
  next(): number {
    const lane = this.counter & 3;
    if (lane === 0) philox4x32(this.counter / 4, 0, 0, 0, this.k0, this.k1, this.buf);
    this.counter++;
    return u32ToUnit(this.buf[lane]);
  }
  /** Integer in [0, n). */
  int(n: number): number { return Math.floor(this.next() * n); }
  /** Standard normal (Box–Muller). */
  normal(): number {
    const u1 = Math.max(this.next(), 1e-12), u2 = this.next();
    return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
  }
  /** Position in the stream, for checkpoints. */
  get position(): number { return this.counter; }
  set position(p: number) { this.counter = p; if ((p & 3) !== 0) philox4x32(Math.floor(p / 4), 0, 0, 0, this.k0, this.k1, this.buf); }
}

/** Fisher–Yates shuffle of 0..n-1 keyed by (seed, epoch). Same permutation on every machine. */
export function shuffledIndices(n: number, seed: number, epoch: number): Int32Array {
  const idx = new Int32Array(n);
  for (let i = 0; i < n; i++) idx[i] = i;
  const rng = new CounterRng(mixKey(seed, 0x5348), mixKey(epoch, 0x4550));
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = idx[i]; idx[i] = idx[j]; idx[j] = t;
  }
  return idx;
}
