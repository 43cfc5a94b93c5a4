import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readRecords } from '../../coordinator/data/records.ts';
import { DataError } from '../../common/errors.ts';
import { CounterRng } from '../../common/rng.ts';
import { tempDir, writeFile, jsonl } from './helpers.ts';

const dir = tempDir();

test('JSONL: the three record shapes, blank lines, CRLF, a BOM, null fields and extra keys', () => {
  const body = '\uFEFF' + JSON.stringify({ instruction: '拓数派#openpie#数据库', output: '拓数派是一家数据库公司。', id: 7 }) + '\r\n'
    + '\n   \n'
    + JSON.stringify({ instruction: 'Sum', input: '1 2', output: '3', system: 'Be brief.' }) + '\n'
    + JSON.stringify({ instruction: 'x', input: null, output: 'y', system: null }) + '\n'
    + JSON.stringify({ messages: [{ role: 'system', content: 's' }, { role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }] }) + '\n'
    + JSON.stringify({ text: 'raw text' }); // no final newline
  const p = writeFile(dir, 'good.jsonl', body);
  const r = readRecords(p);
  assert.equal(r.format, 'jsonl');
  assert.equal(r.source, p);
  assert.deepEqual(r.skipped, []);
  assert.deepEqual(r.records, [
    { kind: 'alpaca', instruction: '拓数派#openpie#数据库', output: '拓数派是一家数据库公司。' },
    { kind: 'alpaca', instruction: 'Sum', input: '1 2', output: '3', system: 'Be brief.' },
    { kind: 'alpaca', instruction: 'x', output: 'y' },
    { kind: 'chat', messages: [{ role: 'system', content: 's' }, { role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }] },
    { kind: 'text', text: 'raw text' },
  ]);
});

test('JSON: a top-level array (with BOM), and a .json file that is really JSONL', () => {
  const arr = writeFile(dir, 'arr.json', '\uFEFF[\n  {"instruction": "a", "output": "b"},\n  {"text": "t"}\n]\n');
  const r = readRecords(arr);
  assert.equal(r.format, 'json');
  assert.deepEqual(r.records, [{ kind: 'alpaca', instruction: 'a', output: 'b' }, { kind: 'text', text: 't' }]);
  const disguised = writeFile(dir, 'lines.json', '\n' + jsonl([{ instruction: 'a', output: 'b' }, { instruction: 'c', output: 'd' }]));
  const r2 = readRecords(disguised);
  assert.equal(r2.format, 'jsonl');
  assert.equal(r2.records.length, 2);
  assert.deepEqual(readRecords(writeFile(dir, 'empty.jsonl', '')).records, []);
});

function dataErr(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof DataError, `expected DataError, got ${String(e)}`);
    assert.match(e.message, re);
    assert.ok(e.hint && e.hint.length > 0, 'has a hint');
    return true;
  });
}

test('JSONL errors name file:line and what is wrong', () => {
  const good = JSON.stringify({ instruction: 'a', output: 'b' });
  const cases: [string, RegExp][] = [
    ['{"instruction": "a", "output": ', /:2: invalid JSON/],
    ['[1, 2]', /:2: record is an array, not an object/],
    ['"str"', /:2: record is string, not an object/],
    ['{"instruction": "a"}', /:2: missing "output"/],
    ['{"instruction": "a", "output": "   "}', /:2: "output" is empty/],
    ['{"instruction": 5, "output": "b"}', /:2: "instruction" is a number, not a string/],
    ['{"output": "b"}', /:2: missing "instruction"/],
    ['{"instruction": "a", "output": "b", "input": 3}', /:2: "input" is a number/],
    ['{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}', /:2: messages\[0\]\.role "human" is not system, user or assistant/],
    ['{"messages": [{"role": "user", "content": "hi"}]}', /:2: chat has no non-empty assistant turn/],
    ['{"messages": []}', /:2: "messages" is empty/],
    ['{"messages": [{"role": "user", "content": ["a"]}]}', /:2: messages\[0\]\.content is an array/],
    ['{"messages": "hi"}', /:2: "messages" is a string, not an array/],
    ['{"text": ""}', /:2: "text" is empty/],
    ['{"prompt": "a", "response": "b"}', /:2: record has none of the known fields \(found keys: "prompt", "response"\)/],
    ['{"text": "a", "instruction": "b", "output": "c"}', /:2: record mixes formats/],
  ];
  for (const [bad, re] of cases) {
    const p = writeFile(dir, 'bad.jsonl', `${good}\n${bad}\n${good}\n`);
    dataErr(() => readRecords(p), new RegExp('bad\\.jsonl' + re.source));
  }
  dataErr(() => readRecords(writeFile(dir, 'gbk.jsonl', Uint8Array.from([0x7b, 0xc4, 0xe3, 0x7d, 0x0a]))), /gbk\.jsonl:1: not valid UTF-8/);
  dataErr(() => readRecords(writeFile(dir, 'bin.json', 'PK\x03\x04')), /bin\.json: not a JSON\/JSONL dataset/);
  dataErr(() => readRecords(`${dir}/missing.jsonl`), /missing\.jsonl: cannot open dataset file \(ENOENT\)/);
});

test('JSON array errors name file[index]; a syntax error names the line', () => {
  const p = writeFile(dir, 'arr-bad.json', JSON.stringify([{ instruction: 'a', output: 'b' }, { instruction: 'a' }]));
  dataErr(() => readRecords(p), /arr-bad\.json\[1\]: missing "output"/);
  const q = writeFile(dir, 'arr-syntax.json', '[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]');
  dataErr(() => readRecords(q), /arr-syntax\.json:3: invalid JSON/);
  dataErr(() => readRecords(writeFile(dir, 'obj.json', '[1]'.slice(0, 0) + '["x"]')), /obj\.json\[0\]: record is string/);
});

test("skip mode: bad lines are left out and reported by line (JSONL) or index (JSON)", () => {
  const lines = [
    JSON.stringify({ instruction: 'a', output: 'b' }),
    'not json',
    '',
    JSON.stringify({ instruction: 'c', output: '' }),
    JSON.stringify({ text: 'ok' }),
    '42',
  ];
  const r = readRecords(writeFile(dir, 'mixed.jsonl', lines.join('\n')), { onError: 'skip' });
  assert.equal(r.records.length, 2);
  assert.deepEqual(r.skipped.map((s) => s.line), [2, 4, 6]);
  assert.match(r.skipped[0].reason, /invalid JSON/);
  assert.match(r.skipped[1].reason, /"output" is empty/);
  const a = readRecords(writeFile(dir, 'mixed.json', JSON.stringify([{ text: 'x' }, { nope: 1 }, { text: 'y' }])), { onError: 'skip' });
  assert.deepEqual(a.records, [{ kind: 'text', text: 'x' }, { kind: 'text', text: 'y' }]);
  assert.deepEqual(a.skipped.map((s) => s.line), [1]);
});

test('JSONL larger than the read chunk: lines and multi-byte characters split across chunks come back intact', () => {
  const rows: { instruction: string; output: string }[] = [];
  // ~3 MB with odd-sized lines so chunk boundaries (1 MiB) fall inside lines and inside UTF-8 sequences.
  for (let i = 0; i < 6000; i++) rows.push({ instruction: `关键词${i}#kw${i}`, output: '描述'.repeat(100 + (i % 37)) + `#${i}` });
  const r = readRecords(writeFile(dir, 'big.jsonl', jsonl(rows)));
  assert.equal(r.records.length, rows.length);
  for (const i of [0, 1234, 2999, 5999]) {
    assert.deepEqual(r.records[i], { kind: 'alpaca', ...rows[i] });
  }
});

test('fuzz: random and mutated files give records or a DataError, never another error', () => {
  const rng = new CounterRng(0xf00d, 1);
  const seedLines = [
    JSON.stringify({ instruction: '拓数派#openpie#数据库', output: '拓数派是一家公司', input: '', system: 's' }),
    JSON.stringify({ messages: [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'a' }] }),
    JSON.stringify({ text: 'hello 🎉' }),
  ];
  const alphabet = '{}[]":,\\ \n\rabc0-9null truefalse"instruction""output""messages""role""content""text"\u00e9\u4e2d';
  let ok = 0, errs = 0;
  for (let it = 0; it < 400; it++) {
    let bytes: Uint8Array;
    const mode = it % 3;
    if (mode === 0) {
      bytes = new Uint8Array(rng.int(200));
      for (let i = 0; i < bytes.length; i++) bytes[i] = rng.int(256);
    } else {
      let s = Array.from({ length: 1 + rng.int(5) }, () => seedLines[rng.int(seedLines.length)]).join('\n');
      const chars = Array.from(s);
      for (let m = 0, n = 1 + rng.int(4); m < n; m++) {
        const pos = rng.int(chars.length + 1);
        const op = rng.int(3);
        if (op === 0) chars.splice(pos, 1);
        else if (op === 1) chars.splice(pos, 0, alphabet[rng.int(alphabet.length)]);
        else chars.splice(pos, 0, ...alphabet.slice(rng.int(alphabet.length)).slice(0, 8));
      }
      s = chars.join('');
      bytes = new TextEncoder().encode(mode === 2 ? `[${s.split('\n').join(',')}]` : s);
    }
    const p = writeFile(dir, `fuzz${it % 2 ? '.json' : '.jsonl'}`, bytes);
    for (const onError of ['throw', 'skip'] as const) {
      try {
        const r = readRecords(p, { onError });
        ok++;
        for (const rec of r.records) {
          if (rec.kind === 'alpaca') assert.ok(typeof rec.instruction === 'string' && rec.output.trim() !== '');
          else if (rec.kind === 'chat') assert.ok(rec.messages.some((m) => m.role === 'assistant' && m.content.trim() !== ''));
          else assert.ok(rec.kind === 'text' && rec.text.trim() !== '');
        }
      } catch (e) {
        if (!(e instanceof DataError)) throw new Error(`non-DataError on fuzz input ${it}: ${String(e)}`);
        errs++;
      }
    }
  }
  assert.ok(ok > 50 && errs > 50, `both outcomes exercised (ok ${ok}, errors ${errs})`);
});
