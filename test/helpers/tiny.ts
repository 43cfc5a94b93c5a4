// Tiny random models and datasets for model/trainer tests (real HF-format files in a temp dir).
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeRandomLlama, type TinyLlamaShape } from '../../coordinator/example/model.ts';
import { CounterRng } from '../../common/rng.ts';
import { writeExampleData, generateExampleData } from '../../coordinator/example/data.ts';
import { writeExampleTokenizer } from '../../coordinator/example/tokenizer.ts';
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

/**
 * A tiny random Llama with the example's real BPE tokenizer and the example's keyword → description data, all
 * written under `dir`: what the CLI, distributed and TLS tests train. `dataSeed` picks the data; `shape` overrides
 * the model size.
 */
export function tinyExampleSetup(dir: string, opts: { dataSeed?: number; modelSeed?: number; shape?: Partial<TinyLlamaShape> } = {}): { model: string; trainPath: string; validationPath: string; prompt: string } {
  const model = join(dir, 'model');
  const seed = opts.dataSeed ?? 5;
  const { trainPath, validationPath } = writeExampleData(join(dir, 'data'), seed);
  const train = generateExampleData(seed).train;
  const { vocabSize } = writeExampleTokenizer(model, train.flatMap((p) => [p.instruction, p.output]));
  const tj = JSON.parse(readFileSync(join(model, 'tokenizer.json'), 'utf8')) as { added_tokens: { id: number; content: string }[] };
  const idOf = (c: string): number => tj.added_tokens.find((t) => t.content === c)!.id;
  writeRandomLlama(model, {
    hiddenSize: 32, intermediateSize: 48, numLayers: 3, numHeads: 4, numKvHeads: 2, vocabSize: Math.ceil(vocabSize / 64) * 64,
    maxPositionEmbeddings: 256, tieWordEmbeddings: false, embedStd: 0.125,
    bosTokenId: idOf('<|begin_of_text|>'), eosTokenId: idOf('<|im_end|>'), padTokenId: idOf('<|pad|>'),
    ...opts.shape,
  }, opts.modelSeed ?? 3);
  return { model, trainPath, validationPath, prompt: train[0].instruction };
}
