// NF4 + double quantization: bit-level behaviour of core/engine/nf4.ts against qlora-spec §1–§2.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  NF4_TABLE, NF4_THRESHOLDS, DYNAMIC_SIGNED_MAP, NESTED_BLOCKSIZE, quantizeNf4, dequantizeNf4, dequantizeNf4Rows,
  dequantizeAbsmax, quantizeBlockwise8, nf4Bytes,
} from '../../core/engine/nf4.ts';
import { CounterRng } from '../../common/rng.ts';
import { ConfigError, ShapeError, FormatError } from '../../common/errors.ts';

const f32 = Math.fround;

function bitsOf(x: number): number {
  const dv = new DataView(new ArrayBuffer(4));
  dv.setFloat32(0, x);
  return dv.getUint32(0);
}

/** Next float32 above x (x finite, positive or negative, not -0). */
function nextUp(x: number): number {
  const dv = new DataView(new ArrayBuffer(4));
  dv.setFloat32(0, x);
  const b = dv.getUint32(0);
  if (x === 0) return 1.401298464324817e-45;
  dv.setUint32(0, x > 0 ? b + 1 : b - 1);
  return dv.getFloat32(0);
}

/** Unpacked 4-bit code of flat element k. */
function codeAt(packed: Uint8Array, k: number): number {
  const byte = packed[k >> 1];
  return k % 2 === 0 ? byte >> 4 : byte & 15;
}

function normalWeights(n: number, seed: number, std = 0.02): Float32Array {
  const rng = new CounterRng(seed, 0x4e4634);
  const w = new Float32Array(n);
  for (let i = 0; i < n; i++) w[i] = rng.normal() * std;
  return w;
}

test('NF4 table and thresholds equal the spec literals bit for bit', () => {
  const spec = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0];
  assert.deepEqual(Array.from(NF4_TABLE), spec);
  assert.equal(bitsOf(NF4_TABLE[1]).toString(16), 'bf3239b1');
  const thresholds = [-0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767, 0.120255246758461,
    0.2035212516784668, 0.2920137643814087, 0.3893125355243683, 0.5016634464263916, 0.6427869200706482,
    0.8614784479141235];
  assert.deepEqual(Array.from(NF4_THRESHOLDS), thresholds);
});

test('dynamic signed map: 256 ascending values, 0 at 127, 1.0 at 255, mirror-symmetric negatives', () => {
  const m = DYNAMIC_SIGNED_MAP;
  assert.equal(m.length, 256);
  for (let i = 1; i < 256; i++) assert.ok(m[i] > m[i - 1], `ascending at ${i}`);
  assert.equal(m[127], 0);
  assert.equal(m[255], 1);
  assert.equal(m[0], f32(-0.99296875));
  for (let k = 1; k <= 127; k++) assert.equal(m[127 - k], -m[127 + k], `symmetry at ${k}`);
  assert.equal(bitsOf(m[64]).toString(16), 'bdc9eb85');
  assert.equal(bitsOf(m[128]).toString(16), '3513a3b7');
});

test('spec §1.7 test vector: absmax, codes, packed bytes, SHA-256, dequantized values', () => {
  const x = new Float32Array(130);
  for (let i = 0; i < 130; i++) x[i] = (((i * 37) % 101) - 50) / 64;
  const q = quantizeNf4(x, [10, 13], { doubleQuant: false });
  assert.deepEqual(Array.from(q.absmax), [0.78125, 0.78125, 0.625]);
  assert.deepEqual(Array.from(x.subarray(0, 8)), [-0.78125, -0.203125, 0.375, -0.625, -0.046875, 0.53125, -0.46875, 0.109375]);
  assert.deepEqual(Array.from({ length: 8 }, (_, k) => codeAt(q.packed, k)), [0, 4, 12, 1, 6, 14, 2, 9]);
  assert.equal(q.packed.length, 65);
  assert.equal(Buffer.from(q.packed.subarray(0, 8)).toString('hex'), '04c16e29f3b05d17');
  assert.equal(createHash('sha256').update(q.packed).digest('hex'), 'e7c717345277ddd22cb7a7d9efe1a54d3bf84b2b2e0d6e432d17e093cfe9a08f');
  const d = dequantizeNf4(q);
  assert.deepEqual(Array.from(d.subarray(0, 4)), [-0.78125, f32(-0.22221982), f32(0.34430456), f32(-0.54390061)]);
  assert.equal(d[1], f32(NF4_TABLE[4] * 0.78125));
});

test('a value exactly at a threshold gets the lower code, one ulp above gets the upper code', () => {
  for (let k = 0; k < 15; k++) {
    const t = NF4_THRESHOLDS[k];
    // absmax 1 (the first lane) ⇒ inv = 1 ⇒ xn = x exactly.
    const w = new Float32Array([1, t, nextUp(t), -1]);
    const q = quantizeNf4(w, [1, 4], { doubleQuant: false });
    assert.equal(q.absmax[0], 1);
    assert.equal(codeAt(q.packed, 0), 15);
    assert.equal(codeAt(q.packed, 1), k, `at threshold ${k}`);
    assert.equal(codeAt(q.packed, 2), k + 1, `one ulp above threshold ${k}`);
    assert.equal(codeAt(q.packed, 3), 0);
  }
});

test('NaN gets code 0 and is ignored by absmax; ±0 get code 7', () => {
  const q = quantizeNf4(new Float32Array([NaN, 0.5, -0, 0, -0.25, NaN]), [2, 3], { doubleQuant: false, nonFinite: 'kernel' });
  assert.equal(q.absmax[0], 0.5);
  assert.deepEqual(Array.from({ length: 6 }, (_, k) => codeAt(q.packed, k)), [0, 15, 7, 7, 2, 0]);
});

test('an all-zero block: codes 0 (bytes 0x00) and dequantized values −0 (CUDA semantics)', () => {
  const w = new Float32Array(128);
  for (let i = 64; i < 128; i++) w[i] = (i - 96) / 32;
  const q = quantizeNf4(w, [2, 64], { doubleQuant: false });
  assert.equal(q.absmax[0], 0);
  assert.ok(q.packed.subarray(0, 32).every((b) => b === 0x00));
  const d = dequantizeNf4(q);
  for (let i = 0; i < 64; i++) assert.ok(Object.is(d[i], -0), `element ${i} is -0`);
  assert.equal(d[64], -1);
  // With double quantization the zero scale comes back within the 8-bit error bound, still a tiny magnitude.
  const dq = quantizeNf4(w, [2, 64]);
  assert.ok(dq.packed.every((b, j) => b === q.packed[j]));
});

test('odd element count: the padding nibble is the code of 0.0 (7); an all-zero last block pads with 0', () => {
  const q = quantizeNf4(new Float32Array([0.5, -0.5, 0.25]), [1, 3], { doubleQuant: false });
  assert.equal(q.packed.length, 2);
  assert.equal(codeAt(q.packed, 2), 12); // 0.25 / 0.5 = 0.5 lies between thresholds 0.389 and 0.502
  assert.equal(q.packed[1] & 15, 7);
  const z = quantizeNf4(new Float32Array(65).map((_, i) => (i < 64 ? 1 : 0)), [5, 13], { doubleQuant: false });
  assert.equal(z.packed[32], 0x00); // last block [0] has absmax 0: 0·Inf = NaN for both lanes
});

test('randomized round trips: error within half the table gap, every code is the nearest table entry', () => {
  let maxHalfGap = 0;
  for (let k = 0; k < 15; k++) maxHalfGap = Math.max(maxHalfGap, (NF4_TABLE[k + 1] - NF4_TABLE[k]) / 2);
  const cases: Array<[number, number, number]> = [[32, 48, 64], [17, 31, 32], [64, 64, 128], [7, 300, 256], [3, 2000, 4096], [96, 40, 1024]];
  for (const [rows, cols, bs] of cases) {
    const w = normalWeights(rows * cols, rows * 1000 + bs);
    w[5] *= 40; // an outlier, as real weights have
    const q = quantizeNf4(w, [rows, cols], { blocksize: bs, doubleQuant: false });
    const d = dequantizeNf4(q);
    for (let i = 0; i < w.length; i++) {
      const b = Math.floor(i / bs);
      const am = q.absmax[b];
      assert.ok(Math.abs(w[i] - d[i]) <= am * maxHalfGap * (1 + 1e-6), `case ${rows}x${cols}/${bs} element ${i}`);
      const inv = f32(1 / am), xn = f32(w[i] * inv), c = codeAt(q.packed, i);
      const dc = Math.abs(xn - NF4_TABLE[c]);
      for (let j = 0; j < 16; j++) assert.ok(dc <= Math.abs(xn - NF4_TABLE[j]), `element ${i}: code ${c} not nearest (vs ${j})`);
      assert.equal(d[i], f32(NF4_TABLE[c] * am));
    }
    // absmax is exactly the block max |x|.
    for (let b = 0; b < q.absmax.length; b++) {
      let m = 0;
      for (let i = b * bs; i < Math.min((b + 1) * bs, w.length); i++) m = Math.max(m, Math.abs(w[i]));
      assert.equal(q.absmax[b], m);
    }
  }
});

test('double quantization: absmax within the 8-bit error bound, 4.127 bits per parameter at blocksize 64', () => {
  const rows = 1024, cols = 1024, n = rows * cols;
  const w = normalWeights(n, 7);
  const plain = quantizeNf4(w, [rows, cols], { doubleQuant: false });
  const dq = quantizeNf4(w, [rows, cols]);
  assert.ok(dq.absmax instanceof Uint8Array && dq.nested);
  const nested = dq.nested;
  assert.deepEqual(dq.packed, plain.packed); // codes do not depend on how the scales are stored
  const nb = n / 64;
  assert.equal(dq.absmax.length, nb);
  assert.equal(nested.absmax.length, nb / NESTED_BLOCKSIZE);
  assert.equal(nested.blocksize, 256);
  let sum = 0;
  for (let i = 0; i < nb; i++) sum += plain.absmax[i];
  assert.equal(nested.offset, f32(sum / nb));
  let dynHalfGap = 0;
  for (let k = 0; k < 255; k++) dynHalfGap = Math.max(dynHalfGap, (DYNAMIC_SIGNED_MAP[k + 1] - DYNAMIC_SIGNED_MAP[k]) / 2);
  const deq = dequantizeAbsmax(dq);
  const codes = dq.absmax;
  for (let i = 0; i < nb; i++) {
    const na = nested.absmax[Math.floor(i / 256)];
    const bound = na * dynHalfGap * (1 + 1e-5) + 2 * 2 ** -23 * plain.absmax[i];
    assert.ok(Math.abs(deq[i] - plain.absmax[i]) <= bound, `block ${i}: ${deq[i]} vs ${plain.absmax[i]}`);
    assert.equal(deq[i], f32(f32(DYNAMIC_SIGNED_MAP[codes[i]] * na) + nested.offset)); // two roundings
  }
  const bitsPerParam = (dq.packed.byteLength + dq.absmax.byteLength + dq.nested.absmax.byteLength) * 8 / n;
  assert.equal(bitsPerParam, 4 + 8 / 64 + 32 / (64 * 256));
  assert.equal(bitsPerParam.toFixed(3), '4.127');
  assert.equal(nf4Bytes(dq), n / 2 + nb + nested.absmax.length * 4 + 16 * 4 + 256 * 4 + 4);
  assert.equal(nf4Bytes(plain), n / 2 + nb * 4 + 16 * 4);
  // The dequantized weight uses the two-rounding scales.
  const d = dequantizeNf4(dq);
  for (let i = 0; i < 5000; i += 37) assert.equal(d[i], f32(NF4_TABLE[codeAt(dq.packed, i)] * deq[Math.floor(i / 64)]));
});

test('quantizeBlockwise8 picks the nearest map entry by float32 distance, ties to the lower index', () => {
  const rng = new CounterRng(11, 12);
  const a = new Float32Array(5000);
  for (let i = 0; i < a.length; i++) a[i] = (rng.next() * 2 - 1) * (rng.next() < 0.1 ? 1e-4 : 1);
  // Plant exact ties: y = midpoint of two map entries that is representable in float32, with block absmax 1.
  a[0] = 1;
  const m = DYNAMIC_SIGNED_MAP;
  const tieIdx: number[] = [];
  for (let k = 0, slot = 1; k < 255 && slot < 200; k++) {
    const mid = (m[k] + m[k + 1]) / 2;
    if (f32(mid) === mid) { a[slot] = mid; tieIdx.push(k); slot++; }
  }
  assert.ok(tieIdx.length > 20);
  const { codes, absmax } = quantizeBlockwise8(a, m, 256);
  assert.equal(absmax.length, Math.ceil(5000 / 256));
  for (let i = 0; i < a.length; i++) {
    const inv = f32(1 / absmax[Math.floor(i / 256)]);
    const y = f32(a[i] * inv);
    let best = 0, bestD = Infinity;
    for (let k = 0; k < 256; k++) {
      const dist = f32(Math.abs(y - m[k]));
      if (dist < bestD) { bestD = dist; best = k; } // strict: first (lowest) index wins ties, like torch.argmin
    }
    assert.equal(codes[i], best, `element ${i} (y = ${y})`);
  }
  tieIdx.forEach((k, j) => assert.equal(codes[1 + j], k, 'tie goes to the lower entry'));
});

test('dequantizeNf4Rows equals slices of dequantizeNf4, also for blocks crossing rows and odd row widths', () => {
  for (const [rows, cols, bs, dqnt] of [[10, 48, 64, true], [9, 13, 32, false], [5, 100, 128, true]] as const) {
    const w = normalWeights(rows * cols, cols);
    const q = quantizeNf4(w, [rows, cols], { blocksize: bs, doubleQuant: dqnt });
    const full = dequantizeNf4(q);
    const absmax = dequantizeAbsmax(q);
    for (const [r0, r1] of [[0, 1], [1, 3], [3, rows], [2, rows - 1], [rows - 1, rows], [4, 4], [0, rows]]) {
      const out = new Float32Array((r1 - r0) * cols + 3).fill(42);
      dequantizeNf4Rows(q, absmax, r0, r1, out);
      assert.deepEqual(out.subarray(0, (r1 - r0) * cols), full.subarray(r0 * cols, r1 * cols), `rows [${r0}, ${r1}) of ${rows}x${cols}/${bs}`);
      assert.deepEqual(Array.from(out.subarray((r1 - r0) * cols)), [42, 42, 42], 'nothing written past the range');
    }
    assert.throws(() => dequantizeNf4Rows(q, absmax, 2, rows + 1, new Float32Array(rows * cols)), ShapeError);
    assert.throws(() => dequantizeNf4Rows(q, absmax, 0, 2, new Float32Array(cols)), ShapeError);
  }
});

test('invalid inputs give named errors', () => {
  const w = new Float32Array(64);
  assert.throws(() => quantizeNf4(w, [8, 9]), ShapeError);
  assert.throws(() => quantizeNf4(w, [0, 64] as unknown as [number, number]), ShapeError);
  assert.throws(() => quantizeNf4(w, [64] as unknown as [number, number]), ShapeError);
  for (const bs of [16, 48, 8192, NaN, Infinity, 64.5]) assert.throws(() => quantizeNf4(w, [8, 8], { blocksize: bs }), ConfigError);
  const inf = new Float32Array(64); inf[3] = Infinity;
  assert.throws(() => quantizeNf4(inf, [8, 8]), FormatError);
  const q = quantizeNf4(inf, [8, 8], { doubleQuant: false, nonFinite: 'kernel' }); // CUDA semantics: inv = 0, finite → 7, Inf·0 = NaN → 0
  assert.equal(codeAt(q.packed, 3), 0);
  assert.equal(codeAt(q.packed, 4), 7);
  const good = quantizeNf4(normalWeights(64, 1), [8, 8]);
  assert.throws(() => dequantizeNf4({ ...good, packed: good.packed.subarray(1) }), ShapeError);
  assert.throws(() => dequantizeNf4({ ...good, nested: undefined }), ShapeError);
  assert.throws(() => quantizeBlockwise8(new Float32Array(4), DYNAMIC_SIGNED_MAP.subarray(1), 256), ShapeError);
});

test('a NaN weight is refused like ±Infinity, naming the tensor and the first bad index (with or without double quant)', () => {
  for (const [bad, shown] of [[NaN, 'NaN'], [Infinity, 'Infinity'], [-Infinity, '-Infinity']] as const) {
    for (const doubleQuant of [true, false]) {
      const w = normalWeights(8 * 16, 2);
      w[37] = bad; w[100] = bad;
      assert.throws(() => quantizeNf4(w, [8, 16], { doubleQuant, name: 'model.layers.3.self_attn.q_proj.weight' }), (e: Error) => {
        assert.ok(e instanceof FormatError);
        assert.match(e.message, /^model\.layers\.3\.self_attn\.q_proj\.weight \[8, 16\]: element 37 \(row 2, column 5\) is /);
        assert.ok(e.message.includes(` is ${shown} (2 non-finite elements in all)`), e.message);
        return true;
      });
    }
  }
});
