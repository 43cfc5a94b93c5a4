// Causal GQA attention with key padding, pure TypeScript (the fallback and the reference for the native path).
// q [B, T, Hq, D], k/v [B, T, Hk, D], keyMask [B, T]; query head h reads kv head h / (Hq / Hk).
// keyMask values: 0 = padding, otherwise the segment (packed example) a token belongs to. Query t attends keys s ≤ t
// whose mask is non-zero and equal to its own (block-diagonal causal: sample packing); a padding query (mask 0)
// attends every real key s ≤ t, as before segments existed. Unpacked batches use 1 for every real token. A row with
// no such key outputs zeros and lse = −inf.
// Dot products and softmax sums run in float64 and are rounded once into the float32 outputs.

/** May a query whose mask value is `querySeg` see a key whose mask value is `keySeg` (given key ≤ query)? */
export function visible(keySeg: number, querySeg: number): boolean {
  return keySeg !== 0 && (querySeg === 0 || keySeg === querySeg);
}

export interface AttnDims { B: number; T: number; Hq: number; Hk: number; D: number }

/** out [B, T, Hq, D], lse [B, Hq, T]. row: scratch [T] (float64). */
export function attentionForwardTs(
  q: Float32Array, k: Float32Array, v: Float32Array, mask: Int32Array, dims: AttnDims, scale: number,
  out: Float32Array, lse: Float32Array, row: Float64Array, acc: Float64Array,
): void {
  const { B, T, Hq, Hk, D } = dims;
  const group = Hq / Hk;
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < Hq; h++) {
      const kh = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        const qo = ((b * T + t) * Hq + h) * D, oo = qo, seg = mask[b * T + t];
        let m = -Infinity;
        for (let s = 0; s <= t; s++) {
          if (!visible(mask[b * T + s], seg)) continue;
          const ko = ((b * T + s) * Hk + kh) * D;
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[qo + d] * k[ko + d];
          const sc = scale * dot;
          row[s] = sc;
          if (sc > m) m = sc;
        }
        if (m === -Infinity) {
          for (let d = 0; d < D; d++) out[oo + d] = 0;
          lse[(b * Hq + h) * T + t] = -Infinity;
          continue;
        }
        acc.fill(0, 0, D);
        let sum = 0;
        for (let s = 0; s <= t; s++) {
          if (!visible(mask[b * T + s], seg)) continue;
          const p = Math.exp(row[s] - m);
          sum += p;
          const vo = ((b * T + s) * Hk + kh) * D;
          for (let d = 0; d < D; d++) acc[d] += p * v[vo + d];
        }
        const inv = 1 / sum;
        for (let d = 0; d < D; d++) out[oo + d] = acc[d] * inv;
        lse[(b * Hq + h) * T + t] = m + Math.log(sum);
      }
    }
  }
}

/** dq [B, T, Hq, D], dk/dv [B, T, Hk, D] (overwritten). */
export function attentionBackwardTs(
  dout: Float32Array, q: Float32Array, k: Float32Array, v: Float32Array, mask: Int32Array, out: Float32Array, lse: Float32Array,
  dims: AttnDims, scale: number, dq: Float32Array, dk: Float32Array, dv: Float32Array, acc: Float64Array,
): void {
  const { B, T, Hq, Hk, D } = dims;
  const group = Hq / Hk;
  dk.fill(0); dv.fill(0);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < Hq; h++) {
      const kh = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        const qo = ((b * T + t) * Hq + h) * D, seg = mask[b * T + t];
        const L = lse[(b * Hq + h) * T + t];
        acc.fill(0, 0, D);
        if (L !== -Infinity) {
          let di = 0;
          for (let d = 0; d < D; d++) di += dout[qo + d] * out[qo + d];
          for (let s = 0; s <= t; s++) {
            if (!visible(mask[b * T + s], seg)) continue;
            const ko = ((b * T + s) * Hk + kh) * D;
            let dot = 0, dp = 0;
            for (let d = 0; d < D; d++) { dot += q[qo + d] * k[ko + d]; dp += dout[qo + d] * v[ko + d]; }
            const p = Math.exp(scale * dot - L);
            const ds = p * (dp - di) * scale;
            for (let d = 0; d < D; d++) {
              acc[d] += ds * k[ko + d];
              dk[ko + d] += ds * q[qo + d];
              dv[ko + d] += p * dout[qo + d];
            }
          }
        }
        for (let d = 0; d < D; d++) dq[qo + d] = acc[d];
      }
    }
  }
}
