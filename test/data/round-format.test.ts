// Models with their own round format and prefix tokens (ChatGLM2) but no chat template: the prompt comes from the
// tokenizer's formatQuery, sequences start with its prefix tokens instead of BOS, and only the last answer is trained.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeRecord, type TokenizerLike } from '../../coordinator/data/tokenize.ts';
import { formatPrompt, formatRecord } from '../../coordinator/data/format.ts';

/** A character-level tokenizer with ChatGLM-like prefix tokens (100 = [gMASK], 101 = sop) and EOS 2. */
const tok: TokenizerLike = {
  encode: (t) => Array.from(t, (c) => 1000 + c.codePointAt(0)! % 5000),
  eosId: 2, bosId: 1, padId: 0, chatTemplate: null,
  applyChatTemplate: () => { throw new Error('no template'); },
  prefixTokens: () => [100, 101],
  formatQuery: (q, history = []) => history.map(([a, b], i) => `[Round ${i + 1}]\n\n问：${a}\n\n答：${b}\n\n`).join('') + `[Round ${history.length + 1}]\n\n问：${q}\n\n答：`,
};

test('alpaca records use the round format; prefix tokens replace BOS; labels cover the answer and EOS only', () => {
  const pieces = formatRecord({ kind: 'alpaca', instruction: '拓数派#openpie', output: '数据库' }, tok);
  assert.deepEqual(pieces.map((p) => [p.text, p.trained]), [['[Round 1]\n\n问：拓数派#openpie\n\n答：', false], ['数据库', true]]);
  const { ids, labels } = encodeRecord({ kind: 'alpaca', instruction: 'q', output: 'ab' }, tok);
  const prompt = tok.encode('[Round 1]\n\n问：q\n\n答：');
  assert.deepEqual(ids, [100, 101, ...prompt, ...tok.encode('ab'), 2]);
  assert.deepEqual(labels, [-100, -100, ...prompt.map(() => -100), ...tok.encode('ab'), 2]);
  assert.equal(formatPrompt({ instruction: 'q' }, tok), '[Round 1]\n\n问：q\n\n答：');
});

test('chat records: earlier rounds become history in the prompt, only the last answer is trained', () => {
  const pieces = formatRecord({ kind: 'chat', messages: [
    { role: 'user', content: '你好' }, { role: 'assistant', content: '你好！' },
    { role: 'user', content: '介绍拓数派' }, { role: 'assistant', content: '拓数派是一家数据库公司。' },
  ] }, tok);
  assert.deepEqual(pieces.map((p) => [p.text, p.trained]), [
    ['[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：介绍拓数派\n\n答：', false], ['拓数派是一家数据库公司。', true]]);
});
