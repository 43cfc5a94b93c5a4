// NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), as the Hugging Face
// Trainer applies it with `neftune_noise_alpha`: in training only, the embedding output [B, T, H] gets uniform noise
//   emb += U(−m, m),   m = alpha / sqrt(T · H)
// where T is the micro-batch's (padded) sequence length — `output.size(1) * output.size(2)` in transformers'
// neftune_post_forward_hook — and every element, padding included, is perturbed. Eval and generation see no noise.
//
// Where HF draws from torch's global RNG, the noise here is a pure function of (seed/step key, the token's global
// sample id, its position in the sample, the column), from the same counter RNG as the dropout masks: a sample
// gets the same noise whatever row, micro-batch, replica or worker it lands on, and a resumed run repeats it.
import { philox4x32, u32ToUnit, mixKey } from '../../common/rng.ts';

/** Fourth Philox counter word of the NEFTune stream (dropout streams use layer·16 + module < 2^20). */
const NEFTUNE_STREAM = 0x4e454654; // 'NEFT'

export interface NeftuneKey { readonly k0: number; readonly k1: number }

/** The NEFTune noise magnitude m = alpha / sqrt(T · H). */
export function neftuneMagnitude(alpha: number, T: number, H: number): number {
  return alpha / Math.sqrt(T * H);
}

/**
 * Noise for N = rowSample.length tokens × H columns, row-major, in [−m, m):
 *   noise[n, j] = (2 · u − 1) · m,  u = u32ToUnit(philox(c0 = ⌊j/4⌋, c1 = rowPos[n], c2 = rowSample[n], c3 = NEFT, key)[j mod 4])
 * `key` is the step's dropout key (seed, step), re-mixed so the noise is independent of the dropout masks.
 */
export function neftuneNoise(rowSample: Int32Array, rowPos: Int32Array, H: number, m: number, key: NeftuneKey): Float32Array {
  const N = rowSample.length, out = new Float32Array(N * H), w = new Uint32Array(4);
  const k0 = mixKey(key.k0, NEFTUNE_STREAM), k1 = key.k1;
  for (let n = 0; n < N; n++) {
    const o = n * H, s = rowSample[n] >>> 0, p = rowPos[n] >>> 0;
    for (let j = 0; j < H; j += 4) {
      philox4x32(j >>> 2, p, s, NEFTUNE_STREAM, k0, k1, w);
      for (let e = 0; e < 4 && j + e < H; e++) out[o + j + e] = (2 * u32ToUnit(w[e]) - 1) * m;
    }
  }
  return out;
}
