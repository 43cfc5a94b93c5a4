import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatRecord, formatPrompt } from '../../coordinator/data/format.ts';
import { tokenizeRecords, encodeRecord } from '../../coordinator/data/tokenize.ts';
import type { Record } from '../../coordinator/data/records.ts';
import { ConfigError, DataError, FormatError } from '../../common/errors.ts';
import { tinyTokenizer, ids, tinyDecode, CHATML, BOS, EOS } from './helpers.ts';

const M = -100;
const masked = (n: number): number[] => new Array(n).fill(M);

/** The trained spans of an example, decoded: what the model learns to produce. */
function trainedSpans(inputIds: ArrayLike<number>, labels: ArrayLike<number>): string[] {
  const spans: string[] = [];
  let cur: number[] = [];
  for (let t = 0; t < labels.length; t++) {
    if (labels[t] !== M) { assert.equal(labels[t], inputIds[t]); cur.push(labels[t]); } else if (cur.length) { spans.push(tinyDecode(cur)); cur = []; }
  }
  if (cur.length) spans.push(tinyDecode(cur));
  return spans;
}

test('no template, alpaca: the default prompt format, BOS first, answer + EOS trained, token by token', () => {
  const tok = tinyTokenizer();
  const rec: Record = { kind: 'alpaca', instruction: 'hi', output: 'yo' };
  const prompt = '### Instruction:\nhi\n\n### Response:\n';
  assert.deepEqual(formatRecord(rec, tok), [{ text: prompt, trained: false }, { text: 'yo', trained: true, eos: true }]);
  const { ids: got, labels } = encodeRecord(rec, tok);
  assert.deepEqual(got, [BOS, ...ids(prompt), ...ids('yo'), EOS]);
  assert.deepEqual(labels, [M, ...masked(prompt.length), ...ids('yo'), EOS]);
  assert.equal(formatPrompt(rec, tok), prompt);
});

test('no template, alpaca with system and input: system first, the Input block only when input is non-empty', () => {
  const tok = tinyTokenizer();
  const p = formatRecord({ kind: 'alpaca', instruction: 'Add', input: '1 2', output: '3', system: 'Be brief.' }, tok);
  assert.equal(p[0].text, 'Be brief.\n\n### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n');
  assert.equal(formatPrompt({ instruction: 'Add', input: '' }, tok), '### Instruction:\nAdd\n\n### Response:\n');
});

test('chat template, alpaca: prompt = template with generation prompt; completion = answer + end of turn', () => {
  const tok = tinyTokenizer({ template: CHATML });
  const rec: Record = { kind: 'alpaca', instruction: '拓数派#openpie#数据库', input: 'ctx', output: '一家公司', system: 'sys' };
  const prompt = '<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n拓数派#openpie#数据库\n\nctx<|im_end|>\n<|im_start|>assistant\n';
  assert.deepEqual(formatRecord(rec, tok), [{ text: prompt, trained: false }, { text: '一家公司<|im_end|>\n', trained: true }]);
  const { ids: got, labels } = encodeRecord(rec, tok);
  const completion = ids('一家公司<|im_end|>\n');
  assert.deepEqual(got, [BOS, ...ids(prompt), ...completion]);
  assert.deepEqual(labels, [M, ...masked(ids(prompt).length), ...completion]);
  assert.equal(formatPrompt(rec, tok), prompt);
});

test('chat template, several assistant turns: every assistant span is trained, nothing else', () => {
  const tok = tinyTokenizer({ template: CHATML });
  const rec: Record = { kind: 'chat', messages: [
    { role: 'system', content: 'S' }, { role: 'user', content: 'q1' }, { role: 'assistant', content: 'a1' },
    { role: 'user', content: 'q2' }, { role: 'assistant', content: 'a2' }, { role: 'user', content: 'trailing' },
  ] };
  const pieces = formatRecord(rec, tok);
  assert.deepEqual(pieces.map((p) => [p.text, p.trained]), [
    ['<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n', false],
    ['a1<|im_end|>\n', true],
    ['<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n', false],
    ['a2<|im_end|>\n', true],
    ['<|im_start|>user\ntrailing<|im_end|>\n', false],
  ]);
  const { ids: got, labels } = encodeRecord(rec, tok);
  assert.deepEqual(trainedSpans(got, labels), ['a1<|im_end|>\n', 'a2<|im_end|>\n']);
  assert.equal(tinyDecode(got), '<s>' + pieces.map((p) => p.text).join(''));
});

test('no template, chat: default format per turn, EOS after each assistant turn', () => {
  const tok = tinyTokenizer();
  const rec: Record = { kind: 'chat', messages: [{ role: 'user', content: 'q1' }, { role: 'assistant', content: 'a1' }, { role: 'user', content: 'q2' }, { role: 'assistant', content: 'a2' }] };
  const { ids: got, labels } = encodeRecord(rec, tok);
  assert.equal(tinyDecode(got), '<s>### Instruction:\nq1\n\n### Response:\na1</s>### Instruction:\nq2\n\n### Response:\na2</s>');
  assert.deepEqual(trainedSpans(got, labels), ['a1</s>', 'a2</s>']);
});

test('text records: everything trained, BOS untrained, EOS appended', () => {
  const tok = tinyTokenizer({ template: CHATML });
  const { ids: got, labels } = encodeRecord({ kind: 'text', text: 'abc' }, tok);
  assert.deepEqual(got, [BOS, ...ids('abc'), EOS]);
  assert.deepEqual(labels, [M, ...ids('abc'), EOS]);
});

test('BOS: not doubled when the template writes it; never with addBos false; required with addBos true', () => {
  const withBos = tinyTokenizer({ template: '<s>' + CHATML });
  const rec: Record = { kind: 'alpaca', instruction: 'i', output: 'o' };
  const a = encodeRecord(rec, withBos);
  assert.equal(a.ids[0], BOS);
  assert.notEqual(a.ids[1], BOS);
  assert.notEqual(encodeRecord(rec, tinyTokenizer({ template: CHATML }), false).ids[0], BOS);
  const noBos = tinyTokenizer({ bos: false });
  assert.equal(encodeRecord(rec, noBos).ids[0], ids('#')[0]);
  assert.throws(() => tokenizeRecords([rec], noBos, { maxLength: 64, addBos: true }), ConfigError);
});

test('no template and no EOS: refused (answers would never learn to stop)', () => {
  assert.throws(() => formatRecord({ kind: 'alpaca', instruction: 'i', output: 'o' }, tinyTokenizer({ eos: false })), ConfigError);
});

test('a template that rewrites earlier text is refused with a FormatError naming the difference', () => {
  const tok = tinyTokenizer({ template: "{{ messages|length }}{% for m in messages %}{{ m['content'] }}|{% endfor %}" });
  assert.throws(() => formatRecord({ kind: 'alpaca', instruction: 'i', output: 'o' }, tok), (e: unknown) => {
    assert.ok(e instanceof FormatError);
    assert.match(e.message, /not prefix-stable.*first difference at character 0: "1i\|" vs "2i\|o\|"/s);
    return true;
  });
});

test('a template that raises: DataError naming the record; skipped and counted with onError skip', () => {
  const tok = tinyTokenizer({ template: "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need system') }}{% endif %}" + CHATML });
  const recs: Record[] = [
    { kind: 'alpaca', instruction: 'i', output: 'o', system: 's' },
    { kind: 'alpaca', instruction: 'i', output: 'o' },
  ];
  assert.throws(() => tokenizeRecords(recs, tok, { maxLength: 99 }), (e: unknown) => e instanceof DataError && /record 1: chat template failed/.test(e.message));
  const r = tokenizeRecords(recs, tok, { maxLength: 99, onError: 'skip' });
  assert.equal(r.examples.length, 1);
  assert.equal(r.skipped, 1);
});

test("truncation: 'right' cuts the end; 'left-prompt' drops the oldest prompt tokens and keeps BOS and the answer", () => {
  const tok = tinyTokenizer();
  const rec: Record = { kind: 'alpaca', instruction: 'abcdefghij', output: 'XYZ' };
  const full = encodeRecord(rec, tok);
  const n = full.ids.length; // BOS + prompt + 3 + EOS
  const right = tokenizeRecords([rec], tok, { maxLength: n - 2 });
  assert.equal(right.truncated, 1);
  assert.deepEqual(Array.from(right.examples[0].inputIds), full.ids.slice(0, n - 2));
  assert.deepEqual(Array.from(right.examples[0].labels), full.labels.slice(0, n - 2));
  assert.equal(tinyDecode(right.examples[0].inputIds).endsWith('XY'), true);

  const left = tokenizeRecords([rec], tok, { maxLength: 10, truncation: 'left-prompt' });
  const ex = left.examples[0];
  assert.equal(ex.inputIds.length, 10);
  assert.equal(ex.inputIds[0], BOS);
  // 10 = BOS + 5 prompt tokens kept (its last ones) + XYZ + EOS
  assert.equal(tinyDecode(ex.inputIds), '<s>nse:\nXYZ</s>');
  assert.deepEqual(Array.from(ex.labels), [M, M, M, M, M, M, ...ids('XYZ'), EOS]);
  // The answer alone too long: after the prompt is cut down to one token, the end is cut.
  const tight = tokenizeRecords([rec], tok, { maxLength: 4, truncation: 'left-prompt' });
  assert.equal(tinyDecode(tight.examples[0].inputIds), '<s>\nXY');
});

test('an example with no trainable target left after truncation is dropped and counted', () => {
  const tok = tinyTokenizer();
  const recs: Record[] = [{ kind: 'alpaca', instruction: 'a long instruction', output: 'o' }, { kind: 'alpaca', instruction: 'i', output: 'o' }];
  const r = tokenizeRecords(recs, tok, { maxLength: 37 }); // the second fits exactly: BOS + 34 prompt + o + EOS
  assert.equal(r.droppedNoLabels, 1);
  assert.equal(r.truncated, 1);
  assert.equal(r.examples.length, 1);
  assert.equal(r.examples[0].sourceIndex, 1);
  assert.throws(() => tokenizeRecords(recs, tok, { maxLength: 1 }), ConfigError);
});
