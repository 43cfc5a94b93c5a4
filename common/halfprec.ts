// 16-bit float conversions (bfloat16 and IEEE binary16) on raw bit patterns, for reading and writing
// safetensors and for moving tensors between the fp32 CPU backend and bf16/fp16 checkpoints.
//
// All four functions work on whole arrays through Uint32 views of the float32 data, so they allocate once
// and never box a number. Rounding is round-to-nearest-even, the rule torch uses for `.to(torch.bfloat16)`
// and `.half()`, so a tensor converted here has the same bits as the same tensor converted by PyTorch.
// The typed-array views assume a little-endian host (every platform Node ships on in practice).

/** float32 → bfloat16 bits, round-to-nearest-even; NaN stays NaN (sign and top payload kept, quiet bit set). */
export function f32ToBf16(src: Float32Array): Uint16Array {
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < u.length; i++) {
    const x = u[i];
    if ((x & 0x7fffffff) > 0x7f800000) {
      // Truncating a NaN could leave an all-zero mantissa (= infinity); forcing the quiet bit keeps it a NaN.
      out[i] = (x >>> 16) | 0x0040;
    } else {
      // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry into the exponent is the correct
      // result (largest finite values round up to infinity, as in torch).
      out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
    }
  }
  return out;
}

/** bfloat16 bits → float32 (exact: bf16 is the top half of a float32). */
export function bf16ToF32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) u[i] = src[i] << 16;
  return out;
}

/**
 * float32 → IEEE half bits, round-to-nearest-even, with half subnormals; values past the half range become
 * ±infinity (as `torch.Tensor.half()` does), NaN stays a quiet NaN with the top payload bits.
 */
export function f32ToF16(src: Float32Array): Uint16Array {
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < u.length; i++) {
    const x = u[i];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    const mant = x & 0x7fffff;
    if (exp === 0xff) {
      out[i] = mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
      continue;
    }
    const e = exp - 127; // unbiased exponent
    if (e > 15) {
      out[i] = sign | 0x7c00;
    } else if (e >= -14) {
      // Normal half: keep 10 mantissa bits, round on the 13 dropped. A carry out of the mantissa bumps the
      // exponent, which is the right answer (and gives 0x7c00 = inf just above 65504).
      let h = ((e + 15) << 10) | (mant >>> 13);
      const rem = mant & 0x1fff;
      if (rem > 0x1000 || (rem === 0x1000 && (h & 1) === 1)) h++;
      out[i] = sign | h;
    } else if (e >= -25) {
      // Subnormal half: value = m · 2^-24 with m = (1.mant) · 2^(e+24); shift the implicit-one mantissa right.
      const m = mant | 0x800000;
      const shift = -1 - e; // 14 .. 24
      let h = m >>> shift;
      const rem = m & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && (h & 1) === 1)) h++;
      out[i] = sign | h; // h may round up to 0x400 = the smallest normal, which is correct
    } else {
      out[i] = sign; // below half of the smallest subnormal (and float32 subnormals): signed zero
    }
  }
  return out;
}

// All 65536 half values as float32 bits, built once on first use (256 KiB): the conversion is then one load.
let f16Table: Uint32Array | null = null;

function buildF16Table(): Uint32Array {
  const t = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >>> 10) & 0x1f;
    let mant = h & 0x3ff;
    if (exp === 0x1f) {
      t[h] = sign | 0x7f800000 | (mant << 13); // inf / NaN (payload kept)
    } else if (exp !== 0) {
      t[h] = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    } else if (mant === 0) {
      t[h] = sign;
    } else {
      // Subnormal half → normal float32: normalise the mantissa.
      let e = -14;
      while ((mant & 0x400) === 0) { mant <<= 1; e--; }
      t[h] = sign | ((e + 127) << 23) | ((mant & 0x3ff) << 13);
    }
  }
  return t;
}

/** IEEE half bits → float32 (exact). */
export function f16ToF32(src: Uint16Array): Float32Array {
  const table = f16Table ?? (f16Table = buildF16Table());
  const out = new Float32Array(src.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) u[i] = table[src[i]];
  return out;
}
