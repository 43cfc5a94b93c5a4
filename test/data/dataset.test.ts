import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildDataset, recordKey } from '../../coordinator/data/dataset.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { ConfigError } from '../../common/errors.ts';
import { tinyTokenizer, tinyDecode, tempDir, writeFile, jsonl } from './helpers.ts';

const dir = tempDir();
const tok = tinyTokenizer();

/** 60 distinct pairs; pair i appears 1 + (i % 3) times (120 records), in an interleaved order. */
function seedLikeFile(): string {
  const rows: { instruction: string; output: string }[] = [];
  for (let copy = 0; copy < 3; copy++) {
    for (let i = 0; i < 60; i++) if (copy <= i % 3) rows.push({ instruction: `kw${i}#产品${i}`, output: `描述 ${i}` });
  }
  return writeFile(dir, 'seedlike.jsonl', jsonl(rows));
}
const trainPath = seedLikeFile();
/** The instruction of the record an example came from. */
const recs = readRecords(trainPath).records;
const keyOf = (sourceIndex: number): string => recordKey(recs[sourceIndex]);

test('dedup keeps the first occurrence of each exact record and counts the rest', () => {
  const d = buildDataset({ trainPath, dedup: true, seed: 1, maxLength: 64 }, tok);
  assert.equal(d.stats.records, 120);
  assert.equal(d.stats.duplicatesRemoved, 60);
  assert.equal(d.train.length, 60);
  assert.deepEqual(d.train.map((e) => e.sourceIndex), Array.from({ length: 60 }, (_, i) => i)); // the first copy, file order
  const noDedup = buildDataset({ trainPath, seed: 1, maxLength: 64 }, tok);
  assert.equal(noDedup.train.length, 120);
  assert.equal(noDedup.stats.duplicatesRemoved, 0);
  assert.equal(noDedup.stats.trainTokens, noDedup.train.reduce((a, e) => a + e.inputIds.length, 0));
  // each example: BOS + prompt + answer + EOS; its labels cover "描述 i" + EOS
  const e = d.train[7];
  assert.equal(tinyDecode(e.inputIds), '<s>### Instruction:\nkw7#产品7\n\n### Response:\n描述 7</s>');
  assert.equal(d.stats.trainLabelTokens, d.train.reduce((a, x) => a + x.labels.filter((l) => l !== -100).length, 0));
});

test('split: deterministic from the seed, disjoint, and copies of a record never straddle train/validation', () => {
  for (const dedup of [true, false]) {
    const a = buildDataset({ trainPath, dedup, validationSplit: 0.25, seed: 7, maxLength: 64 }, tok);
    const b = buildDataset({ trainPath, dedup, validationSplit: 0.25, seed: 7, maxLength: 64 }, tok);
    const c = buildDataset({ trainPath, dedup, validationSplit: 0.25, seed: 8, maxLength: 64 }, tok);
    const valKeys = (d: typeof a): string[] => d.validation.map((e) => keyOf(e.sourceIndex));
    assert.deepEqual(valKeys(a), valKeys(b));
    assert.notDeepEqual(valKeys(a), valKeys(c));
    assert.equal(new Set(valKeys(a)).size, 15); // 25% of 60 unique records
    const trainKeys = new Set(a.train.map((e) => keyOf(e.sourceIndex)));
    for (const k of valKeys(a)) assert.ok(!trainKeys.has(k), 'no validation record also in train');
    if (dedup) assert.equal(a.train.length + a.validation.length, 60);
    else assert.equal(a.train.length + a.validation.length, 120);
  }
  const count = buildDataset({ trainPath, dedup: true, validationSplit: 10, seed: 7, maxLength: 64 }, tok);
  assert.equal(count.validation.length, 10);
  assert.equal(count.train.length, 50);
});

test('a validation file is read as is; overlap with the training file is counted', () => {
  const valPath = writeFile(dir, 'val.jsonl', jsonl([
    { instruction: 'kw1#产品1', output: '描述 1' }, { instruction: 'new', output: 'x' }, { instruction: 'new', output: 'x' }, 'bad',
  ]));
  const d = buildDataset({ trainPath, validationPath: valPath, dedup: true, seed: 1, maxLength: 64, onError: 'skip' }, tok);
  assert.equal(d.validation.length, 2);
  assert.equal(d.stats.validationOverlap, 1);
  assert.equal(d.stats.skipped, 1);
  assert.equal(d.stats.records, 123);
  assert.equal(d.stats.duplicatesRemoved, 61);
});

test('bad split settings are ConfigErrors', () => {
  assert.throws(() => buildDataset({ trainPath, validationPath: trainPath, validationSplit: 0.1, seed: 1, maxLength: 64 }, tok), ConfigError);
  assert.throws(() => buildDataset({ trainPath, dedup: true, validationSplit: 60, seed: 1, maxLength: 64 }, tok), /leaving none for training/);
  assert.throws(() => buildDataset({ trainPath, validationSplit: 1.5, seed: 1, maxLength: 64 }, tok), ConfigError);
  assert.throws(() => buildDataset({ trainPath, seed: 1, maxLength: 8 }, tok), /no training example left/);
});
