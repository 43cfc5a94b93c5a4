// DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") exactly as PEFT 0.21 computes it
// (peft/tuners/lora/dora.py DoraLinearLayer, lora/layer.py Linear.forward):
//   W' = m · (W + s·B·A) / ‖W + s·B·A‖_row        m [out] trainable ("lora_magnitude_vector"), init ‖W‖_row
//   y  = base(x) + (g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ·Bᵀ),   g = m / ‖W + s·B·A‖_row  (per output column)
// with xd = dropout(x) (= x without dropout, where y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias). The row norm is detached, as
// in PEFT (and the paper, §4.3): it is treated as a constant in backward, so gradients flow to m, A, B and x only
// through the formula above. W is the dequantized NF4 weight (QLoRA + DoRA) or the dense one (quantization: none).
//
// The norm is recomputed whenever a forward needs it from small pieces, without forming W + s·B·A:
//   ‖W_o + s·(BA)_o‖² = ‖W_o‖² + 2s·Σ_k B[o,k]·(W·Aᵀ)[o,k] + s²·B_o·(A·Aᵀ)·B_oᵀ
// ‖W_o‖² once at load (float64), W·Aᵀ with one base-linear call on A, the rest on the host in float64.
import type { Backend, Tensor } from './backend.ts';

/** The trainable magnitude of one DoRA module, its accumulated gradient and AdamW moments (f32 [out]). */
export class DoraMagnitude {
  readonly dm: Tensor;
  readonly mm: Tensor;
  readonly vm: Tensor;
  constructor(
    private readonly be: Backend,
    /** m [out]. */
    readonly m: Tensor,
    /** ‖W_o‖² of the frozen base weight, per output row (float64, host). */
    readonly baseRowNormSq: Float64Array,
  ) {
    this.dm = be.zeros(m.shape, 'f32'); this.mm = be.zeros(m.shape, 'f32'); this.vm = be.zeros(m.shape, 'f32');
  }

  /** PEFT init: m = ‖W‖_row (B = 0, so ‖W + s·B·A‖ = ‖W‖). */
  static init(be: Backend, baseRowNormSq: Float64Array): DoraMagnitude {
    const m = Float32Array.from(baseRowNormSq, (x) => Math.sqrt(x));
    return new DoraMagnitude(be, be.upload(m, [m.length], 'f32'), baseRowNormSq);
  }

  tensors(): Tensor[] { return [this.m, this.dm, this.mm, this.vm]; }
  free(): void { for (const t of this.tensors()) this.be.free(t); }
}

/** ‖W_o‖² per output row of a base weight given as host float32 [out, in]. */
export function rowNormsSq(w: Float32Array, out: number, inF: number): Float64Array {
  const r = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = o * inF, e = i + inF; i < e; i++) s += w[i] * w[i];
    r[o] = s;
  }
  return r;
}

/**
 * g = m / ‖W + s·B·A‖_row and 1 / ‖W + s·B·A‖_row, both f32 [out] on the device.
 * `WAt` is W·Aᵀ given as [r, out] (= the base linear, without bias, applied to the rows of A).
 */
export function doraColumnScale(be: Backend, mag: DoraMagnitude, WAt_rOut: Tensor, A: Tensor, B: Tensor, scale: number): { g: Tensor; invNorm: Tensor } {
  const wa = be.download(WAt_rOut) as Float32Array;          // [r, out]
  const b = be.download(B) as Float32Array;                  // [out, r]
  const aat = be.matmul(A, A, { transB: true });             // [r, r]
  const aa = be.download(aat) as Float32Array;
  be.free(aat);
  const m = be.download(mag.m) as Float32Array;
  const out = m.length, r = B.shape[1];
  const g = new Float32Array(out), inv = new Float32Array(out);
  const bo = new Float64Array(r);
  for (let o = 0; o < out; o++) {
    for (let k = 0; k < r; k++) bo[k] = b[o * r + k];
    let cross = 0, quad = 0;
    for (let k = 0; k < r; k++) {
      cross += bo[k] * wa[k * out + o];
      let row = 0;
      for (let l = 0; l < r; l++) row += aa[k * r + l] * bo[l];
      quad += bo[k] * row;
    }
    // PEFT computes the norm in float32: round it once, then divide in float32 as torch does.
    const norm = Math.fround(Math.sqrt(mag.baseRowNormSq[o] + 2 * scale * cross + scale * scale * quad));
    g[o] = Math.fround(m[o] / norm);
    inv[o] = Math.fround(1 / norm);
  }
  return { g: be.upload(g, [out], 'f32'), invNorm: be.upload(inv, [out], 'f32') };
}
