// Tiny random models and datasets for model/trainer tests (real HF-format files in a temp dir).
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeRandomLlama, type TinyLlamaShape } from '../../coordinator/example/model.ts';
import { CounterRng } from '../../common/rng.ts';
import type { Example } from '../../coordinator/data/tokenize.ts';

export const TINY: TinyLlamaShape = {
  hiddenSize: 32, intermediateSize: 48, numLayers: 3, numHeads: 4, numKvHeads: 2, vocabSize: 50,
  maxPositionEmbeddings: 64, tieWordEmbeddings: false, bosTokenId: 1, eosTokenId: 2, padTokenId: 0, embedStd: 0.3,
};

export function tinyModelDir(shape: Partial<TinyLlamaShape> = {}, seed = 7): string {
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-tiny-'));
  writeRandomLlama(dir, { ...TINY, ...shape }, seed);
  return dir;
}

/**
 * n examples of lengths 4..maxLen following a learnable rule (arithmetic progressions of token ids with a
 * per-example start and stride); the first `prompt` tokens of each are not trained.
 */
export function tinyExamples(n: number, vocab: number, seed = 3, maxLen = 12, prompt = 2): Example[] {
  const rng = new CounterRng(seed, 99);
  const out: Example[] = [];
  for (let i = 0; i < n; i++) {
    const len = 4 + rng.int(maxLen - 3);
    const start = rng.int(vocab - 3), stride = 1 + rng.int(3);
    const ids = Int32Array.from({ length: len }, (_, t) => 3 + ((start + t * stride) % (vocab - 3)));
    const labels = Int32Array.from(ids, (v, t) => (t < prompt ? -100 : v));
    out.push({ inputIds: ids, labels, sourceIndex: i });
  }
  return out;
}
