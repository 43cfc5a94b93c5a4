import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { trainByteLevelBpe, BYTE_TO_CHAR } from '../../coordinator/example/bpe.ts';
import { generateExampleData, writeExampleData, knowledgeBase } from '../../coordinator/example/data.ts';
import { writeExampleTokenizer, EXAMPLE_SPECIAL_TOKENS, EXAMPLE_VOCAB_SIZE } from '../../coordinator/example/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { buildDataset } from '../../coordinator/data/dataset.ts';
import type { TokenizerLike } from '../../coordinator/data/tokenize.ts';
import { tempDir } from '../data/helpers.ts';

const SEED = 1234;
const { train, validation } = generateExampleData(SEED);
const corpus = train.flatMap((p) => [p.instruction, p.output]);

const HARD_STRINGS = [
  '拓数派#openpie#数据库',
  '云舟（CloudBoat）是墨川科技推出的向量数据库，面向推荐系统场景。',
  "It's a test: don't panic! 3.14159 == π? ",
  'emoji 🎉👩‍💻🇨🇳 and rare 𝔘𝔫𝔦 齉 𠀀 ꙮ',
  '  leading and trailing spaces, tabs\t\tand\r\nnewlines\n\n',
  '<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n',
  'control \u0000\u0001\u007f and zero-width \u200b\u200d joiners',
  'ÀÉÎÕÜ ß œ ﬁ — “quotes” ‘single’ … 〜',
];

function hfTokenizer(dir: string): { tok: Tokenizer; config: { chat_template: string; bos_token: string; eos_token: string; pad_token: string } } {
  const tj = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')) as object;
  const config = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
  return { tok: new Tokenizer(tj, config), config };
}

/** The TokenizerLike over @huggingface/tokenizers + jinja (what common/tokenizer.ts provides in the app). */
function tokenizerLike(dir: string): TokenizerLike {
  const { tok, config } = hfTokenizer(dir);
  const template = new Template(config.chat_template);
  return {
    encode: (text, o = {}) => tok.encode(text, { add_special_tokens: o.addSpecialTokens ?? true }).ids,
    eosId: tok.token_to_id(config.eos_token) ?? null,
    bosId: tok.token_to_id(config.bos_token) ?? null,
    padId: tok.token_to_id(config.pad_token) ?? null,
    chatTemplate: config.chat_template,
    applyChatTemplate: (messages, o = {}) => template.render({ messages, add_generation_prompt: o.addGenerationPrompt ?? false }),
  };
}

test('BPE: @huggingface/tokenizers loads the trained tokenizer.json and round-trips Chinese, English, emoji and rare characters exactly', () => {
  const tj = trainByteLevelBpe([...corpus, ...HARD_STRINGS.slice(0, 3)], { vocabSize: 1500, specialTokens: [...EXAMPLE_SPECIAL_TOKENS], maxNonAsciiChars: 2 });
  const size = Object.keys(tj.model.vocab).length;
  assert.ok(size <= 1500 && size > 800, `vocab ${size}`);
  assert.equal(tj.model.merges.length >= size - 256 - EXAMPLE_SPECIAL_TOKENS.length, true);
  const tok = new Tokenizer(tj, { bos_token: '<|begin_of_text|>', eos_token: '<|im_end|>' });
  for (const s of [...HARD_STRINGS, ...train.slice(0, 50).map((p) => p.output)]) {
    const ids = tok.encode(s).ids;
    for (const id of ids) assert.ok(Number.isInteger(id) && id >= 0 && id < size, `id ${id} in range`);
    assert.equal(tok.decode(ids), s);
  }
  // special tokens are single ids at the end of the vocabulary, never split
  tj.added_tokens.forEach((t, k) => {
    assert.equal(t.id, size - EXAMPLE_SPECIAL_TOKENS.length + k);
    assert.deepEqual(tok.encode(`x${t.content}y`).ids.filter((id: number) => id === t.id).length, 1);
  });
  // bytes are ids 0..255 so any byte string is encodable
  assert.equal(tj.model.vocab[BYTE_TO_CHAR[0xe4]], 0xe4);
});

test('BPE: deterministic; with maxNonAsciiChars 2 no token straddles a character or spans more than two non-ASCII characters', () => {
  const opts = { vocabSize: 1200, specialTokens: ['<|pad|>'], maxNonAsciiChars: 2 };
  const a = trainByteLevelBpe(corpus, opts);
  assert.deepEqual(a, trainByteLevelBpe(corpus, opts));
  const byteOf = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));
  const strict = new TextDecoder('utf-8', { fatal: true });
  for (const token of Object.keys(a.model.vocab)) {
    if (token === '<|pad|>') continue;
    const bytes = Uint8Array.from(token, (c) => byteOf.get(c)!);
    if (bytes.every((b) => b < 0x80)) continue;
    let text: string | null = null;
    try { text = strict.decode(bytes); } catch { text = null; }
    if (text !== null) assert.ok(Array.from(text).length <= 2, `token ${JSON.stringify(text)}`);
    else {
      // a piece of one character: a lead byte first (or none), then continuation bytes only
      const leads = Array.from(bytes).filter((b) => b < 0x80 || b >= 0xc0).length;
      assert.ok(leads === 0 || (leads === 1 && bytes[0] >= 0xc0), `partial token ${Array.from(bytes)}`);
    }
  }
});

test('example data: deterministic, ~400 training pairs with ≈30% exact duplicates, 40 validation pairs', () => {
  assert.deepEqual(generateExampleData(SEED), { train, validation });
  const other = generateExampleData(SEED + 1);
  assert.notDeepEqual(other.train, train);
  assert.ok(train.length >= 300 && train.length <= 500, `train ${train.length}`);
  assert.equal(validation.length, 40);
  const unique = new Set(train.map((p) => JSON.stringify(p)));
  const dupRatio = 1 - unique.size / train.length;
  assert.ok(Math.abs(dupRatio - 0.3) < 0.02, `duplicate ratio ${dupRatio}`);
  // descriptions are a function of the keywords, the same for every seed
  const kb = new Map(knowledgeBase().map((it) => [it.keywords.join('#'), it.output]));
  for (const p of [...train, ...other.train]) {
    assert.equal(kb.get(p.instruction), p.output);
    assert.equal(p.instruction.split('#').length, 3);
  }
  const trainInstr = new Set(train.map((p) => p.instruction));
  const trainOutputs = new Set(train.map((p) => p.output));
  const heldOut = validation.filter((p) => !trainOutputs.has(p.output));
  const reordered = validation.filter((p) => trainOutputs.has(p.output));
  assert.equal(heldOut.length, 20);
  assert.equal(reordered.length, 20);
  for (const p of validation) assert.ok(!trainInstr.has(p.instruction), `validation instruction ${p.instruction} not asked in training`);
  for (const p of reordered) {
    const [k0, k1, k2] = p.instruction.split('#');
    assert.equal(kb.get([k1, k0, k2].join('#')), p.output);
  }
});

test('example end to end: files → tokenizer → buildDataset; answers are the trained spans, sequences short', () => {
  const dir = tempDir('dqlora-example-');
  const { trainPath, validationPath } = writeExampleData(path.join(dir, 'data'), SEED);
  assert.deepEqual(readRecords(trainPath).records.map((r) => r.kind === 'alpaca' && { instruction: r.instruction, output: r.output }), train);
  const { vocabSize } = writeExampleTokenizer(path.join(dir, 'model'), corpus);
  assert.ok(vocabSize <= EXAMPLE_VOCAB_SIZE && vocabSize >= 1000, `vocab ${vocabSize}`);
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']) assert.ok(fs.existsSync(path.join(dir, 'model', f)));
  const tok = tokenizerLike(path.join(dir, 'model'));
  const { tok: hf } = hfTokenizer(path.join(dir, 'model'));
  assert.equal(tok.applyChatTemplate([{ role: 'user', content: 'q' }], { addGenerationPrompt: true }),
    '<|begin_of_text|><|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n');

  const ds = buildDataset({ trainPath, validationPath, dedup: true, seed: 42, maxLength: 160 }, tok);
  assert.equal(ds.stats.records, train.length + validation.length);
  assert.equal(ds.stats.duplicatesRemoved, train.length - new Set(train.map((p) => JSON.stringify(p))).size);
  assert.equal(ds.stats.truncated, 0);
  assert.equal(ds.validation.length, 40);
  const answerLens: number[] = [];
  for (const e of ds.train) {
    assert.equal(e.inputIds[0], tok.bosId);
    assert.equal(Array.from(e.inputIds).filter((id) => id === tok.bosId).length, 1, 'one BOS');
    const first = e.labels.findIndex((l) => l !== -100);
    assert.ok(Array.from(e.labels.subarray(first)).every((l, i) => l === e.inputIds[first + i]), 'one trained span at the end');
    assert.equal(hf.decode(Array.from(e.labels.subarray(first))), train[e.sourceIndex].output + '<|im_end|>\n');
    assert.ok(e.inputIds.length <= 80, `sequence of ${e.inputIds.length} tokens`);
    answerLens.push(e.inputIds.length - first);
  }
  const mean = answerLens.reduce((a, b) => a + b, 0) / answerLens.length;
  assert.ok(Math.min(...answerLens) >= 10 && Math.max(...answerLens) <= 60 && mean > 15, `answer tokens ${Math.min(...answerLens)}..${Math.max(...answerLens)}, mean ${mean}`);
});
