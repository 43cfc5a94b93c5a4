// The one stage planner: which contiguous layers each pipeline stage holds, balanced by bytes (the embedding
// weighs on the first stage, final norm + LM head on the last). The one-process run (distributed.stages in
// one process, tests) and the distributed run (one worker per stage) use the same boundaries.
import type { ModelConfig } from '../model/config.ts';
import { linearShape } from '../model/loader.ts';
import { LINEAR_MODULES, type StageSpec } from '../model/llama.ts';
import { ConfigError } from '../../common/errors.ts';

/** Device bytes per decoder-linear weight of an NF4 base (4.127 bits with double quantization at blocksize 64). */
export const NF4_BYTES_PER_PARAM = 4.127 / 8;

/**
 * Approximate device bytes of each part: the decoder linears at `linearBytesPerParam` (NF4 by default; a
 * full-precision base, quantization: none, at its element size), f32 norms, embeddings, head.
 */
export function partBytes(cfg: ModelConfig, linearBytesPerParam = NF4_BYTES_PER_PARAM): { layer: number; embedding: number; head: number } {
  const H = cfg.hiddenSize;
  let linear = 0;
  for (const m of LINEAR_MODULES) { const [o, i] = linearShape(cfg, m); linear += o * i; }
  const layer = Math.ceil(linear * linearBytesPerParam) + 2 * H * 4;
  const table = cfg.vocabSize * H * 4;
  return { layer, embedding: table, head: table + H * 4 }; // a tied head still needs the table on the last stage
}

/**
 * Splits the layers into `n` contiguous non-empty stages minimising the largest stage's bytes (exact, by
 * dynamic programming over split points; ties go to the earlier split so the plan is deterministic).
 * `linearBytesPerParam` as partBytes: the one-process run and the workers pass the same, so they split alike.
 */
export function planStages(cfg: ModelConfig, n: number, linearBytesPerParam = NF4_BYTES_PER_PARAM): { specs: StageSpec[]; bytes: number[] } {
  const L = cfg.numLayers;
  if (!Number.isInteger(n) || n < 1 || n > L) throw new ConfigError(`distributed.stages = ${n} must be between 1 and the model's ${L} layers`);
  const pb = partBytes(cfg, linearBytesPerParam);
  const cost = (s: number, a: number, b: number): number => (b - a) * pb.layer + (s === 0 ? pb.embedding : 0) + (s === n - 1 ? pb.head : 0);
  // best[s][b] = minimal max cost of stages 0..s covering layers [0, b); cut[s][b] = where stage s starts
  const best = Array.from({ length: n }, () => new Array<number>(L + 1).fill(Infinity));
  const cut = Array.from({ length: n }, () => new Array<number>(L + 1).fill(-1));
  for (let b = 1; b <= L; b++) { best[0][b] = cost(0, 0, b); cut[0][b] = 0; }
  for (let s = 1; s < n; s++) {
    for (let b = s + 1; b <= L; b++) {
      for (let a = s; a < b; a++) {
        const v = Math.max(best[s - 1][a], cost(s, a, b));
        if (v < best[s][b]) { best[s][b] = v; cut[s][b] = a; }
      }
    }
  }
  const specs: StageSpec[] = [];
  const bytes: number[] = [];
  for (let s = n - 1, b = L; s >= 0; s--) {
    const a = cut[s][b];
    specs.unshift({ firstLayer: a, lastLayer: b, hasEmbedding: s === 0, hasHead: s === n - 1 });
    bytes.unshift(cost(s, a, b));
    b = a;
  }
  return { specs, bytes };
}

