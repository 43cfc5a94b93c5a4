// Decode-time attention over a KV cache, TypeScript (memory-bound: Tq is 1 per generated token).
// q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], keyMask [B, Tk], queryPos [B·Tq]; query (b, i) attends to cache indices
// s ≤ queryPos[b·Tq + i] with keyMask[b, s] = 1. Float64 accumulation, one rounding into the float32 output
// (the same arithmetic as attentionForwardTs, so cached and full recomputation agree to the last bit or two).
export function attentionCachedTs(
  q: Float32Array, k: Float32Array, v: Float32Array, mask: Int32Array, queryPos: Int32Array,
  dims: { B: number; Tq: number; Tk: number; Hq: number; Hk: number; D: number }, scale: number, out: Float32Array,
): void {
  const { B, Tq, Tk, Hq, Hk, D } = dims;
  const group = Hq / Hk;
  const row = new Float64Array(Tk), acc = new Float64Array(D);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < Tq; i++) {
      const last = Math.min(Tk - 1, queryPos[b * Tq + i]);
      for (let h = 0; h < Hq; h++) {
        const kh = Math.floor(h / group);
        const qo = ((b * Tq + i) * Hq + h) * D;
        let m = -Infinity;
        for (let s = 0; s <= last; s++) {
          if (mask[b * Tk + s] === 0) continue;
          const ko = ((b * Tk + s) * Hk + kh) * D;
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[qo + d] * k[ko + d];
          row[s] = scale * dot;
          if (row[s] > m) m = row[s];
        }
        if (m === -Infinity) { out.fill(0, qo, qo + D); continue; }
        acc.fill(0);
        let sum = 0;
        for (let s = 0; s <= last; s++) {
          if (mask[b * Tk + s] === 0) continue;
          const p = Math.exp(row[s] - m);
          sum += p;
          const vo = ((b * Tk + s) * Hk + kh) * D;
          for (let d = 0; d < D; d++) acc[d] += p * v[vo + d];
        }
        const inv = 1 / sum;
        for (let d = 0; d < D; d++) out[qo + d] = acc[d] * inv;
      }
    }
  }
}
