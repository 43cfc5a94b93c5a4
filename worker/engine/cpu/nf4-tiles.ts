// NF4 weights on the cpu backend: the packed codes stay packed; matmuls dequantize a few rows at a time into
// a small scratch tile (qlora-spec §1.5: w[k] = f32(table[code(k)] · absmax[k / bs]); code of flat element k
// is in byte k >> 1, high nibble for even k). Double-quantized absmax is expanded once per weight at upload
// (1/64 of the element count) following spec §2 step 4: f32(f32(dyn[q] · nested[i / 256]) + offset).

import type { Nf4Weight, QuantizedTensor } from '../backend.ts';
import { ShapeError } from '../../../common/errors.ts';

/** A quantized weight resident in host memory. */
export class CpuQuantized implements QuantizedTensor {
  freed = false;
  constructor(
    readonly shape: readonly [number, number],
    readonly bytes: number,
    /** Packed codes [ceil(out·in / 2)]. */
    readonly packed: Uint8Array,
    /** Per-block scale, float32 [nblocks] (double quantization already undone). */
    readonly absmax: Float32Array,
    /** 16-entry code table. */
    readonly table: Float32Array,
    readonly blocksize: number,
  ) {}
}

/** Per-block float32 scales of a weight, expanding double quantization (spec §2, two separate roundings). */
export function absmaxF32(w: Nf4Weight): Float32Array {
  if (w.absmax instanceof Float32Array) return w.absmax;
  const nested = w.nested;
  if (!nested) throw new ShapeError(`NF4 weight [${w.shape.join(', ')}]: absmax is uint8 but the double-quantization state is missing`, { hint: 'a double-quantized weight needs nested_absmax, nested_quant_map and the offset' });
  const q = w.absmax, out = new Float32Array(q.length), nb = nested.blocksize;
  for (let i = 0; i < q.length; i++) {
    const s = nested.absmax[Math.floor(i / nb)];
    if (s === undefined) throw new ShapeError(`NF4 weight [${w.shape.join(', ')}]: nested absmax has ${nested.absmax.length} entries, block ${i} needs index ${Math.floor(i / nb)}`);
    out[i] = Math.fround(Math.fround(nested.quantMap[q[i]] * s) + nested.offset);
  }
  return out;
}

/** Checks the sizes of a host NF4 weight against its shape (named error, never a silent out-of-bounds read). */
export function checkNf4(w: Nf4Weight): void {
  const [o, i] = w.shape;
  const n = o * i;
  if (!Number.isInteger(o) || !Number.isInteger(i) || o <= 0 || i <= 0) throw new ShapeError(`NF4 weight shape [${w.shape.join(', ')}] is not a positive 2-D shape`);
  if (!Number.isInteger(w.blocksize) || w.blocksize <= 0) throw new ShapeError(`NF4 weight [${o}, ${i}]: blocksize ${w.blocksize} is invalid`);
  if (w.packed.length !== Math.ceil(n / 2)) throw new ShapeError(`NF4 weight [${o}, ${i}]: packed has ${w.packed.length} bytes, expected ${Math.ceil(n / 2)}`, { hint: 'the packed codes do not belong to this shape' });
  const nb = Math.ceil(n / w.blocksize);
  if (w.absmax.length !== nb) throw new ShapeError(`NF4 weight [${o}, ${i}]: absmax has ${w.absmax.length} entries, expected ${nb} (blocksize ${w.blocksize})`);
  if (w.quantMap.length !== 16) throw new ShapeError(`NF4 weight [${o}, ${i}]: quant map has ${w.quantMap.length} entries, expected 16`);
}

/** Dequantizes rows [r0, r1) of W [out, in] into out[(r − r0)·in + j] (float32). */
export function dequantRows(q: CpuQuantized, r0: number, r1: number, out: Float32Array): void {
  const inDim = q.shape[1], bs = q.blocksize, packed = q.packed, absmax = q.absmax, table = q.table;
  let o = 0;
  for (let f = r0 * inDim, fEnd = r1 * inDim; f < fEnd;) {
    // One quantization block (or the part of it inside this row range) at a time: one absmax load.
    const blk = Math.floor(f / bs), scale = absmax[blk], bEnd = Math.min(fEnd, (blk + 1) * bs);
    for (; f < bEnd; f++) {
      const byte = packed[f >> 1];
      const code = (f & 1) === 0 ? byte >> 4 : byte & 15;
      out[o++] = table[code] * scale; // Float32Array store = the single float32 rounding of the spec
    }
  }
}
