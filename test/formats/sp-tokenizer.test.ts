// SentencePiece tokenizers (common/sp-tokenizer.ts) against the Python `sentencepiece` library: two models trained by
// test/reference/make_sp_fixtures.py (BPE with byte fallback — the Llama / ChatGLM2 kind — and unigram with NFKC
// normalization), ~60 strings each (Chinese, English, digits, whitespace runs, emoji, unknown characters,
// full-width forms), decodes of random id lists, a variant with UNUSED pieces; then the transformers layer:
// a Llama-style directory (tokenizer_config.json, added_tokens.json, legacy on/off, chat template) and a
// ChatGLM2-like one (the BPE model + the real THUDM/chatglm2-6b tokenizer_config.json fields).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SentencePieceProcessor, SentencePieceTokenizer, chatGlmPrompt, isChatGlmConfig, parseModelProto, PieceType } from '../../common/sp-tokenizer.ts';
import { loadTokenizer, TextTokenizer, type LoadedTokenizer } from '../../common/tokenizer.ts';
import type { TokenizerLike } from '../../coordinator/data/tokenize.ts';
import { ConfigError, FormatError } from '../../common/errors.ts';

const FIX = path.join(import.meta.dirname, '..', 'fixtures', 'sentencepiece');

interface EncodeCase { text: string; ids: number[]; pieces: string[]; decoded: string; ids_no_dummy: number[] }
interface ModelExpect {
  info: { piece_count: number; unk_id: number; bos_id: number; eos_id: number; pad_id: number; control_ids: number[]; some_pieces: [number, string, number][] };
  encode: EncodeCase[];
  decode: { ids: number[]; decoded: string }[];
  unused_variant: { unused_ids: number[]; ids: number[][] };
}
interface Expected {
  sentencepiece_version: string;
  models: Record<'bpe' | 'unigram', ModelExpect>;
  chatglm: {
    sp_size: number;
    specials: Record<string, number>;
    prompts: { query: string; history: [string, string][]; prompt: string }[];
    encode: { text: string; ids: number[]; ids_with_specials: number[] }[];
  };
}

const EXP = JSON.parse(fs.readFileSync(path.join(FIX, 'expected.json'), 'utf8')) as Expected;
const byText = (m: 'bpe' | 'unigram', t: string): EncodeCase => {
  const c = EXP.models[m].encode.find((e) => e.text === t);
  assert.ok(c, `fixture has ${JSON.stringify(t)}`);
  return c;
};

/** The ChatGLM2 tokenizer_config.json (THUDM/chatglm2-6b), verbatim fields. */
const CHATGLM2_CONFIG = {
  name_or_path: 'THUDM/chatglm2-6b', remove_space: false, do_lower_case: false, tokenizer_class: 'ChatGLMTokenizer',
  auto_map: { AutoTokenizer: ['tokenization_chatglm.ChatGLMTokenizer', null] },
};

function tmpModelDir(files: Record<string, string | object>, model = 'bpe.model'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-sp-'));
  fs.copyFileSync(path.join(FIX, model), path.join(dir, 'tokenizer.model'));
  for (const [name, body] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), typeof body === 'string' ? body : JSON.stringify(body));
  return dir;
}

for (const name of ['bpe', 'unigram'] as const) {
  test(`${name}.model: ids, pieces and decode(ids) equal sentencepiece ${EXP.sentencepiece_version} for every fixture string`, () => {
    const sp = SentencePieceProcessor.load(path.join(FIX, `${name}.model`));
    const info = EXP.models[name].info;
    assert.deepEqual([sp.size, sp.unkId, sp.bosId, sp.eosId, sp.padId], [info.piece_count, info.unk_id, info.bos_id, info.eos_id, info.pad_id]);
    assert.equal(sp.modelType, name);
    for (let id = 0; id < sp.size; id++) assert.equal(sp.isControl(id), info.control_ids.includes(id), `control ${id}`);
    for (const [id, piece, score] of info.some_pieces) {
      assert.equal(sp.idToPiece(id), piece);
      assert.equal(sp.pieces[id].score, Math.fround(score));
      assert.equal(sp.pieceToId(piece), id);
    }
    assert.equal(sp.pieceToId('no such piece'), sp.unkId);
    assert.equal(sp.lookup('no such piece'), -1);
    for (const c of EXP.models[name].encode) {
      assert.deepEqual(sp.encodePieces(c.text), c.pieces, `pieces of ${JSON.stringify(c.text)}`);
      assert.deepEqual(sp.encodeIds(c.text), c.ids, `ids of ${JSON.stringify(c.text)}`);
      assert.deepEqual(sp.encodeIds(c.text, { addDummyPrefix: false }), c.ids_no_dummy, `ids without the dummy prefix of ${JSON.stringify(c.text)}`);
      assert.equal(sp.decodeIds(c.ids), c.decoded, `decode of ${JSON.stringify(c.text)}`);
    }
    for (const c of EXP.models[name].decode) assert.equal(sp.decodeIds(c.ids), c.decoded, `decode ${JSON.stringify(c.ids)}`);
  });

  test(`${name}.model with its most used pieces marked UNUSED encodes like sentencepiece (BPE re-splits them, unigram avoids them)`, () => {
    const m = parseModelProto(fs.readFileSync(path.join(FIX, `${name}.model`)), `${name}.model`);
    const v = EXP.models[name].unused_variant;
    for (const id of v.unused_ids) m.pieces[id].type = PieceType.Unused;
    const sp = SentencePieceProcessor.fromProto(m, `${name}-unused`);
    EXP.models[name].encode.forEach((c, i) => assert.deepEqual(sp.encodeIds(c.text), v.ids[i], `ids of ${JSON.stringify(c.text)}`));
  });
}

test('the BPE model (byte fallback, identity normalization) round-trips any text; unigram applies NFKC and merges unknowns into one <unk>', () => {
  const bpe = SentencePieceProcessor.load(path.join(FIX, 'bpe.model'));
  // (a literal ▁ in the text is SentencePiece's space symbol: it decodes as a space)
  for (const c of EXP.models.bpe.encode) assert.equal(bpe.decodeIds(bpe.encodeIds(c.text)), c.text.replaceAll('▁', ' '));
  assert.deepEqual(bpe.encodePieces('🙂'), ['▁', '<0xF0>', '<0x9F>', '<0x99>', '<0x82>']);
  const uni = SentencePieceProcessor.load(path.join(FIX, 'unigram.model'));
  assert.equal(uni.normalize('ＡＢＣ１２３  x '), '▁ABC123▁x');
  assert.equal(uni.normalize('   '), '');
  const rare = byText('unigram', '龘靐齉');
  assert.deepEqual(uni.encodeIds(rare.text), rare.ids);
  assert.equal(rare.ids.filter((id) => id === uni.unkId).length, 1, 'three unknown characters, one <unk>');
  assert.equal(uni.decodeIds([uni.unkId]), ' \u2047 ');
});

test('a Llama-style directory: BOS by add_bos_token, added and special tokens split out of the text, legacy decides the dummy prefix after them', () => {
  const config = {
    add_bos_token: true, add_eos_token: false, bos_token: { content: '<s>', lstrip: false, normalized: false, rstrip: false, single_word: false },
    eos_token: '</s>', unk_token: '<unk>', pad_token: null, tokenizer_class: 'LlamaTokenizer', legacy: true,
    chat_template: "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}",
  };
  const dir = tmpModelDir({ 'tokenizer_config.json': config, 'added_tokens.json': { '<tool>': 1000 } });
  const tok = loadTokenizer(dir);
  assert.ok(tok instanceof SentencePieceTokenizer);
  assert.equal(tok.kind, 'sentencepiece');
  assert.deepEqual([tok.vocabSize, tok.bosId, tok.eosId, tok.padId, tok.unkId], [1001, 1, 2, null, 0]);
  assert.deepEqual([tok.tokenToId('<tool>'), tok.idToToken(1000), tok.tokenToId('<s>'), tok.tokenToId('▁Hello'), tok.tokenToId('no such token'), tok.idToToken(1001)],
    [1000, '<tool>', 1, byText('bpe', 'Hello world').ids[0], null, null]);
  const hello = byText('bpe', 'Hello world'), zh = byText('bpe', '你好');
  assert.deepEqual(tok.encode('Hello world'), [1, ...hello.ids]);
  assert.deepEqual(tok.encode('Hello world', { addSpecialTokens: false }), hello.ids);
  assert.deepEqual(tok.prefixTokens(), [1]);
  // legacy (the transformers default): every span between added tokens gets SentencePiece's dummy prefix
  assert.deepEqual(tok.encode('你好<tool>Hello world</s>', { addSpecialTokens: false }), [...zh.ids, 1000, ...hello.ids, 2]);
  assert.deepEqual(tok.encode('<s>你好'), [1, 1, ...zh.ids]);
  const strict = SentencePieceTokenizer.fromModel(fs.readFileSync(path.join(FIX, 'bpe.model')), { ...config, legacy: false, add_eos_token: true }, 'llama-nonlegacy');
  assert.deepEqual(strict.encode('你好<s>Hello world'), [1, ...zh.ids, 1, ...hello.ids_no_dummy, 2]);
  assert.deepEqual(strict.encode('<s>Hello world', { addSpecialTokens: false }), [1, ...hello.ids_no_dummy]);
  // decode: specials as text unless skipped; the dummy-prefix space goes only at the very start
  assert.equal(tok.decode([1, ...hello.ids, 1000, 2]), '<s> Hello world<tool></s>');
  assert.equal(tok.decode([1, ...hello.ids, 1000, 2], { skipSpecialTokens: true }), 'Hello world<tool>');
  assert.equal(tok.decode([]), '');
  assert.throws(() => tok.decode([1001]), /out of range/);
  assert.equal(tok.applyChatTemplate([{ role: 'user', content: '你好' }]), '<s>[INST] 你好 [/INST]');
  const asInterface: LoadedTokenizer = tok;
  const asPipeline: TokenizerLike = tok;
  assert.equal(asInterface.source, path.join(dir, 'tokenizer.model'));
  assert.equal(asPipeline.eosId, 2);
});

test('loadTokenizer prefers tokenizer.json; TextTokenizer.load still refuses a tokenizer.model-only directory', () => {
  const dir = tmpModelDir({ 'tokenizer_config.json': CHATGLM2_CONFIG });
  assert.throws(() => TextTokenizer.load(dir), /loadTokenizer\(dir\) reads tokenizer.model/);
  assert.ok(loadTokenizer(dir) instanceof SentencePieceTokenizer);
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-sp-'));
  assert.throws(() => loadTokenizer(empty), (e: unknown) => e instanceof FormatError && /looked for tokenizer.json and tokenizer.model/.test(e.message));
});

test('ChatGLM2: specials after the SP vocabulary, [gMASK, sop] + ids, EOS 2, pad = unk = 0, no BOS, the Round prompt', () => {
  const dir = tmpModelDir({ 'tokenizer_config.json': CHATGLM2_CONFIG });
  const tok = loadTokenizer(dir);
  assert.ok(tok instanceof SentencePieceTokenizer);
  assert.equal(tok.kind, 'chatglm2');
  const n = EXP.chatglm.sp_size;
  assert.deepEqual(EXP.chatglm.specials, { '[MASK]': n, '[gMASK]': n + 1, '[sMASK]': n + 2, sop: n + 3, eop: n + 4 });
  assert.deepEqual([tok.vocabSize, tok.bosId, tok.eosId, tok.padId, tok.unkId, tok.chatTemplate], [n + 5, null, 2, 0, 0, null]);
  assert.deepEqual(tok.prefixTokens(), [n + 1, n + 3]);
  for (const [t, id] of Object.entries(EXP.chatglm.specials)) { assert.equal(tok.tokenToId(t), id); assert.equal(tok.idToToken(id), t); }
  assert.equal(tok.idToToken(n + 5), null);
  for (const c of EXP.chatglm.encode) {
    assert.deepEqual(tok.encode(c.text), c.ids_with_specials, `encode ${JSON.stringify(c.text)}`);
    assert.deepEqual(tok.encode(c.text, { addSpecialTokens: false }), c.ids, `encode without specials ${JSON.stringify(c.text)}`);
  }
  // The prompt format (spec §10.4): rounds from 1, full-width colons.
  assert.equal(chatGlmPrompt('你好'), '[Round 1]\n\n问：你好\n\n答：');
  assert.equal(tok.chatGlmPrompt('你好'), '[Round 1]\n\n问：你好\n\n答：');
  for (const p of EXP.chatglm.prompts) assert.equal(chatGlmPrompt(p.query, p.history), p.prompt);
  const round1 = EXP.chatglm.encode.find((c) => c.text === '[Round 1]\n\n问：你好\n\n答：')!;
  assert.deepEqual(tok.encode(chatGlmPrompt('你好')), round1.ids_with_specials);
  assert.deepEqual(round1.ids_with_specials.slice(0, 3), [n + 1, n + 3, tok.tokenToId('▁[')], 'the dummy prefix ▁ starts the text');
  // decode: skipping drops [gMASK] sop </s> <unk>; otherwise they show
  for (const c of EXP.models.bpe.encode) {
    assert.equal(tok.decode([n + 1, n + 3, ...c.ids, 2], { skipSpecialTokens: true }), c.decoded, `decode ${JSON.stringify(c.text)}`);
  }
  assert.equal(tok.decode([n + 1, n + 3, ...byText('bpe', 'Hello world').ids, 2]), '[gMASK]sop Hello world</s>');
  assert.throws(() => tok.applyChatTemplate([{ role: 'user', content: 'x' }]), (e: unknown) => e instanceof ConfigError && /chatGlmPrompt/.test(e.message));
  assert.ok(isChatGlmConfig({ auto_map: { AutoTokenizer: ['tokenization_chatglm.ChatGLMTokenizer', null] } }));
  assert.ok(isChatGlmConfig({ tokenizer_class: 'ChatGLMTokenizer' }));
  assert.ok(!isChatGlmConfig({ tokenizer_class: 'LlamaTokenizer' }));
});

test('malformed tokenizer configs are FormatErrors naming the file', () => {
  const model = fs.readFileSync(path.join(FIX, 'bpe.model'));
  const cases: [object, RegExp][] = [
    [{ add_bos_token: 'yes' }, /"add_bos_token" must be true or false/],
    [{ added_tokens_decoder: { x: { content: 'a' } } }, /added_tokens_decoder entry "x"/],
    [{ added_tokens_decoder: { '5000000': { content: 'a' } } }, /ids must be integers/],
    [{ __added_tokens_json: { '<x>': -1 } }, /ids must be integers/],
    [{ bos_token: '<nope>' }, /bos_token "<nope>" is not in the vocabulary/],
    [{ chat_template: 5 }, /"chat_template" must be a string/],
  ];
  for (const [config, re] of cases) {
    assert.throws(() => SentencePieceTokenizer.fromModel(model, config, 'bad/tokenizer.model'), (e: unknown) => e instanceof FormatError && re.test(e.message) && e.message.includes('bad/tokenizer.model'), String(re));
  }
  const dir = tmpModelDir({ 'tokenizer_config.json': '{"add_bos_token": ' });
  assert.throws(() => loadTokenizer(dir), (e: unknown) => e instanceof FormatError && /tokenizer_config.json: invalid JSON/.test(e.message));
});
