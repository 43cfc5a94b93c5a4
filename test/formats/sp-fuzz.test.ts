// Fuzzing the SentencePiece model-file loader (common/sp-tokenizer.ts): truncated, bit-flipped and random
// `tokenizer.model` bytes must give a FormatError / UnsupportedError or a tokenizer whose encode and decode work
// (ids in range, strings out) — never a TypeError, a RangeError, a hang or an out-of-range id. Hand-built
// ModelProtos check each structural rule by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { SentencePieceProcessor } from '../../common/sp-tokenizer.ts';
import { FormatError, UnsupportedError } from '../../common/errors.ts';
import { Philox } from '../helpers/prng.ts';

const FIX = path.join(import.meta.dirname, '..', 'fixtures', 'sentencepiece');
const SAMPLES = ['', 'Hello  world ', '你好，世界！', '[Round 1]\n\n问：你好\n\n答：', '🙂 ＡＢＣ１２３ <br><sep>', 'a'.repeat(300)];

const named = (e: unknown): boolean => e instanceof FormatError || e instanceof UnsupportedError;

/** Loads `bytes`; when that works, encodes and decodes the samples and checks the results are sane. */
function tryModel(bytes: Uint8Array): 'rejected' | 'loaded' {
  let sp: SentencePieceProcessor;
  try {
    sp = SentencePieceProcessor.fromBytes(bytes, 'fuzz/tokenizer.model');
  } catch (e) {
    if (!named(e)) throw e;
    assert.match((e as Error).message, /fuzz\/tokenizer\.model/, 'the error names the file');
    return 'rejected';
  }
  for (const s of SAMPLES) {
    let ids: number[];
    try {
      ids = sp.encodeIds(s);
    } catch (e) {
      if (!named(e)) throw e; // a corrupt charsmap is only found when a lookup walks into it
      continue;
    }
    assert.ok(ids.every((i) => Number.isSafeInteger(i) && i >= 0 && i < sp.size), 'ids are in range');
    assert.deepEqual(sp.encodeIds(s), ids, 'deterministic');
    assert.equal(typeof sp.decodeIds(ids), 'string');
  }
  return 'loaded';
}

for (const name of ['bpe', 'unigram']) {
  test(`${name}.model: every truncation and random byte mutations give named errors or a working tokenizer`, () => {
    const base = new Uint8Array(fs.readFileSync(path.join(FIX, `${name}.model`)));
    const rng = new Philox(name === 'bpe' ? 11 : 12);
    const counts = { rejected: 0, loaded: 0 };
    // Truncations: a prefix of a protobuf is often a valid, smaller message (fewer pieces, no normalizer spec).
    const step = Math.max(1, Math.floor(base.length / 300));
    for (let n = 0; n < base.length; n += step) counts[tryModel(base.subarray(0, n))]++;
    // Byte mutations: 1–8 random bytes overwritten (lengths, tags, scores, piece text, charsmap trie units).
    for (let it = 0; it < 400; it++) {
      const b = base.slice();
      for (let k = 1 + rng.int(8); k > 0; k--) b[rng.int(b.length)] = rng.int(256);
      counts[tryModel(b)]++;
    }
    // Mutations confined to the tail (the unigram model's precompiled charsmap lives there): loads, then fails or
    // works at lookup time.
    for (let it = 0; it < 200; it++) {
      const b = base.slice();
      for (let k = 1 + rng.int(4); k > 0; k--) b[b.length - 1 - rng.int(Math.min(b.length, 200_000))] = rng.int(256);
      counts[tryModel(b)]++;
    }
    for (let it = 0; it < 100; it++) counts[tryModel(rng.bytes(1 + rng.int(512)))]++;
    assert.ok(counts.rejected > 50 && counts.loaded > 20, JSON.stringify(counts));
  });
}

// A tiny protobuf writer for hand-built ModelProtos.
function varint(n: number): number[] {
  const out: number[] = [];
  do { let b = n % 128; n = Math.floor(n / 128); if (n > 0) b |= 0x80; out.push(b); } while (n > 0);
  return out;
}
const field = (num: number, wire: number, payload: number[]): number[] => [...varint(num * 8 + wire), ...(wire === 2 ? varint(payload.length) : []), ...payload];
const str = (s: string): number[] => [...new TextEncoder().encode(s)];
const f32 = (x: number): number[] => [...new Uint8Array(new Float32Array([x]).buffer)];
const piece = (p: string, score: number, type?: number): number[] => field(1, 2, [...field(1, 2, str(p)), ...field(2, 5, f32(score)), ...(type ? field(3, 0, varint(type)) : [])]);
const trainer = (...fields: number[][]): number[] => field(2, 2, fields.flat());
const PIECES = [piece('<unk>', 0, 2), piece('<s>', 0, 3), piece('</s>', 0, 3), piece('▁a', -1), piece('a', -2), piece('▁', -3)];
const BASE = PIECES.flat();

test('hand-built model files: each structural rule is a named error that says what is wrong', () => {
  const cases: [number[], typeof FormatError | typeof UnsupportedError, RegExp][] = [
    [[], FormatError, /the model has no pieces/],
    [[...BASE, ...trainer(field(3, 0, [3]))], UnsupportedError, /WORD models are not supported/],
    [[...BASE, ...trainer(field(3, 0, [9]))], UnsupportedError, /type 9 models are not supported/],
    [[...BASE, ...piece('a', -5)], FormatError, /piece "a" is defined twice/],
    [PIECES.slice(1).flat(), FormatError, /no <unk> piece/],
    [[...BASE, ...piece('<unk2>', 0, 2)], FormatError, /two <unk> pieces/],
    [[...BASE, ...piece('<0x41>', 0, 6)], FormatError, /byte piece <0x41> found although byte_fallback is false/],
    [[...BASE, ...piece('<0x41>', 0, 6), ...trainer(field(35, 0, [1]))], FormatError, /not all 256 byte pieces exist/],
    [[...BASE, ...piece('x', 0, 9)], FormatError, /unknown piece type 9/],
    [[...BASE, ...piece('', 0)], FormatError, /piece 6 is empty/],
    [[...BASE, ...field(1, 0, [1])], FormatError, /wire type 0, expected 2/],
    [[...BASE, 0x0a, 0x80], FormatError, /truncated varint/],
    [[...BASE, 0x0a, 0x05, 0x01], FormatError, /runs past the end/],
    [[...BASE, 0x4b], FormatError, /unsupported wire type 3/],
    [[...BASE, 0x00], FormatError, /field number 0/],
    [[...BASE, ...field(1, 2, field(1, 2, [0xff, 0xfe]))], FormatError, /not UTF-8/],
    [[...BASE, ...field(3, 2, field(2, 2, [1, 0, 0, 0, 0]))], FormatError, /charsmap's trie size 1 does not fit|too short/],
    [[...BASE, ...trainer(field(24, 0, [1]))], UnsupportedError, /treat_whitespace_as_suffix/],
  ];
  for (const [bytes, cls, re] of cases) {
    assert.throws(() => SentencePieceProcessor.fromBytes(Uint8Array.from(bytes), 'hand/tokenizer.model'),
      (e: unknown) => e instanceof cls && re.test((e as Error).message) && (e as Error).message.includes('hand/tokenizer.model'), String(re));
  }
  // The minimal valid model: unigram by default, default normalizer (no charsmap: identity), unknown chars → <unk>.
  const sp = SentencePieceProcessor.fromBytes(Uint8Array.from(BASE), 'hand/tokenizer.model');
  assert.deepEqual([sp.modelType, sp.size, sp.unkId, sp.bosId, sp.eosId, sp.padId], ['unigram', 6, 0, 1, 2, -1]);
  assert.deepEqual(sp.encodePieces('  a  aa b '), ['▁a', '▁a', 'a', '▁', 'b']);
  assert.deepEqual(sp.encodeIds('  a  aa b '), [3, 3, 4, 5, 0]);
  assert.equal(sp.decodeIds([1, 3, 3, 4, 5, 0, 2]), 'a aa  \u2047 ');
  assert.throws(() => sp.decodeIds([6]), /token id 6 is out of range/);
  // A corrupt charsmap (trie units pointing outside the array) is found at lookup time, as a FormatError.
  const trie = [0xffffffff, 0xffffffff];
  const blob = [...new Uint8Array(new Uint32Array([8]).buffer), ...new Uint8Array(new Uint32Array(trie).buffer), 0x41, 0];
  const bad = SentencePieceProcessor.fromBytes(Uint8Array.from([...BASE, ...field(3, 2, field(2, 2, blob))]), 'hand/tokenizer.model');
  assert.throws(() => bad.encodeIds('a'), (e: unknown) => e instanceof FormatError && /precompiled charsmap is corrupt/.test((e as Error).message));
});
