// Half-precision conversions checked against slow float64 references written independently of the fast code.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../../common/halfprec.ts';
import { CounterRng } from '../../common/rng.ts';

/** IEEE half bits → value, straight from the definition. */
function refHalfValue(h: number): number {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  if (e === 0) return s * m * 2 ** -24;
  return s * 2 ** (e - 15) * (1 + m / 1024);
}

function roundHalfEven(q: number): number {
  const f = Math.floor(q), d = q - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** float32 value (finite) → half bits by scaling to an integer significand and rounding half to even. */
function refToHalf(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24); // may give 0x400 = smallest normal: right
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--; else if (2 ** (e + 1) <= a) e++;
  let q = roundHalfEven(a / 2 ** (e - 10));
  if (q === 2048) { q = 1024; e++; }
  if (e > 15) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | (q - 1024);
}

/** float32 value (finite) → bf16 bits. */
function refToBf16(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a < 2 ** -126) return sign | roundHalfEven(a * 2 ** 133); // bf16 subnormals: m · 2^-133
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--; else if (2 ** (e + 1) <= a) e++;
  let q = roundHalfEven(a / 2 ** (e - 7));
  if (q === 256) { q = 128; e++; }
  if (e > 127) return sign | 0x7f80;
  return sign | ((e + 127) << 7) | (q - 128);
}

test('f16ToF32 decodes all 65536 half values exactly', () => {
  const all = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) all[i] = i;
  const f = f16ToF32(all);
  for (let h = 0; h < 65536; h++) {
    const want = refHalfValue(h);
    if (Number.isNaN(want)) assert.ok(Number.isNaN(f[h]), `0x${h.toString(16)} should be NaN`);
    else assert.ok(Object.is(f[h], want), `0x${h.toString(16)}: got ${f[h]}, want ${want}`);
  }
});

test('f32ToF16 inverts f16ToF32 for every non-NaN half, and NaNs stay NaN', () => {
  const all = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) all[i] = i;
  const back = f32ToF16(f16ToF32(all));
  for (let h = 0; h < 65536; h++) {
    if (Number.isNaN(refHalfValue(h))) assert.ok((back[h] & 0x7c00) === 0x7c00 && (back[h] & 0x3ff) !== 0);
    else assert.equal(back[h], h, `0x${h.toString(16)}`);
  }
});

test('f32ToF16 rounds every midpoint between adjacent halves to the even one, and its neighbours to nearest', () => {
  const xs: number[] = [];
  for (let h = 0; h < 0x7bff; h++) { // positive finite pairs (h, h+1)
    const mid = (refHalfValue(h) + refHalfValue(h + 1)) / 2; // 12 significant bits: exact in float32
    xs.push(mid, mid * (1 + 2 ** -23), mid * (1 - 2 ** -23), -mid);
  }
  const f = Float32Array.from(xs);
  const got = f32ToF16(f);
  for (let i = 0; i < f.length; i++) assert.equal(got[i], refToHalf(f[i]), `x=${f[i]}`);
});

test('f32ToF16: overflow to infinity, tiny values to signed zero, specials', () => {
  const f = Float32Array.from([65504, 65519.99, 65520, 1e6, -1e6, Infinity, -Infinity, 2 ** -24, 2 ** -25, 2 ** -25 * 1.0001, 2 ** -26, -0, 1e-40, -1e-40]);
  const got = Array.from(f32ToF16(f));
  assert.deepEqual(got, [0x7bff, 0x7bff, 0x7c00, 0x7c00, 0xfc00, 0x7c00, 0xfc00, 0x0001, 0x0000, 0x0001, 0x0000, 0x8000, 0x0000, 0x8000]);
  const nan = f32ToF16(Float32Array.from([NaN]))[0];
  assert.ok((nan & 0x7c00) === 0x7c00 && (nan & 0x3ff) !== 0);
  // A signalling NaN whose payload lives only in the low bits must not truncate to infinity.
  const sn = new Float32Array(new Uint32Array([0x7f800001]).buffer);
  const h = f32ToF16(sn)[0];
  assert.ok((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0);
});

test('f32ToF16 and f32ToBf16 agree with the float64 references on 200k random float32 bit patterns', () => {
  const rng = new CounterRng(7, 11);
  const n = 200_000;
  const bits = new Uint32Array(n);
  for (let i = 0; i < n; i++) bits[i] = (rng.next() * 2 ** 24) * 256 + rng.int(256);
  // Spread exponents over the interesting range for f16 for half of them.
  for (let i = 0; i < n; i += 2) bits[i] = (bits[i] & 0x807fffff) | ((103 + rng.int(40)) << 23);
  const f = new Float32Array(bits.buffer);
  const h = f32ToF16(f), b = f32ToBf16(f);
  for (let i = 0; i < n; i++) {
    const x = f[i];
    if (Number.isNaN(x)) {
      assert.ok((h[i] & 0x7c00) === 0x7c00 && (h[i] & 0x3ff) !== 0);
      assert.ok((b[i] & 0x7f80) === 0x7f80 && (b[i] & 0x7f) !== 0);
      continue;
    }
    if (!Number.isFinite(x)) continue;
    assert.equal(h[i], refToHalf(x), `f16 of bits 0x${bits[i].toString(16)}`);
    assert.equal(b[i], refToBf16(x), `bf16 of bits 0x${bits[i].toString(16)}`);
  }
});

test('bf16: round-to-nearest-even on ties, overflow to inf, NaN preserved, exact round trip', () => {
  const u = new Uint32Array([
    0x3f808000, // tie, kept bit 0 → down to 0x3f80
    0x3f818000, // tie, kept bit 1 → up to 0x3f82
    0x3f808001, // above tie → up
    0x7f7fffff, // max float → rounds to inf
    0xff800000, // -inf
    0x7f800001, // sNaN with low payload → must stay NaN
    0xffc00000, // -qNaN
    0x00000001, // smallest f32 subnormal → 0
    0x80000000, // -0
  ]);
  const b = f32ToBf16(new Float32Array(u.buffer));
  assert.deepEqual(Array.from(b), [0x3f80, 0x3f82, 0x3f81, 0x7f80, 0xff80, 0x7fc0, 0xffc0, 0x0000, 0x8000]);
  const all = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) all[i] = i;
  const f = bf16ToF32(all);
  const back = f32ToBf16(f);
  for (let i = 0; i < 65536; i++) {
    const isNan = (i & 0x7f80) === 0x7f80 && (i & 0x7f) !== 0;
    if (isNan) assert.ok(Number.isNaN(f[i]) && (back[i] & 0x7f80) === 0x7f80 && (back[i] & 0x7f) !== 0);
    else assert.equal(back[i], i);
  }
  assert.equal(f[0x3f80], 1);
  assert.equal(f[0xc040], -3);
});

test('conversions honour the byteOffset of a subarray view', () => {
  const base = Float32Array.from([9, 1.5, -2.25, 9]);
  const sub = base.subarray(1, 3);
  assert.deepEqual(Array.from(f32ToF16(sub)), [0x3e00, 0xc080]);
  assert.deepEqual(Array.from(f32ToBf16(sub)), [0x3fc0, 0xc010]);
});
