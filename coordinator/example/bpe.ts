// A small byte-level BPE trainer (GPT-2 / Llama 3 style) producing a Hugging Face `tokenizer.json` object.
//
// Why here: the built-in example needs a tokenizer small enough (a few thousand ids) that the LM head is cheap on
// a laptop CPU, trained on the example's own text so Chinese descriptions compress well — and no download.
//
// Algorithm (the classic one, as in HF tokenizers' BpeTrainer):
//   1. Split each text around the special tokens (they are never merged), then pre-tokenize with the ByteLevel
//      regex — the SAME regex @huggingface/tokenizers applies at encode time — and map each UTF-8 byte to its
//      printable GPT-2 character. Count the distinct pre-tokens ("words").
//   2. Start from all 256 byte symbols (so any input encodes, emoji and rare characters included, and decodes
//      back exactly). Repeatedly merge the most frequent adjacent pair (ties: lower ids first) until the vocab
//      holds `vocabSize` ids or no pair occurs twice. Pair counts are updated incrementally per affected word.
//   3. ids: bytes 0..255 (id = byte value), then merged symbols in merge order, then the special tokens.
import { ConfigError } from '../../common/errors.ts';

/** GPT-2's reversible byte → printable character map (bytes that are printable Latin-1 map to themselves). */
export const BYTE_TO_CHAR: readonly string[] = (() => {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const out = new Array<string>(256);
  for (const b of bs) out[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) if (out[b] === undefined) out[b] = String.fromCharCode(256 + n++);
  return out;
})();

/** The ByteLevel pre-tokenizer's split (use_regex: true), identical to the one in @huggingface/tokenizers. */
export const BYTE_LEVEL_REGEX = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

export interface BpeOptions {
  /** Total ids including the 256 byte symbols and the special tokens (an upper bound: see minFrequency). */
  vocabSize: number;
  specialTokens: string[];
  /** A pair must occur at least this often to be merged (default 2). */
  minFrequency?: number;
  /**
   * Most characters a merged token may span when it holds any non-ASCII byte (default: no limit).
   * The ByteLevel regex keeps a whole run of Chinese (Han characters are letters) as one pre-token, so plain BPE
   * on a small corpus learns whole phrases as single tokens; a limit of 2 keeps Chinese at one or two characters
   * per token as in real multilingual vocabularies, while ASCII words merge freely.
   */
  maxNonAsciiChars?: number;
}

/** Hugging Face tokenizer.json (the fields this trainer writes). */
export interface TokenizerJson {
  version: '1.0';
  truncation: null;
  padding: null;
  added_tokens: { id: number; content: string; single_word: boolean; lstrip: boolean; rstrip: boolean; normalized: boolean; special: boolean }[];
  normalizer: null;
  pre_tokenizer: { type: 'ByteLevel'; add_prefix_space: boolean; trim_offsets: boolean; use_regex: boolean };
  post_processor: { type: 'ByteLevel'; add_prefix_space: boolean; trim_offsets: boolean; use_regex: boolean };
  decoder: { type: 'ByteLevel'; add_prefix_space: boolean; trim_offsets: boolean; use_regex: boolean };
  model: {
    type: 'BPE'; dropout: null; unk_token: null; continuing_subword_prefix: null; end_of_word_suffix: null;
    fuse_unk: boolean; byte_fallback: boolean; ignore_merges: boolean;
    vocab: { [token: string]: number };
    merges: string[];
  };
}

export function trainByteLevelBpe(texts: string[], opts: BpeOptions): TokenizerJson {
  const specials = opts.specialTokens;
  const minFrequency = opts.minFrequency ?? 2;
  if (new Set(specials).size !== specials.length || specials.some((s) => s === '')) {
    throw new ConfigError('special tokens must be distinct and non-empty');
  }
  if (!Number.isInteger(opts.vocabSize) || opts.vocabSize < 256 + specials.length) {
    throw new ConfigError(`vocabSize ${opts.vocabSize} is below the 256 byte symbols + ${specials.length} special tokens`);
  }
  const maxMerged = opts.vocabSize - 256 - specials.length;

  // 1. words: distinct pre-tokens as symbol-id arrays, with counts.
  const wordCount = new Map<string, number>();
  const encoder = new TextEncoder();
  const specialSplit = specials.length ? new RegExp(specials.map(escapeRegex).join('|'), 'g') : null;
  for (const text of texts) {
    for (const part of specialSplit ? text.split(specialSplit) : [text]) {
      for (const m of part.matchAll(BYTE_LEVEL_REGEX)) {
        let w = '';
        for (const byte of encoder.encode(m[0])) w += BYTE_TO_CHAR[byte];
        wordCount.set(w, (wordCount.get(w) ?? 0) + 1);
      }
    }
  }
  const symbols: string[] = BYTE_TO_CHAR.slice(); // id → token string
  const symbolId = new Map<string, number>(symbols.map((s, i) => [s, i]));
  // Per symbol: characters it spans (UTF-8 lead bytes), whether it holds a non-ASCII byte, and whether it is
  // whole characters (valid UTF-8 by itself).
  const charsOf: number[] = BYTE_TO_CHAR.map((_, b) => (b < 0x80 || b >= 0xc0 ? 1 : 0));
  const nonAscii: boolean[] = BYTE_TO_CHAR.map((_, b) => b >= 0x80);
  const whole: boolean[] = BYTE_TO_CHAR.map((_, b) => b < 0x80);
  const maxChars = opts.maxNonAsciiChars ?? Infinity;
  const charToByte = new Map<string, number>(BYTE_TO_CHAR.map((c, b) => [c, b]));
  const strict = new TextDecoder('utf-8', { fatal: true });
  const isWhole = (token: string): boolean => {
    try { strict.decode(Uint8Array.from(token, (c) => charToByte.get(c)!)); return true; } catch { return false; }
  };
  // With a limit, a non-ASCII merge either stays inside one character (a partial character + continuation
  // bytes) or joins whole characters, so no token straddles a character boundary ("由" + half of "墨").
  const allowed = (a: number, b: number): boolean => {
    if (maxChars === Infinity || !(nonAscii[a] || nonAscii[b])) return true;
    if (charsOf[b] === 0 && !whole[a]) return true;
    return whole[a] && whole[b] && charsOf[a] + charsOf[b] <= maxChars;
  };
  const words: number[][] = [];
  const counts: number[] = [];
  for (const [w, c] of wordCount) { words.push(Array.from(w, (ch) => symbolId.get(ch)!)); counts.push(c); }

  // Pair statistics. A pair (a, b) is keyed a·2^16 + b (ids stay below 65536: vocabSize is small by design).
  if (opts.vocabSize > 65536) throw new ConfigError('vocabSize above 65536 is not supported by this small trainer');
  const pairCount = new Map<number, number>();
  const pairWords = new Map<number, Set<number>>();
  const addWordPairs = (wi: number, sign: 1 | -1): void => {
    const w = words[wi], c = counts[wi] * sign;
    for (let i = 0; i + 1 < w.length; i++) {
      const key = w[i] * 65536 + w[i + 1];
      pairCount.set(key, (pairCount.get(key) ?? 0) + c);
      if (sign > 0) {
        let s = pairWords.get(key);
        if (!s) pairWords.set(key, (s = new Set()));
        s.add(wi);
      }
    }
  };
  for (let wi = 0; wi < words.length; wi++) addWordPairs(wi, 1);

  // 2. merges.
  const merges: string[] = [];
  while (symbols.length - 256 < maxMerged) {
    let best = -1, bestCount = minFrequency - 1;
    for (const [key, c] of pairCount) {
      if (c < bestCount) continue;
      const a = Math.floor(key / 65536), b = key % 65536;
      if (!allowed(a, b)) continue;
      if (c > bestCount || (c === bestCount && best >= 0 && key < best)) { best = key; bestCount = c; }
    }
    if (best < 0) break;
    const a = Math.floor(best / 65536), b = best % 65536;
    const merged = symbols[a] + symbols[b];
    merges.push(`${symbols[a]} ${symbols[b]}`);
    let id = symbolId.get(merged);
    if (id === undefined) {
      id = symbols.length; symbols.push(merged); symbolId.set(merged, id);
      charsOf.push(charsOf[a] + charsOf[b]); nonAscii.push(nonAscii[a] || nonAscii[b]); whole.push(isWhole(merged));
    }
    for (const wi of pairWords.get(best) ?? []) {
      const w = words[wi];
      addWordPairs(wi, -1);
      const out: number[] = [];
      for (let i = 0; i < w.length; i++) {
        if (i + 1 < w.length && w[i] === a && w[i + 1] === b) { out.push(id); i++; } else out.push(w[i]);
      }
      words[wi] = out;
      addWordPairs(wi, 1);
    }
    pairWords.delete(best);
    for (const [key, c] of pairCount) if (c <= 0) pairCount.delete(key);
  }

  // 3. the tokenizer.json object.
  const vocab: { [token: string]: number } = {};
  symbols.forEach((s, i) => { vocab[s] = i; });
  const added_tokens = specials.map((content, k) => {
    vocab[content] = symbols.length + k;
    return { id: symbols.length + k, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
  });
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges,
    },
  };
}

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
