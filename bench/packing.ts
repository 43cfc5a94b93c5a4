// Sample packing (data.packing): useful (real, non-padding) training tokens per second with and without packing,
// on the built-in example (its model and keyword → description data) and on a seed-like dataset (short keyword →
// description pairs with the seed's spread of lengths: many short answers, a few long ones), same model, same
// micro-batches (packing keeps each micro-batch's examples; only the padding goes), one table per backend.
// Usage: node --import tsx bench/packing.ts [--backend cpu|cuda] [--steps N] [--mbs 8,16] [--max-length 256]
import { join } from 'node:path';
import { createBackend } from '../core/engine/index.ts';
import { loadStage } from '../core/model/loader.ts';
import { fullModelSpec } from '../core/model/llama.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { Trainer } from '../core/train/trainer.ts';
import { ensureExampleAssets } from '../coordinator/example/assets.ts';
import { readRecords } from '../coordinator/data/records.ts';
import { tokenizeRecords } from '../coordinator/data/tokenize.ts';
import { CounterRng } from '../common/rng.ts';
import type { Example } from '../core/train/batch.ts';

const arg = (k: string, d: string): string => { const i = process.argv.indexOf(k); return i > 0 ? process.argv[i + 1] : d; };
const backend = arg('--backend', 'cpu') as 'cpu' | 'cuda';
const STEPS = Number(arg('--steps', '6'));
const MBS = arg('--mbs', '8,16').split(',').map(Number);
const MAXLEN = Number(arg('--max-length', '256'));

/** Seed-like records: '#'-joined keywords → a description whose length varies a lot (10–400 characters). */
function seedLike(n: number): { kind: 'alpaca'; instruction: string; output: string }[] {
  const rng = new CounterRng(77, 1);
  const words = ['数据库', 'openpie', '拓数派', 'cloud', 'native', 'vector', 'search', '存储', 'compute', 'AI', 'lakehouse', '分析'];
  return Array.from({ length: n }, () => {
    const kw = Array.from({ length: 1 + rng.int(4) }, () => words[rng.int(words.length)]).join('#');
    const len = Math.floor(10 * Math.exp(rng.next() * Math.log(40)));   // log-uniform 10..400 chars
    let out = '';
    while (out.length < len) out += words[rng.int(words.length)] + (rng.next() < 0.3 ? '，' : ' ');
    return { kind: 'alpaca' as const, instruction: kw, output: out.slice(0, len) };
  });
}

async function main(): Promise<void> {
  const be = await createBackend(backend);
  const assets = ensureExampleAssets(process.env.DQLORA_ROOT ? join(process.env.DQLORA_ROOT, 'examples-cache') : undefined);
  const tok = loadTokenizer(assets.modelDir);
  const cfg = loadModelConfig(assets.modelDir);
  const datasets: [string, Example[]][] = [
    ['built-in example', tokenizeRecords(readRecords(assets.trainPath).records, tok, { maxLength: MAXLEN }).examples],
    ['seed-like pairs', tokenizeRecords(seedLike(2000), tok, { maxLength: MAXLEN }).examples],
  ];
  const rows: string[] = [];
  for (const [name, examples] of datasets) {
    const lens = examples.map((e) => e.inputIds.length).sort((a, b) => a - b);
    const med = lens[lens.length >> 1], p95 = lens[Math.floor(lens.length * 0.95)];
    for (const mbs of MBS) {
      const res: Record<string, { tps: number }> = {};
      for (const packed of [false, true]) {
        const stage = loadStage(be, assets.modelDir, fullModelSpec(cfg), { lora: { r: 8, alpha: 16, dropout: 0.05, useRslora: false, targetModules: 'all-linear' }, seed: 1 });
        const tr = new Trainer(be, [stage], examples, {
          epochs: 1, microBatchSize: mbs, gradAccum: 1, replicas: 1, lr: 1e-4, schedule: 'constant', warmupSteps: 0, weightDecay: 0,
          beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1, seed: 1, padId: tok.padId ?? 0, packing: packed ? { maxLength: MAXLEN } : undefined,
        }, { configHash: '', dataHash: '' });
        tr.step();   // warm-up
        let tokens = 0;
        const t0 = performance.now();
        for (let s = 0; s < STEPS; s++) tokens += tr.step().tokens;   // real (non-padding) tokens of the step
        res[packed ? 'packed' : 'padded'] = { tps: tokens / ((performance.now() - t0) / 1000) };
        for (const p of stage.loraParams()) p.free();
      }
      rows.push(`| ${name} (${examples.length} ex., median ${med} / p95 ${p95} tokens) | ${mbs} | ${Math.round(res.padded.tps).toLocaleString('en-US')} | ${Math.round(res.packed.tps).toLocaleString('en-US')} | ${(res.packed.tps / res.padded.tps).toFixed(2)}× |`);
      process.stderr.write(rows.at(-1) + '\n');
    }
  }
  process.stdout.write(`\n${be.name}, max_length ${MAXLEN}, ${STEPS} steps after one warm-up, LoRA r8 all-linear, NF4 base\n\n`);
  process.stdout.write('| dataset | micro-batch | useful tokens/s, padded | useful tokens/s, packed | speed-up |\n|---|---|---|---|---|\n');
  process.stdout.write(rows.join('\n') + '\n');
}

await main();
