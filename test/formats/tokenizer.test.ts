// TextTokenizer on a small byte-level BPE built here (Qwen2-style pre-tokenizer, a Llama-style BOS
// post-processor): round trips in English and Chinese, special tokens, chat templates (ChatML and Llama 3),
// directory loading rules, and a fuzz of malformed tokenizer.json files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { TextTokenizer } from '../../common/tokenizer.ts';
import { ConfigError, DataError, FormatError, ShapeError, UnsupportedError } from '../../common/errors.ts';
import { CounterRng } from '../../common/rng.ts';

/** GPT-2's reversible byte → printable character map used by byte-level BPE. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  const out: string[] = new Array(256);
  bs.forEach((b, i) => { out[b] = String.fromCodePoint(cs[i]); });
  return out;
}

const B2U = bytesToUnicode();
const byteChars = (s: string): string[] => [...new TextEncoder().encode(s)].map((b) => B2U[b]);

/** Vocab: the 256 byte symbols (id = byte value), then merged symbols; then four added special tokens. */
function buildTokenizerJson(): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  B2U.forEach((c, b) => { vocab[c] = b; });
  const merges: [string, string][] = [];
  const addMerge = (a: string, b: string) => { merges.push([a, b]); if (!(a + b in vocab)) vocab[a + b] = Object.keys(vocab).length; };
  const G = B2U[0x20]; // 'Ġ'
  addMerge('h', 'e'); addMerge(G, 't'); addMerge(G + 't', 'he'); addMerge('l', 'l'); addMerge('o', 'r');
  addMerge('he', 'll'); addMerge('hell', 'o'); addMerge(G, 'w'); addMerge(G + 'w', 'or');
  for (const ch of ['你', '好', '世', '界']) { // each CJK character: 3 bytes → 1 token
    const [a, b, c] = byteChars(ch);
    addMerge(a, b); addMerge(a + b, c);
  }
  const n = Object.keys(vocab).length;
  const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  return {
    version: '1.0', truncation: null, padding: null,
    added_tokens: [special(n, '<s>'), special(n + 1, '</s>'), special(n + 2, '<|im_start|>'), special(n + 3, '<|im_end|>')],
    normalizer: { type: 'NFC' },
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+" }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
      ],
    },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { '<s>': { id: '<s>', ids: [n], tokens: ['<s>'] } },
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
  };
}

const CHATML = "{%- for message in messages %}{%- if loop.first and message.role != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
const LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

const CONFIG = {
  bos_token: '<s>', eos_token: { content: '</s>', lstrip: false, normalized: false, rstrip: false, single_word: false },
  pad_token: null, clean_up_tokenization_spaces: false, model_max_length: 4096, tokenizer_class: 'PreTrainedTokenizerFast', chat_template: CHATML,
};

function make(config: object = CONFIG): TextTokenizer {
  return TextTokenizer.fromObjects(buildTokenizerJson(), config, 'test/tokenizer.json');
}

test('byte-level BPE: merges apply, English and Chinese round-trip exactly, BOS from the post-processor', () => {
  const t = make();
  const nBase = 256 + 9 + 8; // bytes + English merges + two merges per CJK character
  assert.equal(t.vocabSize, nBase + 4);
  assert.deepEqual([t.bosId, t.eosId, t.padId], [nBase, nBase + 1, null]);
  assert.equal(t.tokenToId('<s>'), nBase);
  assert.equal(t.tokenToId('Ġthe'), t.tokenToId('Ġt' + 'he'));
  assert.equal(t.tokenToId('no-such-token'), null);

  const ids = t.encode('hello the world');
  assert.equal(ids[0], t.bosId);
  // "hello" " the" " world": merges make one token each except "Ġworld" = "Ġwor" + "l" + "d".
  assert.deepEqual(ids.slice(1).map((i) => t.idToToken(i)), ['hello', 'Ġthe', 'Ġwor', 'l', 'd']);
  assert.equal(t.decode(ids, { skipSpecialTokens: true }), 'hello the world');
  assert.equal(t.decode(ids), '<s>hello the world');
  assert.deepEqual(t.encode('hello the world', { addSpecialTokens: false }), ids.slice(1));

  const zh = '你好，世界！';
  const zIds = t.encode(zh, { addSpecialTokens: false });
  for (const ch of ['你', '好', '世', '界']) assert.ok(zIds.includes(t.tokenToId(byteChars(ch).join(''))!), `${ch} is one token`);
  assert.equal(zIds.length, 4 + 3 + 3, '4 merged CJK chars + 3 bytes each for the two full-width punctuation marks');
  assert.equal(t.decode(zIds), zh);
  for (const s of ['', ' ', 'a\nb\r\n\tc  ', 'Émile naïve café', '🙂 emoji 👍🏽', 'mixed 中文 and English 123', "it's we'll"]) {
    assert.equal(t.decode(t.encode(s, { addSpecialTokens: false })), s, JSON.stringify(s));
  }
});

test('special tokens in text are single ids, and skipSpecialTokens drops them', () => {
  const t = make();
  const ids = t.encode('<|im_start|>user\n你好<|im_end|></s>', { addSpecialTokens: false });
  const start = t.tokenToId('<|im_start|>')!, end = t.tokenToId('<|im_end|>')!;
  assert.equal(ids[0], start);
  assert.ok(ids.includes(end) && ids[ids.length - 1] === t.eosId);
  assert.equal(t.decode(ids), '<|im_start|>user\n你好<|im_end|></s>');
  assert.equal(t.decode(ids, { skipSpecialTokens: true }), 'user\n你好');
  assert.equal(t.decode([]), '');
  assert.throws(() => t.decode([t.vocabSize]), ShapeError);
  assert.throws(() => t.decode([1.5]), ShapeError);
});

test('ChatML (Qwen-style) and Llama-3-style chat templates render like transformers', () => {
  const t = make();
  const msgs = [{ role: 'user' as const, content: '拓数派#openpie#数据库' }, { role: 'assistant' as const, content: 'A database company.' }];
  assert.equal(t.applyChatTemplate(msgs),
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n拓数派#openpie#数据库<|im_end|>\n<|im_start|>assistant\nA database company.<|im_end|>\n');
  assert.equal(t.applyChatTemplate([{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hi' }], { addGenerationPrompt: true }),
    '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');

  const l3 = make({ ...CONFIG, bos_token: '<|begin_of_text|>', chat_template: LLAMA3 });
  assert.equal(l3.applyChatTemplate([{ role: 'system', content: ' sys ' }, { role: 'user', content: 'hello' }], { addGenerationPrompt: true }),
    '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n');
  assert.equal(l3.bosId, null, '<|begin_of_text|> is not in this vocab');

  // A list of named templates: "default" is used.
  const listed = make({ ...CONFIG, chat_template: [{ name: 'tool_use', template: 'TOOLS' }, { name: 'default', template: LLAMA3 }] });
  assert.equal(listed.chatTemplate, LLAMA3);
  const ambiguous = make({ ...CONFIG, chat_template: [{ name: 'a', template: 'A' }, { name: 'b', template: 'B' }] });
  assert.throws(() => ambiguous.applyChatTemplate(msgs), (e: unknown) => e instanceof ConfigError && /a, b/.test(e.message));
  const none = make({ ...CONFIG, chat_template: undefined });
  assert.throws(() => none.applyChatTemplate(msgs), (e: unknown) => e instanceof ConfigError && /no chat template/.test(e.message));
  const strict = make({ ...CONFIG, chat_template: "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}" });
  assert.equal(strict.applyChatTemplate([{ role: 'user', content: 'x' }]), 'x');
  assert.throws(() => strict.applyChatTemplate([{ role: 'system', content: 'x' }]), (e: unknown) => e instanceof DataError && /System role not supported/.test(e.message));
  const broken = make({ ...CONFIG, chat_template: '{% for m in messages %}{{ m.content }' });
  assert.throws(() => broken.applyChatTemplate(msgs), FormatError);
});

test('load(): tokenizer_config + special_tokens_map + chat_template.jinja, and clear errors for missing files', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-tok-'));
  assert.throws(() => TextTokenizer.load(dir), (e: unknown) => e instanceof FormatError && /looked for tokenizer.json and tokenizer.model/.test(e.message));
  fs.writeFileSync(path.join(dir, 'tokenizer.model'), 'sp');
  assert.throws(() => TextTokenizer.load(dir), (e: unknown) => e instanceof UnsupportedError && /SentencePiece-only tokenizers are not supported yet/.test(e.message));
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(buildTokenizerJson()));
  const bare = TextTokenizer.load(dir);
  assert.deepEqual([bare.bosId, bare.eosId, bare.chatTemplate], [null, null, null]);
  fs.writeFileSync(path.join(dir, 'special_tokens_map.json'), JSON.stringify({ bos_token: '<s>', eos_token: '</s>', pad_token: '</s>' }));
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ ...CONFIG, pad_token: null }));
  const t = TextTokenizer.load(dir);
  assert.deepEqual([t.bosId, t.eosId, t.padId], [t.tokenToId('<s>'), t.tokenToId('</s>'), t.tokenToId('</s>')], 'null pad in the config falls back to the map');
  assert.equal(t.chatTemplate, CHATML);
  fs.writeFileSync(path.join(dir, 'chat_template.jinja'), LLAMA3);
  assert.equal(TextTokenizer.load(dir).chatTemplate, LLAMA3);
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), '{"bos_token": ');
  assert.throws(() => TextTokenizer.load(dir), (e: unknown) => e instanceof FormatError && /tokenizer_config.json: invalid JSON/.test(e.message));
});

test('unsupported and malformed tokenizer.json structures are named errors', () => {
  const base = buildTokenizerJson();
  const mod = (f: (o: Record<string, any>) => void) => { const o = structuredClone(base) as Record<string, any>; f(o); return o; };
  const cases: [object, new (...a: never[]) => Error, RegExp][] = [
    [mod((o) => { o.model.type = 'WordLevel'; }), UnsupportedError, /"WordLevel" is not supported/],
    [mod((o) => { delete o.model; }), FormatError, /"model" must be an object/],
    [mod((o) => { o.model.merges = 'a b'; }), FormatError, /model.merges/],
    [mod((o) => { o.model.vocab.h = -1; }), FormatError, /model.vocab/],
    [mod((o) => { o.added_tokens = [{ id: 'x', content: '<s>' }]; }), FormatError, /added_tokens/],
    [mod((o) => { o.pre_tokenizer = 'ByteLevel'; }), FormatError, /"pre_tokenizer" must be an object/],
    [mod((o) => { o.pre_tokenizer = { type: 'NoSuchPreTokenizer' }; }), FormatError, /cannot build the tokenizer/],
  ];
  for (const [tj, cls, re] of cases) {
    assert.throws(() => TextTokenizer.fromObjects(tj, CONFIG, 'bad/tokenizer.json'), (e: unknown) => e instanceof cls && re.test((e as Error).message) && (e as Error).message.includes('bad/tokenizer.json'), String(re));
  }
});

test('fuzz: mutated tokenizer.json text and structure load and run, or fail with a named error', (ctx) => {
  const rng = new CounterRng(4242, 9);
  const pick = <T>(xs: readonly T[]): T => xs[rng.int(xs.length)];
  const base = buildTokenizerJson();
  const text = JSON.stringify(base);
  const samples = ['hello the world', '你好，世界', '<s>x</s> <|im_start|>', ''];
  const allowed = (e: unknown) => e instanceof FormatError || e instanceof UnsupportedError;
  const exercise = (t: TextTokenizer) => {
    for (const s of samples) {
      let ids: number[];
      try { ids = t.encode(s); } catch (e) { if (!allowed(e)) throw e; continue; }
      assert.ok(ids.every((i) => Number.isSafeInteger(i) && i >= 0 && i < t.vocabSize), 'ids are in range');
      try { assert.equal(typeof t.decode(ids), 'string'); } catch (e) { if (!allowed(e)) throw e; }
    }
  };
  let built = 0;
  // The library console.warn()s about some malformed parts it skips; keep the test output readable.
  const warn = console.warn;
  console.warn = () => {};
  ctx.after(() => { console.warn = warn; });
  // Text mutations: most break the JSON (FormatError from load), some keep it valid with odd values.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-tokfuzz-'));
  const tp = path.join(dir, 'tokenizer.json');
  for (let it = 0; it < 300; it++) {
    const chars = [...text];
    for (let k = 1 + rng.int(3); k > 0; k--) {
      const at = rng.int(chars.length);
      if (rng.int(2)) chars[at] = pick(['"', '{', '}', '[', ']', ',', ':', '0', '9', 'a', ' ', '\\', 'null']);
      else chars.splice(at, 1);
    }
    fs.rmSync(tp, { force: true });
    fs.writeFileSync(tp, chars.join(''));
    try { const t = TextTokenizer.load(dir); built++; exercise(t); } catch (e) { if (!allowed(e)) throw e; }
  }
  // Structural mutations: replace a random node of the JSON tree with a random value.
  const randomValue = (): unknown => pick([null, true, 0, -1, 1.5, 'x', '', [], {}, [1, 2], { type: 'BPE' }, { Regex: '(' }, { Regex: 'a' }, ['a', 'b'], 'a b', 1e9]);
  const paths: (string | number)[][] = [];
  const walk = (v: unknown, p: (string | number)[]) => {
    if (p.length > 0 && !(p[0] === 'model' && p.length > 2 && (p[1] === 'vocab' || p[1] === 'merges') && rng.int(20) !== 0)) paths.push(p);
    if (Array.isArray(v)) v.forEach((x, i) => walk(x, [...p, i]));
    else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) walk(x, [...p, k]);
  };
  walk(base, []);
  for (let it = 0; it < 700; it++) {
    const o = structuredClone(base) as Record<string, unknown>;
    for (let k = 1 + rng.int(2); k > 0; k--) {
      const p = pick(paths);
      let cur: any = o;
      for (const key of p.slice(0, -1)) { if (cur === null || typeof cur !== 'object') break; cur = cur[key]; }
      if (cur !== null && typeof cur === 'object') cur[p[p.length - 1]] = randomValue();
    }
    try { const t = TextTokenizer.fromObjects(o, CONFIG, 'fuzz/tokenizer.json'); built++; exercise(t); } catch (e) { if (!allowed(e)) throw e; }
  }
  assert.ok(built > 100, `built ${built}`);
});
