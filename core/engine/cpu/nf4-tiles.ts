// NF4 weights on the cpu backend: the packed codes stay packed (no float32 copy of the weight); matmuls
// dequantize a few rows at a time into a small scratch tile (qlora-spec §1.5: w[k] = f32(table[code(k)] ·
// absmax[k / bs]); code of flat element k is in byte k >> 1, high nibble for even k). The math lives in
// core/engine/nf4.ts; double-quantized block scales are expanded once at upload (1/64 of the element count).

import type { Nf4Weight, QuantizedTensor } from '../backend.ts';
import { dequantizeAbsmax, dequantizeNf4Rows, nf4Bytes } from '../nf4.ts';

/** A quantized weight resident in host memory. */
export class CpuQuantized implements QuantizedTensor {
  freed = false;
  readonly shape: readonly [number, number];
  readonly bytes: number;
  /** Per-block scale, float32 [nblocks] (double quantization already undone). */
  readonly absmax: Float32Array;
  /** 16-entry code table (float32 copy, for the native kernels). */
  readonly table: Float32Array;
  constructor(readonly weight: Nf4Weight) {
    this.absmax = dequantizeAbsmax(weight); // validates every size against the shape (ShapeError)
    this.shape = [weight.shape[0], weight.shape[1]];
    this.table = Float32Array.from(weight.quantMap);
    this.bytes = nf4Bytes(weight) + (weight.nested ? this.absmax.byteLength : 0);
  }
  get packed(): Uint8Array { return this.weight.packed; }
  get blocksize(): number { return this.weight.blocksize; }
}

/** Dequantizes rows [r0, r1) of W [out, in] into out[(r − r0)·in + j] (float32). */
export function dequantRows(q: CpuQuantized, r0: number, r1: number, out: Float32Array): void {
  dequantizeNf4Rows(q.weight, q.absmax, r0, r1, out);
}
