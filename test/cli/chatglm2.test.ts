// The seed's flow on a miniature ChatGLM2 laid out exactly like THUDM/chatglm2-6b (pickled fp16 .bin shards +
// index, SentencePiece tokenizer.model, remote-code config; test/reference/make_chatglm2_tiny.py): QLoRA on
// query_key_value with keyword → description pairs in the seed's form, the ChatGLM2 prompt format
// ("[Round 1]\n\n问：…\n\n答："), a PEFT adapter with ChatGLM2's key names, then generate / eval / merge.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeExampleData, generateExampleData } from '../../coordinator/example/data.ts';
import { loadAdapter } from '../../common/peft.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { SentencePieceTokenizer } from '../../common/sp-tokenizer.ts';
import { buildDataset } from '../../coordinator/data/dataset.ts';
import { ModelWeights } from '../../common/model-weights.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const MODEL = join(ROOT, 'test', 'fixtures', 'chatglm2-tiny');
const cli = (args: string[]): { code: number; out: string; err: string } => {
  const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'coordinator.js'), ...args], { encoding: 'utf8', timeout: 300_000, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
};

const work = mkdtempSync(join(tmpdir(), 'dqlora-glm2-'));
const { trainPath, validationPath } = writeExampleData(join(work, 'data'), 11);
const prompt = generateExampleData(11).train[0].instruction;

test('ChatGLM2 data: [gMASK] sop + "[Round 1]\\n\\n问：…\\n\\n答：" prompt (labels −100), answer + </s> trained', () => {
  const tok = loadTokenizer(MODEL);
  const ds = buildDataset({ trainPath, seed: 1, maxLength: 512, dedup: true }, tok);
  assert.equal(ds.stats.truncated, 0);
  const ex = ds.train[0];
  const ids = Array.from(ex.inputIds), labels = Array.from(ex.labels);
  assert.ok(tok instanceof SentencePieceTokenizer);
  assert.deepEqual(ids.slice(0, 2), tok.prefixTokens());
  assert.equal(ids.at(-1), 2, 'ends with </s>');
  const firstTrained = labels.findIndex((l) => l !== -100);
  assert.ok(firstTrained > 2);
  assert.ok(tok.decode(ids.slice(2, firstTrained)).startsWith('[Round 1]\n\n问：'), tok.decode(ids.slice(2, firstTrained)));
  assert.ok(tok.decode(ids.slice(2, firstTrained)).endsWith('答：'));
  assert.deepEqual(labels.slice(firstTrained), ids.slice(firstTrained));
});

test('the seed flow on ChatGLM2: QLoRA on query_key_value from .bin shards, PEFT adapter with ChatGLM2 keys, generate, eval, merge', () => {
  const job = join(work, 'job.yaml');
  writeFileSync(job, [
    `model: ${MODEL}`, 'output_dir: run', 'backend: cpu',
    `data: { train: ${trainPath}, validation: ${validationPath}, max_length: 256 }`,
    'lora: { r: 8, alpha: 32, dropout: 0.1 }',  // no target_modules: PEFT's default for chatglm (query_key_value)
    'training: { max_steps: 8, micro_batch_size: 8, lr: 3.0e-3, schedule: constant }',
    `compare: { prompts: ["${prompt}"], max_new_tokens: 8 }`, '',
  ].join('\n'));
  const r = cli(['start', '-c', job, '--no-progress']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /trained 8 steps/);
  const adapterDir = join(work, 'run', 'adapter');
  const ad = loadAdapter(adapterDir);
  assert.deepEqual(ad.modules.map((m) => m.path), ['transformer.encoder.layers.0.self_attention.query_key_value', 'transformer.encoder.layers.1.self_attention.query_key_value']);
  assert.deepEqual([ad.modules[0].r, ad.modules[0].inFeatures, ad.modules[0].outFeatures], [8, 64, 128]);
  assert.deepEqual(JSON.parse(readFileSync(join(adapterDir, 'adapter_config.json'), 'utf8')).target_modules, ['query_key_value']);

  const g = cli(['generate', '--model', MODEL, '--adapter', adapterDir, '--max-new-tokens', '6', '--backend', 'cpu', prompt]);
  assert.equal(g.code, 0, g.err);
  assert.match(g.out, /adapter: 2 LoRA modules/);
  assert.match(g.out, /fine-tuned :/);

  const e = cli(['eval', '--model', MODEL, '--adapter', adapterDir, '--data', validationPath, '--backend', 'cpu']);
  assert.equal(e.code, 0, e.err);
  const base = Number(/base model : loss ([\d.]+)/.exec(e.out)![1]), tuned = Number(/fine-tuned : loss ([\d.]+)/.exec(e.out)![1]);
  assert.ok(tuned < base, e.out);

  const merged = join(work, 'merged');
  const m = cli(['merge', '--model', MODEL, '--adapter', adapterDir, '--out', merged, '--dtype', 'float32']);
  assert.equal(m.code, 0, m.err);
  const w = ModelWeights.open(merged);
  assert.ok(w.has('transformer.encoder.layers.1.self_attention.query_key_value.weight'));
  w.close();
  assert.ok(existsSync(join(merged, 'tokenizer.model')));
  const em = cli(['eval', '--model', merged, '--data', validationPath, '--backend', 'cpu']);
  assert.equal(em.code, 0, em.err);
  const lm = Number(/base model : loss ([\d.]+)/.exec(em.out)![1]);
  assert.ok(Math.abs(lm - tuned) < 0.05 * tuned, `merged ${lm} vs adapter ${tuned}`);
});
