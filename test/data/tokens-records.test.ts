// Pre-tokenized records {input_ids, labels?}: used as given (no template, no BOS/EOS), labels default to every
// token; bad values stop with file:line and a hint.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';

const dir = mkdtempSync(join(tmpdir(), 'dqlora-tokens-'));
const file = (name: string, lines: unknown[]): string => { const p = join(dir, name); writeFileSync(p, lines.map((l) => JSON.stringify(l)).join('\n') + '\n'); return p; };
const tok = { encode: (): number[] => { throw new Error('not used'); }, applyChatTemplate: (): string => '', chatTemplate: null, bosId: 1, eosId: 2, padId: 0 };

test('pre-tokenized records are used exactly as given; without labels every token is trained', () => {
  const { records } = readRecords(file('ok.jsonl', [{ input_ids: [5, 6, 7, 8], labels: [-100, -100, 7, 8] }, { input_ids: [9, 10, 11] }]));
  const { examples } = tokenizeRecords(records, tok, { maxLength: 16 });
  assert.deepEqual(examples.map((e) => [Array.from(e.inputIds), Array.from(e.labels)]), [[[5, 6, 7, 8], [-100, -100, 7, 8]], [[9, 10, 11], [9, 10, 11]]]);
});

test('bad pre-tokenized records name the line and the field', () => {
  const err = (lines: unknown[]): string => { try { readRecords(file('bad.jsonl', lines)); } catch (e) { return (e as Error).message; } return 'no error'; };
  assert.match(err([{ input_ids: [1, 2] }, { input_ids: [1, -3] }]), /bad\.jsonl:2: input_ids\[1\] is -3, not a token id/);
  assert.match(err([{ input_ids: [1, 2], labels: [1] }]), /bad\.jsonl:1: "labels" has 1 entries, "input_ids" 2/);
  assert.match(err([{ input_ids: [] }]), /"input_ids" is empty/);
  assert.match(err([{ input_ids: [1], text: 'x' }]), /mixes formats/);
});
