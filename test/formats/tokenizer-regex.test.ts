// tokenizer.json regexes (Split / Replace patterns) that can backtrack catastrophically are refused when the
// tokenizer is loaded, naming where the pattern sits; the patterns real models ship load and work. A seeded
// fuzz of random patterns checks the claim behind it: every pattern the check accepts runs in bounded time on
// the inputs that make backtracking explode (a repeated character, then a mismatch).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TextTokenizer } from '../../common/tokenizer.ts';
import { catastrophicBacktracking } from '../../common/regex-safety.ts';
import { UnsupportedError } from '../../common/errors.ts';
import { Philox } from '../helpers/prng.ts';

/** A minimal byte-free BPE tokenizer.json (single letters and space) with the given pre-tokenizer / normalizer. */
function tokenizerJson(parts: { pre_tokenizer?: object; normalizer?: object; decoder?: object }): object {
  const vocab: Record<string, number> = {};
  for (const c of ' abcdefghijklmnopqrstuvwxyz0123456789\'.,!?') vocab[c] = Object.keys(vocab).length;
  return {
    version: '1.0', added_tokens: [], normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, ...parts,
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, vocab, merges: [] },
  };
}
const split = (regex: string): object => ({ type: 'Sequence', pretokenizers: [{ type: 'Split', pattern: { Regex: regex }, behavior: 'Isolated', invert: false }] });
const load = (tj: object): TextTokenizer => TextTokenizer.fromObjects(tj, {}, 'test/tokenizer.json');

// The pre-tokenizer patterns of real model families, as their tokenizer.json files carry them.
const REAL: Record<string, string> = {
  'GPT-2 / RoBERTa': "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
  'Llama 3': "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  'Qwen2': "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  'GPT-4o (o200k)': "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  'DeepSeek digits': '\\p{N}{1,3}',
  'DeepSeek CJK': '[一-龥\u3040-ゟ゠-ヿ]+',
};

test('the pre-tokenizer patterns real models ship load, and split text as before', () => {
  for (const [name, re] of Object.entries(REAL)) {
    const t = load(tokenizerJson({ pre_tokenizer: split(re) }));
    assert.ok(t.encode("it's 42 ok").length > 0, name);
  }
  // Replace normalizers/decoders with patterns (Metaspace-style) pass too
  const t = load(tokenizerJson({ normalizer: { type: 'Replace', pattern: { Regex: ' {2,}' }, content: ' ' }, decoder: { type: 'Replace', pattern: { String: '▁' }, content: ' ' } }));
  assert.deepEqual(t.encode('a  b'), t.encode('a b'));
});

test('(a+)+b in a Split pattern is refused at load, quickly, naming where it is and why', () => {
  const t0 = performance.now();
  assert.throws(() => load(tokenizerJson({ pre_tokenizer: split('(a+)+b') })), (e: unknown) => {
    assert.ok(e instanceof UnsupportedError, String(e));
    assert.match(e.message, /^test\/tokenizer\.json: pre_tokenizer\.pretokenizers\[0\]\.pattern\.Regex "\(a\+\)\+b" is refused: .*exponentially many ways/);
    assert.match(e.message, /hint: this pattern could take exponential time/);
    return true;
  });
  assert.ok(performance.now() - t0 < 2000, `the check took ${performance.now() - t0} ms`);
});

test('other catastrophic shapes are refused too, in normalizers and decoders as well', () => {
  const bad: [string, RegExp][] = [
    ['(a*)*b', /exponentially many ways/], ['(\\w+\\s?)+$', /exponentially many ways/], ['(a|a)*b', /repeats alternatives/],
    ['(\\d|\\w)+x', /repeats alternatives/], ['(x+x+)+y', /exponentially many ways/], ['(a)\\1*', /backreference/],
    ['(\\w{1,3})*!', /variable-length part/], ['(.*|(a|a?([ab]*b?){1,3}){1,3})?b{2,}', /nested repetition/], ['a*a*a*b', /at least cubic/],
  ];
  for (const [re, why] of bad) {
    assert.throws(() => load(tokenizerJson({ pre_tokenizer: split(re) })), (e: unknown) => e instanceof UnsupportedError && why.test(e.message), re);
  }
  assert.throws(() => load(tokenizerJson({ normalizer: { type: 'Replace', pattern: { Regex: '(a+)+$' }, content: '' } })), /normalizer\.pattern\.Regex .* is refused/);
  assert.throws(() => load(tokenizerJson({ decoder: { type: 'Sequence', decoders: [{ type: 'Replace', pattern: { Regex: '( +)+x' }, content: '' }] } })), /decoder\.decoders\[0\]\.pattern\.Regex .* is refused/);
});

/** A random pattern over a small alphabet with groups, alternation and quantifiers (nesting depth ≤ 3). */
function randomPattern(rng: Philox, depth = 0): string {
  const atoms = ['a', 'b', '[ab]', '\\s', '\\w', '.', 'a?', '\\d'];
  const quants = ['+', '*', '?', '{1,3}', '{2,}', ''];
  const n = 1 + rng.int(3);
  let out = '';
  for (let i = 0; i < n; i++) {
    let el: string;
    if (depth < 3 && rng.int(3) === 0) {
      const alts = 1 + rng.int(3);
      el = `(${Array.from({ length: alts }, () => randomPattern(rng, depth + 1)).join('|')})`;
    } else el = atoms[rng.int(atoms.length)];
    out += el + quants[rng.int(quants.length)];
  }
  return out;
}

test('fuzz: every random pattern the check accepts runs in bounded time on backtracking-attack inputs', () => {
  // npm test: 400 patterns; `REGEX_FUZZ_COUNT=5000 REGEX_FUZZ_SEED=n npm run test:fuzz-regex` for more
  const rng = new Philox(Number(process.env.REGEX_FUZZ_SEED ?? 10));
  const N = Number(process.env.REGEX_FUZZ_COUNT ?? 400);
  let accepted = 0, refused = 0, worstMs = 0, worst = '';
  for (let i = 0; i < N; i++) {
    const src = randomPattern(rng);
    let re: RegExp;
    try { re = new RegExp(src, 'gu'); } catch { continue; }
    if (catastrophicBacktracking(re.source, re.flags)) { refused++; continue; }
    accepted++;
    for (const ch of ['a', 'b', ' ', '1']) {
      for (const tail of ['!', '\n', '']) {
        const input = ch.repeat(28) + tail;
        const t0 = performance.now();
        input.match(re);
        const ms = performance.now() - t0;
        if (ms > worstMs) { worstMs = ms; worst = `${src} on ${JSON.stringify(input)}`; }
      }
    }
  }
  assert.ok(accepted > N / 4 && refused > 10, `accepted ${accepted}, refused ${refused}`);
  // exponential backtracking on 28 characters takes seconds; anything accepted must stay far below that
  assert.ok(worstMs < 100, `slowest accepted pattern: ${worst} took ${worstMs.toFixed(1)} ms`);
});
