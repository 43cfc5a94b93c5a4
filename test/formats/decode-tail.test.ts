// Answers cut by max_new_tokens in the middle of a character: the example's byte-level BPE spells 拓 as three byte
// tokens; decoding a cut tail must not show U+FFFD, and text for terminals / JSON carries no control characters.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { decodeComplete, loadTokenizer, printableText } from '../../common/tokenizer.ts';

const dir = mkdtempSync(join(tmpdir(), 'dqlora-decode-'));
const tok = loadTokenizer(tinyExampleSetup(dir).model);
test.after(() => rmSync(dir, { recursive: true, force: true }));

test('a character cut after 1 or 2 of its 3 bytes is dropped, not shown as U+FFFD; complete text is unchanged', () => {
  const ids = tok.encode('拓数派 ok', { addSpecialTokens: false });
  assert.deepEqual(ids.slice(0, 3).map((i) => tok.idToToken(i)), ['æ', 'ĭ', 'ĵ'], '拓 = E6 8B 93, one token per byte');
  assert.ok(tok.decode(ids.slice(0, 2)).includes('\uFFFD'), 'the plain decode shows the cut');
  assert.equal(decodeComplete(tok, ids.slice(0, 1)), '');
  assert.equal(decodeComplete(tok, ids.slice(0, 2)), '');
  assert.equal(decodeComplete(tok, ids.slice(0, 3)), '拓');
  // 拓 + 数 (one token) + the first byte of 派
  assert.equal(decodeComplete(tok, ids.slice(0, 5)), '拓数');
  assert.equal(decodeComplete(tok, ids), '拓数派 ok');
  // An invalid byte in the middle is not a cut tail: kept as the tokenizer decodes it.
  const mid = [ids[1], ...tok.encode('ok', { addSpecialTokens: false })];
  assert.equal(decodeComplete(tok, mid), tok.decode(mid));
  assert.ok(decodeComplete(tok, mid).startsWith('\uFFFD'));
});

test('printableText drops C0 (but tab and newline), DEL and C1 control characters', () => {
  assert.equal(printableText('a\u0000b\u0007c\td\ne\u001bf\u007fg\u0085h\u009fi 拓'), 'abc\td\nefghi 拓');
  assert.equal(JSON.stringify(printableText('x\u0001y')), '"xy"');
});
