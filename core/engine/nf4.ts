// NF4 4-bit blockwise quantization with double quantization — the bitsandbytes algorithm (qlora-spec §1–§2),
// CUDA semantics (what QLoRA uses), pure TypeScript on typed arrays.
//
// Layout of one quantized [out, in] weight (n = out·in elements, bs = blocksize, nb = ceil(n / bs)):
//   packed  u8  [ceil(n/2)]   two 4-bit codes per byte, even flat element in the HIGH nibble
//   absmax  f32 [nb]          per-block max |x|            (or u8 [nb] codes when double-quantized)
//   nested  f32 [ceil(nb/256)] scales of the centred absmax, + the float32 offset = mean(absmax)
//
// Numerics (all float32, every step rounded with Math.fround so the result equals the CUDA kernel's bits):
//   inv = f32(1 / absmax);  xn = f32(x · inv);  code = #{ thresholds t_k : xn > t_k }   (ties → lower code)
//   dequant: f32(table[code] · absmax)
// Not emulated: bnb's CUDA build uses --use_fast_math, i.e. an approximate reciprocal and flush-to-zero of
// subnormals. The IEEE reciprocal may differ from rcp.approx by an ulp, which can flip a code only for values
// within ~1 ulp of a threshold; a block whose absmax is subnormal (< 1.18e-38) would be all code 0 there.

import type { Nf4Weight, QuantizeNf4Options } from './backend.ts';
export type { QuantizeNf4Options, SourceDtype } from './backend.ts';
import { ConfigError, FormatError, ShapeError } from '../../common/errors.ts';

/** Reinterprets uint32 bit patterns as float32 values. */
function fromBits(bits: readonly number[]): Float32Array {
  return new Float32Array(new Uint32Array(bits).buffer);
}

/**
 * The 16 NF4 code values, index = 4-bit code (spec §1.1). Taken from the hex literals, never recomputed:
 * recomputing the normal quantiles with another scipy gives last-ulp differences that change dequantized values.
 */
export const NF4_TABLE: Float32Array = fromBits([
  0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
  0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
]);

/** The 15 decision thresholds: float32 midpoints (c[k] + c[k+1]) / 2 of the table (spec §1.3 table). */
export const NF4_THRESHOLDS: Float32Array = (() => {
  const t = new Float32Array(15);
  // c[k] + c[k+1] is exact in float64 and /2 is exact, so one fround gives the float32 midpoint.
  for (let k = 0; k < 15; k++) t[k] = Math.fround((NF4_TABLE[k] + NF4_TABLE[k + 1]) / 2);
  return t;
})();

/**
 * The signed dynamic 8-bit map used by double quantization (bnb `create_dynamic_map(signed=True)`), 256 ascending
 * float32 values from the spec's hex table (§2): 127 negatives, 0 at index 127, 128 positives, 1.0 at index 255.
 */
export const DYNAMIC_SIGNED_MAP: Float32Array = fromBits([
  0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
  0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
  0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
  0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
  0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
  0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
  0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
  0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
  0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
  0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
  0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
  0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
  0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
  0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
  0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
  0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
  0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
  0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
  0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
  0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
  0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
  0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
  0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
  0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
  0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
  0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
  0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
  0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
  0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
  0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
  0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
  0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]);

/** Blocksize of the nested (double) quantization; hard-coded in bitsandbytes. */
export const NESTED_BLOCKSIZE = 256;

/**
 * Throws a FormatError naming the tensor, the first NaN / ±Infinity element (flat index, row, column) and how many
 * there are. A NaN weight would quantize to code 0 and dequantize to −absmax, silently; an infinite one makes the
 * block's other elements 0 — both are a corrupt or overflowed checkpoint, never something to train on.
 */
export function checkFiniteWeight(w: Float32Array, shape: readonly number[], name = 'the weight'): void {
  let first = -1, count = 0;
  for (let i = 0; i < w.length; i++) {
    const x = w[i];
    if (x - x !== 0) { if (first < 0) first = i; count++; } // NaN and ±Inf: x − x is NaN
  }
  if (first < 0) return;
  const cols = shape.length === 2 ? shape[1] : 0;
  const at = cols ? ` (row ${Math.floor(first / cols)}, column ${first % cols})` : '';
  throw new FormatError(`${name} [${shape.join(', ')}]: element ${first}${at} is ${w[first]}${count > 1 ? ` (${count} non-finite elements in all)` : ''}, so it cannot be quantized to NF4`, {
    hint: 'the checkpoint holds NaN or infinite weights (corrupted, or overflowed when it was converted to float16): re-export or re-download the model',
  });
}

// Thresholds padded to 16 with +Infinity so the 4-step branchy binary search below needs no bounds checks.
const T16 = new Float32Array(16);
T16.set(NF4_THRESHOLDS);
T16[15] = Infinity;

/**
 * Code of a scaled value: the number of thresholds strictly below xn (ties → lower code; NaN fails every
 * comparison → 0; ±Infinity → 15 / 0). A 4-level binary search over the padded thresholds.
 */
function nf4Code(xn: number): number {
  let c = 0;
  if (xn > T16[c + 7]) c += 8;
  if (xn > T16[c + 3]) c += 4;
  if (xn > T16[c + 1]) c += 2;
  if (xn > T16[c]) c += 1;
  return c;
}

/** Validates a 4-bit blocksize: a power of two in 32..4096. */
function checkBlocksize(bs: number, what = 'blocksize'): number {
  if (!Number.isInteger(bs) || bs < 32 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new ConfigError(`${what} = ${String(bs)} is not supported`, { hint: 'use a power of two between 32 and 4096 (64 is the bitsandbytes default)' });
  }
  return bs;
}

/** Validates a weight shape against the element count; returns n. */
function checkShape(shape: readonly number[], length: number, what: string): number {
  if (shape.length !== 2 || !shape.every((d) => Number.isSafeInteger(d) && d > 0)) {
    throw new ShapeError(`${what}: shape [${shape.join(', ')}] is not a 2-D [out, in] shape of positive integers`);
  }
  const n = shape[0] * shape[1];
  if (n !== length) throw new ShapeError(`${what}: shape [${shape[0]}, ${shape[1]}] has ${n} elements but the data has ${length}`);
  return n;
}

/**
 * Quantizes a [out, in] float32 weight (row-major) to NF4, blocks of `blocksize` consecutive flat elements
 * (blocks cross row boundaries), optionally with double quantization of the block scales.
 * w [out·in] → Nf4Weight. Input values must already be the float32 image of the source dtype.
 */
export function quantizeNf4(w: Float32Array, shape: readonly [number, number], opts: QuantizeNf4Options = {}): Nf4Weight {
  const bs = checkBlocksize(opts.blocksize ?? 64);
  const n = checkShape(shape, w.length, 'quantizeNf4');
  if (opts.nonFinite !== 'kernel') checkFiniteWeight(w, shape, opts.name);
  const sourceDtype = opts.sourceDtype ?? 'float32';
  if (sourceDtype !== 'bfloat16' && sourceDtype !== 'float16' && sourceDtype !== 'float32') {
    throw new ConfigError(`quantizeNf4: sourceDtype '${String(sourceDtype)}' is not one of bfloat16, float16, float32`);
  }
  const nblocks = Math.ceil(n / bs);
  const absmax = new Float32Array(nblocks);  // [nblocks]
  const packed = new Uint8Array(Math.ceil(n / 2)); // [ceil(n/2)]

  for (let b = 0; b < nblocks; b++) {
    const s = b * bs;
    const e = Math.min(s + bs, n);
    // max |x| over the valid lanes; `a > m` skips NaN like CUDA's fmaxf.
    let m = 0;
    for (let i = s; i < e; i++) {
      const a = Math.abs(w[i]);
      if (a > m) m = a;
    }
    absmax[b] = m;
    // All-zero block: inv = +Inf, 0·Inf = NaN → code 0 everywhere (CUDA behaviour, spec §1.3).
    const inv = Math.fround(1 / m);
    // s is even (bs is), so pairs never straddle blocks: byte i/2 belongs to this block alone.
    let i = s;
    for (; i + 1 < e; i += 2) {
      packed[i >>> 1] = (nf4Code(Math.fround(w[i] * inv)) << 4) | nf4Code(Math.fround(w[i + 1] * inv));
    }
    if (i < e) {
      // Odd n: the missing lane is loaded as 0.0 and quantized with this block's scale (code 7, or 0 when
      // the block is all zero and 0·Inf = NaN), exactly like the kernel's padded load.
      packed[i >>> 1] = (nf4Code(Math.fround(w[i] * inv)) << 4) | nf4Code(Math.fround(0 * inv));
    }
  }

  const base = { shape: [shape[0], shape[1]] as const, packed, blocksize: bs, quantMap: NF4_TABLE.slice(), sourceDtype };
  if (opts.doubleQuant === false) return { ...base, absmax };
  return { ...base, ...doubleQuantize(absmax) };
}

/**
 * Double quantization (spec §2): offset = mean(absmax), then absmax − offset → 8-bit signed dynamic map in
 * blocks of 256. The offset is summed sequentially in float64 and rounded once to float32 (torch's GPU mean
 * uses its own float32 tree order; the two can differ in the last ulp, which is harmless: the offset is
 * stored in files, so loading is exact).
 */
function doubleQuantize(absmax: Float32Array): Pick<Nf4Weight, 'absmax' | 'nested'> {
  const nb = absmax.length;
  let sum = 0;
  for (let i = 0; i < nb; i++) sum += absmax[i];
  const offset = Math.fround(sum / nb);
  if (!Number.isFinite(offset)) {
    throw new FormatError('quantizeNf4: the weight contains ±Infinity, so its block scales cannot be double-quantized', {
      hint: 'check the checkpoint for overflowed values, or quantize with doubleQuant: false',
    });
  }
  const centred = new Float32Array(nb); // [nb]; the store rounds absmax − offset to float32
  for (let i = 0; i < nb; i++) centred[i] = absmax[i] - offset;
  const q = quantizeBlockwise8(centred, DYNAMIC_SIGNED_MAP, NESTED_BLOCKSIZE);
  return {
    absmax: q.codes,
    nested: { absmax: q.absmax, quantMap: DYNAMIC_SIGNED_MAP.slice(), blocksize: NESTED_BLOCKSIZE, offset },
  };
}

/**
 * Blockwise 8-bit quantization against a sorted 256-entry map (bnb `quantize_blockwise`, used here for double
 * quantization). Per block: absmax = max |a| (NaN skipped), y = f32(a · f32(1/absmax)), code = index of the
 * nearest map entry by float32 distance. Ties go to the LOWER index — bitsandbytes' CPU rule (argmin); the CUDA
 * kernel's tie choice depends on its search path. Ties are measure-zero for real weights. NaN → code 0 (an
 * all-zero block gives 0·Inf = NaN: code 0, which still dequantizes to ±0).
 * a [n] → codes u8 [n], absmax f32 [ceil(n / blocksize)].
 */
export function quantizeBlockwise8(a: Float32Array, map: Float32Array, blocksize: number): { codes: Uint8Array; absmax: Float32Array } {
  if (map.length !== 256) throw new ShapeError(`quantizeBlockwise8: the map has ${map.length} entries, expected 256`);
  for (let k = 1; k < 256; k++) {
    if (!(map[k] > map[k - 1])) throw new ShapeError(`quantizeBlockwise8: the map is not strictly ascending at index ${k}`);
  }
  if (!Number.isSafeInteger(blocksize) || blocksize < 1) throw new ConfigError(`quantizeBlockwise8: blocksize = ${String(blocksize)} must be a positive integer`);
  const n = a.length;
  const nblocks = Math.ceil(n / blocksize);
  const codes = new Uint8Array(n);
  const absmax = new Float32Array(nblocks);
  const lo0 = map[0], hi0 = map[255];
  for (let b = 0; b < nblocks; b++) {
    const s = b * blocksize;
    const e = Math.min(s + blocksize, n);
    let m = 0;
    for (let i = s; i < e; i++) {
      const v = Math.abs(a[i]);
      if (v > m) m = v;
    }
    absmax[b] = m;
    const inv = Math.fround(1 / m);
    for (let i = s; i < e; i++) {
      const y = Math.fround(a[i] * inv);
      let c: number;
      if (!(y > lo0)) c = 0; // also NaN
      else if (y >= hi0) c = 255;
      else {
        // Largest k with map[k] <= y (map[0] < y < map[255], so 0 <= k < 255).
        let lo = 0, hi = 255;
        while (hi - lo > 1) {
          const mid = (lo + hi) >>> 1;
          if (map[mid] <= y) lo = mid; else hi = mid;
        }
        const dLo = Math.fround(y - map[lo]);
        const dHi = Math.fround(map[lo + 1] - y);
        c = dHi < dLo ? lo + 1 : lo;
      }
      codes[i] = c;
    }
  }
  return { codes, absmax };
}

/** Checks the internal consistency of an Nf4Weight (sizes vs shape and blocksizes); returns n. */
function checkNf4(q: Nf4Weight): number {
  const n = checkShape(q.shape, q.shape[0] * q.shape[1], 'Nf4Weight');
  checkBlocksize(q.blocksize, 'Nf4Weight.blocksize');
  const nb = Math.ceil(n / q.blocksize);
  if (q.packed.length !== Math.ceil(n / 2)) throw new ShapeError(`Nf4Weight: packed has ${q.packed.length} bytes, expected ${Math.ceil(n / 2)} for shape [${q.shape.join(', ')}]`);
  if (q.absmax.length !== nb) throw new ShapeError(`Nf4Weight: absmax has ${q.absmax.length} entries, expected ${nb} (= ceil(${n} / ${q.blocksize}))`);
  if (q.quantMap.length !== 16) throw new ShapeError(`Nf4Weight: quantMap has ${q.quantMap.length} entries, expected 16`);
  if ((q.absmax instanceof Uint8Array) !== (q.nested !== undefined)) {
    throw new ShapeError('Nf4Weight: absmax must be uint8 codes exactly when the nested (double-quantization) state is present');
  }
  if (q.nested) {
    const nn = q.nested;
    if (!Number.isSafeInteger(nn.blocksize) || nn.blocksize < 1) throw new ShapeError(`Nf4Weight: nested blocksize ${nn.blocksize} is not a positive integer`);
    if (nn.absmax.length !== Math.ceil(nb / nn.blocksize)) throw new ShapeError(`Nf4Weight: nested absmax has ${nn.absmax.length} entries, expected ${Math.ceil(nb / nn.blocksize)}`);
    if (nn.quantMap.length !== 256) throw new ShapeError(`Nf4Weight: nested quantMap has ${nn.quantMap.length} entries, expected 256`);
  }
  return n;
}

/**
 * The float32 block scales [nblocks]. Double-quantized: f32(f32(dyn[code] · nestedAbsmax) + offset) — two
 * separate roundings, as bitsandbytes does (8-bit dequant kernel, then a torch `+=`). Always a fresh array.
 */
export function dequantizeAbsmax(q: Nf4Weight): Float32Array {
  checkNf4(q);
  if (!q.nested) return Float32Array.from(q.absmax);
  const codes = q.absmax as Uint8Array;
  const { absmax: nAbs, quantMap: dyn, blocksize: nbs } = q.nested;
  const offset = Math.fround(q.nested.offset);
  const out = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) {
    out[i] = Math.fround(Math.fround(dyn[codes[i]] * nAbs[Math.floor(i / nbs)]) + offset);
  }
  return out;
}

/**
 * Dequantizes flat elements [e0, e1) into out[o ...]: f32(table[code] · absmax[k / bs]).
 * Walks block by block with a 16-entry scaled table per block, so the inner loop is two lookups per byte.
 */
function dequantRange(q: Nf4Weight, absmax: Float32Array, e0: number, e1: number, out: Float32Array, o: number): void {
  const bs = q.blocksize, packed = q.packed, table = q.quantMap;
  const lut = new Float32Array(16);
  for (let b = Math.floor(e0 / bs); b * bs < e1; b++) {
    const s = Math.max(e0, b * bs), e = Math.min(e1, (b + 1) * bs);
    const scale = absmax[b];
    for (let c = 0; c < 16; c++) lut[c] = table[c] * scale; // the Float32Array store is the fround
    let i = s, p = o + (s - e0);
    if (i & 1) { out[p++] = lut[packed[i >>> 1] & 15]; i++; }
    for (; i + 1 < e; i += 2) {
      const byte = packed[i >>> 1];
      out[p++] = lut[byte >>> 4];
      out[p++] = lut[byte & 15];
    }
    if (i < e) out[p] = lut[packed[i >>> 1] >>> 4];
  }
}

/** The full dequantized weight [out·in] (row-major [out, in]) in float32. */
export function dequantizeNf4(q: Nf4Weight, out?: Float32Array): Float32Array {
  const n = checkNf4(q);
  const dst = out ?? new Float32Array(n);
  if (dst.length < n) throw new ShapeError(`dequantizeNf4: out has ${dst.length} elements, needs ${n}`);
  dequantRange(q, dequantizeAbsmax(q), 0, n, dst, 0);
  return dst;
}

/**
 * Rows [rowStart, rowEnd) of the dequantized [out, in] weight into out[0 .. (rowEnd−rowStart)·in) — for tiled
 * matmuls that never materialize the whole weight. absmax is dequantizeAbsmax(q), computed once by the caller.
 * Handles blocks that cross rows and rows that start on an odd element.
 */
export function dequantizeNf4Rows(q: Nf4Weight, absmax: Float32Array, rowStart: number, rowEnd: number, out: Float32Array): void {
  const [rows, cols] = q.shape;
  if (!Number.isSafeInteger(rowStart) || !Number.isSafeInteger(rowEnd) || rowStart < 0 || rowEnd > rows || rowStart > rowEnd) {
    throw new ShapeError(`dequantizeNf4Rows: row range [${rowStart}, ${rowEnd}) is outside [0, ${rows})`);
  }
  const nb = Math.ceil((rows * cols) / q.blocksize);
  if (absmax.length !== nb) throw new ShapeError(`dequantizeNf4Rows: absmax has ${absmax.length} entries, expected ${nb}`);
  const count = (rowEnd - rowStart) * cols;
  if (out.length < count) throw new ShapeError(`dequantizeNf4Rows: out has ${out.length} elements, rows [${rowStart}, ${rowEnd}) need ${count}`);
  dequantRange(q, absmax, rowStart * cols, rowEnd * cols, out, 0);
}

/**
 * Bytes held by the quantized weight: packed codes + block scales + the per-tensor code tables (16 floats, and
 * with double quantization the nested scales, the 256-float map and the 4-byte offset).
 */
export function nf4Bytes(q: Nf4Weight): number {
  let bytes = q.packed.byteLength + q.absmax.byteLength + q.quantMap.byteLength;
  if (q.nested) bytes += q.nested.absmax.byteLength + q.nested.quantMap.byteLength + 4;
  return bytes;
}
