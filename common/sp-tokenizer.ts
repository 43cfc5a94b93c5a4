// SentencePiece tokenizers: `tokenizer.model` without `tokenizer.json` (Llama-1/2 style, and ChatGLM2 — the seed
// model, qlora-spec.md §10.4).
//
// Two layers, top to bottom:
//   1. SentencePieceProcessor — the `sentencepiece` library's own encode/decode, re-implemented from the model
//      file (a ModelProto protobuf: pieces with scores and types, trainer and normalizer specs): the normalizer
//      (precompiled charsmap in a darts-clone double array, whitespace rules, dummy prefix, ▁ escaping), the BPE
//      merge loop and the unigram Viterbi search exactly as upstream writes them (bpe_model.cc,
//      unigram_model.cc EncodeOptimized, sentencepiece_processor.cc), byte fallback, and decoding (byte pieces
//      re-assembled into UTF-8, the dummy-prefix space removed once). Synchronous, no native code, no WASM —
//      `loadTokenizer` stays synchronous like TextTokenizer.load.
//   2. SentencePieceTokenizer — what transformers' slow tokenizers add on top (tokenizer_config.json,
//      special_tokens_map.json, added_tokens.json): special tokens split out of the text, BOS/EOS rules, the
//      Llama `legacy` flag, chat templates; and the ChatGLM2 rules of tokenization_chatglm.py ([MASK] [gMASK]
//      [sMASK] sop eop appended after the SP vocabulary, `[gMASK, sop]` prefix, no BOS, EOS 2, pad = unk = 0).
//
// The reference is the Python `sentencepiece` 0.2.x library: test/reference/make_sp_fixtures.py records its output
// on two models trained there (BPE with byte fallback, unigram with NFKC), and test/formats/sp-*.test.ts checks
// this file against it. Model files come from the internet: every read is bounds-checked and any malformed
// structure becomes a FormatError naming the file (fuzzed in the tests).

import fs from 'node:fs';
import path from 'node:path';
import { renderChatTemplate } from './chat-template.ts';
import { ConfigError, DataError, FormatError, ShapeError, UnsupportedError } from './errors.ts';
import { parseModelProto, PieceType, type NormalizerSpec, type SpModelProto } from './sp-model-proto.ts';
export { parseModelProto, PieceType, type NormalizerSpec, type SpModelProto };

const utf8Strict = new TextDecoder('utf-8', { fatal: true });
const utf8Encoder = new TextEncoder();

// ---------------------------------------------------------------------------------------------------------------
// Normalizer (normalizer.cc). Works on UTF-8 bytes because the precompiled charsmap is a byte trie.

/** darts-clone DoubleArray: the units of a trie over bytes; commonPrefixSearch as in darts.h. */
class DoubleArray {
  constructor(private readonly units: Uint32Array, private readonly where: string) {}

  private unit(i: number): number {
    if (i >= this.units.length) throw new FormatError(`${this.where}: the normalizer's precompiled charsmap is corrupt (trie index ${i} of ${this.units.length})`, { hint: 'the tokenizer.model file is damaged' });
    return this.units[i];
  }

  /** [value, length] of every key that is a prefix of key[start, end), shortest first. */
  commonPrefixSearch(key: Uint8Array, start: number, end: number): [number, number][] {
    const out: [number, number][] = [];
    const offset = (u: number): number => (u >>> 10) << ((u & (1 << 9)) >>> 6) >>> 0;
    let pos = offset(this.unit(0));
    for (let i = start; i < end; i++) {
      pos = (pos ^ key[i]) >>> 0;
      const u = this.unit(pos);
      if (((u & 0x800000ff) >>> 0) !== key[i]) return out; // label mismatch
      pos = (pos ^ offset(u)) >>> 0;
      if ((u >>> 8) & 1) out.push([this.unit(pos) & 0x7fffffff, i + 1 - start]);
    }
    return out;
  }
}

/** Longest-match set of byte strings (user-defined symbols), a trie of Maps. */
class BytePrefixMatcher {
  private readonly root = new Map<number, BytePrefixMatcher>();
  private terminal = false;
  add(bytes: Uint8Array): void {
    let n: BytePrefixMatcher = this;
    for (const b of bytes) {
      let next = n.root.get(b);
      if (!next) { next = new BytePrefixMatcher(); n.root.set(b, next); }
      n = next;
    }
    n.terminal = true;
  }
  /** Length of the longest member that is a prefix of buf[start, end), or 0. */
  longest(buf: Uint8Array, start: number, end: number): number {
    let best = 0;
    let n: BytePrefixMatcher | undefined = this;
    for (let i = start; i < end && n; i++) {
      n = n.root.get(buf[i]);
      if (n?.terminal) best = i + 1 - start;
    }
    return best;
  }
  get empty(): boolean { return this.root.size === 0; }
}

function utf8CharLen(b: number): number {
  return b < 0x80 ? 1 : b < 0xc0 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : b < 0xf8 ? 4 : 1;
}

const SPACE_SYMBOL = '\u2581'; // ▁
const SPACE_SYMBOL_BYTES = [0xe2, 0x96, 0x81];

class Normalizer {
  private readonly trie: DoubleArray | null = null;
  private readonly replacements: Uint8Array = new Uint8Array(0);
  private readonly cache = new Map<number, Uint8Array>();

  constructor(private readonly spec: NormalizerSpec, private readonly userDefined: BytePrefixMatcher, private readonly where: string) {
    const blob = spec.precompiledCharsmap;
    if (blob) {
      if (blob.length <= 4) throw new FormatError(`${where}: the normalizer's precompiled charsmap is too short (${blob.length} bytes)`);
      const trieSize = new DataView(blob.buffer, blob.byteOffset, 4).getUint32(0, true);
      if (trieSize >= blob.length - 4 + 1 || trieSize < 4) throw new FormatError(`${where}: the charsmap's trie size ${trieSize} does not fit in its ${blob.length} bytes`);
      const n = Math.floor(trieSize / 4);
      const units = new Uint32Array(n);
      const dv = new DataView(blob.buffer, blob.byteOffset + 4, n * 4);
      for (let i = 0; i < n; i++) units[i] = dv.getUint32(i * 4, true);
      this.trie = new DoubleArray(units, where);
      this.replacements = blob.subarray(4 + trieSize);
    }
  }

  /** The NUL-terminated replacement string at `offset` in the charsmap's string blob. */
  private replacement(offset: number): Uint8Array {
    let r = this.cache.get(offset);
    if (r) return r;
    if (offset >= this.replacements.length) throw new FormatError(`${this.where}: the charsmap points at byte ${offset} of its ${this.replacements.length}-byte string table`, { hint: 'the tokenizer.model file is damaged' });
    let e = offset;
    while (e < this.replacements.length && this.replacements[e] !== 0) e++;
    r = this.replacements.subarray(offset, e);
    this.cache.set(offset, r);
    return r;
  }

  /** NormalizePrefix: [replacement bytes, input bytes consumed] at `pos`. */
  private prefix(input: Uint8Array, pos: number): [Uint8Array, number] {
    const ud = this.userDefined.empty ? 0 : this.userDefined.longest(input, pos, input.length);
    if (ud > 0) return [input.subarray(pos, pos + ud), ud];
    if (this.trie) {
      let bestLen = 0, bestVal = 0;
      for (const [v, l] of this.trie.commonPrefixSearch(input, pos, input.length)) if (l > bestLen) { bestLen = l; bestVal = v; }
      if (bestLen > 0) return [this.replacement(bestVal), bestLen];
    }
    // Input comes from a JS string through TextEncoder: always valid UTF-8.
    const n = Math.min(utf8CharLen(input[pos]), input.length - pos);
    return [input.subarray(pos, pos + n), n];
  }

  /** Normalizer::Normalize: the normalized text, spaces escaped as ▁, dummy prefix added when asked. */
  normalize(text: string, addDummyPrefix: boolean): string {
    if (text === '') return '';
    // Fast path (Llama, ChatGLM2: identity normalization, spaces kept, no user-defined symbols).
    if (!this.trie && this.userDefined.empty && !this.spec.removeExtraWhitespaces && this.spec.escapeWhitespaces) {
      return (addDummyPrefix ? SPACE_SYMBOL : '') + text.replaceAll(' ', SPACE_SYMBOL);
    }
    const input = utf8Encoder.encode(text);
    const spec = this.spec;
    let pos = 0;
    if (spec.removeExtraWhitespaces) {
      while (pos < input.length) {
        const [r, n] = this.prefix(input, pos);
        if (!(r.length === 1 && r[0] === 0x20)) break;
        pos += n;
      }
    }
    if (pos >= input.length) return '';
    const out: number[] = [];
    const addWs = (): void => { if (spec.escapeWhitespaces) out.push(...SPACE_SYMBOL_BYTES); else out.push(0x20); };
    if (addDummyPrefix) addWs();
    let prevSpace = spec.removeExtraWhitespaces;
    while (pos < input.length) {
      const [r, n] = this.prefix(input, pos);
      let s = 0;
      if (prevSpace) while (s < r.length && r[s] === 0x20) s++;
      if (s < r.length) {
        for (let k = s; k < r.length; k++) {
          if (spec.escapeWhitespaces && r[k] === 0x20) out.push(...SPACE_SYMBOL_BYTES);
          else out.push(r[k]);
        }
        prevSpace = r[r.length - 1] === 0x20;
      }
      pos += n;
      if (!spec.removeExtraWhitespaces) prevSpace = false;
    }
    if (spec.removeExtraWhitespaces) {
      const sp = spec.escapeWhitespaces ? SPACE_SYMBOL_BYTES : [0x20];
      const endsWithSpace = (): boolean => out.length >= sp.length && sp.every((b, k) => out[out.length - sp.length + k] === b);
      while (endsWithSpace()) out.length -= sp.length;
    }
    try {
      return utf8Strict.decode(Uint8Array.from(out));
    } catch (e) {
      throw new FormatError(`${this.where}: the normalizer's charsmap produced invalid UTF-8`, { cause: e, hint: 'the tokenizer.model file is damaged' });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The processor: pieces table, BPE / unigram encoding, decoding (sentencepiece_processor.cc).

const FLT_MIN = 1.1754943508222875e-38;
const UNK_PENALTY = 10;
const MAX_PIECE_BYTES = 8000;

function byteToPiece(b: number): string {
  return `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`;
}

const BYTE_PIECE = /^<0x([0-9A-F]{2})>$/;

/** A pending merge of two adjacent symbols (bpe_model.cc SymbolPair). */
interface SymbolPair { left: number; right: number; score: number; size: number }

/** Max-heap of SymbolPair: higher score first, then the leftmost (SymbolPairComparator). */
class PairHeap {
  private readonly a: SymbolPair[] = [];
  private static before(x: SymbolPair, y: SymbolPair): boolean {
    return x.score > y.score || (x.score === y.score && x.left < y.left);
  }
  get size(): number { return this.a.length; }
  push(p: SymbolPair): void {
    const a = this.a;
    a.push(p);
    let i = a.length - 1;
    while (i > 0) {
      const up = (i - 1) >> 1;
      if (!PairHeap.before(a[i], a[up])) break;
      [a[i], a[up]] = [a[up], a[i]];
      i = up;
    }
  }
  pop(): SymbolPair {
    const a = this.a;
    const top = a[0];
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < a.length && PairHeap.before(a[l], a[m])) m = l;
        if (r < a.length && PairHeap.before(a[r], a[m])) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m], a[i]];
        i = m;
      }
    }
    return top;
  }
}

export class SentencePieceProcessor {
  readonly pieces: readonly { piece: string; score: number; type: PieceType }[];
  readonly unkId: number;
  /** -1 when the model has no such control piece (sentencepiece's bos_id() etc.). */
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly modelType: 'unigram' | 'bpe';
  readonly byteFallback: boolean;
  readonly normalizerSpec: Readonly<NormalizerSpec>;
  private readonly unkSurface: string;
  /** NORMAL, USER_DEFINED and UNUSED pieces: what encoding may produce (ModelInterface::pieces_). */
  private readonly normal = new Map<string, number>();
  /** CONTROL, UNKNOWN and BYTE pieces (reserved_id_map_): looked up first by pieceToId. */
  private readonly reserved = new Map<string, number>();
  private readonly byteIds: Int32Array = new Int32Array(256).fill(-1);
  private readonly userDefinedChars: BytePrefixMatcher = new BytePrefixMatcher();
  private readonly normalizer: Normalizer;
  private minScore: number = Infinity;
  private maxScore: number = FLT_MIN;
  /** Longest NORMAL/USER_DEFINED/UNUSED piece, in UTF-16 code units: bounds the unigram search. */
  private maxPieceLen: number = 0;
  private readonly pieceBytes: Int32Array;

  private constructor(m: SpModelProto, readonly source: string) {
    this.pieces = m.pieces;
    if (m.pieces.length === 0) throw new FormatError(`${source}: the model has no pieces`, { hint: 'is this a SentencePiece model file?' });
    if (m.modelType !== 1 && m.modelType !== 2) {
      const name = ({ 3: 'WORD', 4: 'CHAR' } as Record<number, string>)[m.modelType] ?? `type ${m.modelType}`;
      throw new UnsupportedError(`${source}: SentencePiece ${name} models are not supported`, { hint: 'supported: BPE and UNIGRAM (what LLM tokenizers use)' });
    }
    this.modelType = m.modelType === 1 ? 'unigram' : 'bpe';
    if (m.treatWhitespaceAsSuffix) throw new UnsupportedError(`${source}: treat_whitespace_as_suffix models are not supported`);
    if (m.denormalizerCharsmap) throw new UnsupportedError(`${source}: models with a denormalizer are not supported`);
    this.byteFallback = m.byteFallback;
    this.unkSurface = m.unkSurface;
    this.normalizerSpec = m.normalizer;
    this.pieceBytes = new Int32Array(m.pieces.length);
    let unk = -1;
    const userDefined: Uint8Array[] = [];
    m.pieces.forEach((p, id) => {
      const bytes = utf8Encoder.encode(p.piece);
      this.pieceBytes[id] = bytes.length;
      if (p.piece === '') throw new FormatError(`${source}: piece ${id} is empty`);
      if (bytes.length >= MAX_PIECE_BYTES) throw new FormatError(`${source}: piece ${id} is ${bytes.length} bytes long`);
      if (p.piece.includes('\0')) throw new FormatError(`${source}: piece ${id} contains a NUL character`);
      const isNormal = p.type === PieceType.Normal || p.type === PieceType.UserDefined || p.type === PieceType.Unused;
      const map = isNormal ? this.normal : this.reserved;
      if (map.has(p.piece)) throw new FormatError(`${source}: piece ${JSON.stringify(p.piece)} is defined twice (ids ${map.get(p.piece)} and ${id})`);
      map.set(p.piece, id);
      if (isNormal && p.piece.length > this.maxPieceLen) this.maxPieceLen = p.piece.length;
      if (p.type === PieceType.UserDefined) userDefined.push(bytes);
      if (p.type === PieceType.Unknown) {
        if (unk >= 0) throw new FormatError(`${source}: two <unk> pieces (ids ${unk} and ${id})`);
        unk = id;
      }
      if (p.type === PieceType.Byte) {
        if (!m.byteFallback) throw new FormatError(`${source}: byte piece ${p.piece} found although byte_fallback is false`);
        const b = BYTE_PIECE.exec(p.piece);
        if (!b) throw new FormatError(`${source}: byte piece ${JSON.stringify(p.piece)} (id ${id}) is not <0xHH>`);
        this.byteIds[parseInt(b[1], 16)] = id;
      }
      if (p.type === PieceType.Normal) {
        this.minScore = Math.min(this.minScore, p.score);
        this.maxScore = Math.max(this.maxScore, p.score);
      }
    });
    if (unk < 0) throw new FormatError(`${source}: the model has no <unk> piece`);
    this.unkId = unk;
    if (m.byteFallback && this.byteIds.includes(-1)) throw new FormatError(`${source}: byte_fallback is set but not all 256 byte pieces exist`);
    for (const u of userDefined) this.userDefinedChars.add(u);
    this.normalizer = new Normalizer(m.normalizer, this.userDefinedChars, source);
    const control = (piece: string): number => { const id = this.pieceToId(piece); return this.isControl(id) ? id : -1; };
    this.bosId = control(m.bosPiece);
    this.eosId = control(m.eosPiece);
    this.padId = control(m.padPiece);
  }

  /** From an already parsed (possibly edited) model; the checks of fromBytes apply. */
  static fromProto(model: SpModelProto, source: string): SentencePieceProcessor {
    return new SentencePieceProcessor(model, source);
  }

  static fromBytes(bytes: Uint8Array, source: string): SentencePieceProcessor {
    return new SentencePieceProcessor(parseModelProto(bytes, source), source);
  }

  static load(file: string): SentencePieceProcessor {
    let bytes: Uint8Array;
    try {
      bytes = fs.readFileSync(file);
    } catch (e) {
      throw new FormatError(`cannot read ${file}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    }
    return SentencePieceProcessor.fromBytes(bytes, file);
  }

  get size(): number { return this.pieces.length; }
  isControl(id: number): boolean { return this.pieces[id]?.type === PieceType.Control; }
  isUnknown(id: number): boolean { return this.pieces[id]?.type === PieceType.Unknown; }
  isByte(id: number): boolean { return this.pieces[id]?.type === PieceType.Byte; }
  isUnused(id: number): boolean { return this.pieces[id]?.type === PieceType.Unused; }

  /** sentencepiece's PieceToId: reserved pieces first, then normal ones, else the unk id. */
  pieceToId(piece: string): number {
    return this.reserved.get(piece) ?? this.normal.get(piece) ?? this.unkId;
  }

  /** The id of `piece` if the vocabulary has it, else -1 (no fall back to unk). */
  lookup(piece: string): number {
    return this.reserved.get(piece) ?? this.normal.get(piece) ?? -1;
  }

  idToPiece(id: number): string {
    const p = this.pieces[id];
    if (!p) throw new ShapeError(`token id ${id} is out of range for ${this.source} (${this.pieces.length} pieces)`);
    return p.piece;
  }

  /** The normalized form of `text` (▁ for spaces, the dummy prefix), as spm_normalize prints it. */
  normalize(text: string, opts: { addDummyPrefix?: boolean } = {}): string {
    return this.normalizer.normalize(text, opts.addDummyPrefix ?? this.normalizerSpec.addDummyPrefix);
  }

  /** `sp.encode(text)`: ids without BOS/EOS. `addDummyPrefix` overrides the model's normalizer setting. */
  encodeIds(text: string, opts: { addDummyPrefix?: boolean } = {}): number[] {
    return this.encodeImpl(text, opts).ids;
  }

  /** `sp.encode(text, out_type=str)`. */
  encodePieces(text: string, opts: { addDummyPrefix?: boolean } = {}): string[] {
    return this.encodeImpl(text, opts).pieces;
  }

  private encodeImpl(text: string, opts: { addDummyPrefix?: boolean }): { ids: number[]; pieces: string[] } {
    const normalized = this.normalize(text, opts);
    const result = this.modelType === 'bpe' ? this.encodeBpe(normalized) : this.encodeUnigram(normalized);
    // PopulateSentencePieceText: unknown pieces become bytes (byte fallback) or merge into one <unk>.
    const ids: number[] = [], pieces: string[] = [];
    let prevUnk = false;
    for (const [w, id] of result) {
      const unk = this.isUnknown(id);
      if (this.isControl(id)) {
        ids.push(id); pieces.push(w);
      } else if (unk && this.byteFallback) {
        for (const b of utf8Encoder.encode(w)) { ids.push(this.byteIds[b]); pieces.push(byteToPiece(b)); }
      } else if (prevUnk && unk) {
        pieces[pieces.length - 1] += w;
      } else {
        ids.push(id); pieces.push(w);
      }
      prevUnk = unk;
    }
    return { ids, pieces };
  }

  /** bpe::Model::SampleEncode without dropout: merge the best-scoring adjacent pair until none is in the vocab. */
  private encodeBpe(normalized: string): [string, number][] {
    if (normalized === '') return [];
    // Symbols are [start, end) ranges of `normalized`; user-defined symbols are single frozen symbols.
    const start: number[] = [], end: number[] = [], prev: number[] = [], next: number[] = [], freeze: boolean[] = [];
    const bytes = this.userDefinedChars.empty ? null : utf8Encoder.encode(normalized);
    let bytePos = 0;
    for (let i = 0; i < normalized.length;) {
      let len = 0, frozen = false;
      if (bytes) {
        const udBytes = this.userDefinedChars.longest(bytes, bytePos, bytes.length);
        if (udBytes > 0) { len = codeUnitsOfBytes(normalized, i, udBytes); frozen = true; bytePos += udBytes; }
      }
      if (!frozen) {
        const cp = normalized.codePointAt(i)!;
        len = cp > 0xffff ? 2 : 1;
        if (bytes) bytePos += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
      }
      const k = start.length;
      start.push(i); end.push(i + len); prev.push(k - 1); freeze.push(frozen);
      i += len;
      next.push(i < normalized.length ? k + 1 : -1);
    }
    const heap = new PairHeap();
    const revMerge = new Map<string, [string, string]>();
    const maybeAdd = (l: number, r: number): void => {
      if (l === -1 || r === -1 || freeze[l] || freeze[r]) return;
      const piece = normalized.slice(start[l], end[r]);
      const id = this.normal.get(piece);
      if (id === undefined) return;
      heap.push({ left: l, right: r, score: this.pieces[id].score, size: piece.length });
      if (this.pieces[id].type === PieceType.Unused) revMerge.set(piece, [normalized.slice(start[l], end[l]), normalized.slice(start[r], end[r])]);
    };
    for (let i = 1; i < start.length; i++) maybeAdd(i - 1, i);
    while (heap.size > 0) {
      const top = heap.pop();
      const l = top.left, r = top.right;
      // Stale entry: one side was merged away, or grew since the pair was queued.
      if (end[l] === start[l] || end[r] === start[r] || (end[l] - start[l]) + (end[r] - start[r]) !== top.size) continue;
      end[l] = end[r];
      next[l] = next[r];
      if (next[r] >= 0) prev[next[r]] = l;
      end[r] = start[r]; // empty
      maybeAdd(prev[l], l);
      maybeAdd(l, next[l]);
    }
    const out: [string, number][] = [];
    const resegment = (w: string): void => {
      const id = this.pieceToId(w);
      const split = this.isUnused(id) ? revMerge.get(w) : undefined;
      if (!split) { out.push([w, id]); return; }
      resegment(split[0]);
      resegment(split[1]);
    };
    for (let i = 0; i !== -1; i = next[i]) resegment(normalized.slice(start[i], end[i]));
    return out;
  }

  /**
   * unigram::Model::EncodeOptimized: Viterbi over the pieces that start at each character. Scores are float32
   * as upstream stores them; a user-defined piece scores `bytes·max_score − 0.1` (computed in double there).
   */
  private encodeUnigram(normalized: string): [string, number][] {
    const n = normalized.length;
    if (n === 0) return [];
    const unkScore = Math.fround(this.minScore - UNK_PENALTY);
    const bestScore = new Float64Array(n + 1); // float32 values
    const startsAt = new Int32Array(n + 1).fill(-1);
    const bestId = new Int32Array(n + 1).fill(-1);
    for (let s = 0; s < n;) {
      const here = bestScore[s];
      const charLen = normalized.codePointAt(s)! > 0xffff ? 2 : 1;
      let hasSingle = false;
      const limit = Math.min(n, s + this.maxPieceLen);
      for (let e = s + 1; e <= limit; e++) {
        if (e < n && isLowSurrogate(normalized.charCodeAt(e))) continue; // never split a surrogate pair
        const id = this.normal.get(normalized.slice(s, e));
        if (id === undefined || this.isUnused(id)) continue;
        const p = this.pieces[id];
        const score = p.type === PieceType.UserDefined ? Math.fround(this.pieceBytes[id] * this.maxScore) - 0.1 : p.score;
        const cand = score + here;
        if (startsAt[e] === -1 || cand > bestScore[e]) { bestScore[e] = Math.fround(cand); startsAt[e] = s; bestId[e] = id; }
        if (e - s === charLen) hasSingle = true;
      }
      if (!hasSingle) {
        const e = s + charLen;
        const cand = Math.fround(unkScore + here);
        if (startsAt[e] === -1 || cand > bestScore[e]) { bestScore[e] = cand; startsAt[e] = s; bestId[e] = this.unkId; }
      }
      s += charLen;
    }
    const out: [string, number][] = [];
    for (let e = n; e > 0; e = startsAt[e]) out.push([normalized.slice(startsAt[e], e), bestId[e]]);
    return out.reverse();
  }

  /**
   * `sp.decode(ids)` (sentencepiece 0.2.x): control pieces vanish, <unk> becomes the unk surface (" ⁇ "), runs of
   * byte pieces are decoded as UTF-8 (each invalid byte → U+FFFD), ▁ becomes a space, and the dummy-prefix space
   * of the first piece is dropped. `literal(id)`, when it returns a string, emits that text for the id instead
   * (how added and special tokens are rendered by the tokenizer layer).
   */
  decodeIds(ids: readonly number[], literal?: (id: number) => string | undefined): string {
    for (const id of ids) {
      if (!Number.isSafeInteger(id) || id < 0 || (id >= this.pieces.length && literal?.(id) === undefined)) {
        throw new ShapeError(`token id ${id} is out of range for ${this.source} (${this.pieces.length} pieces)`, { hint: 'were these ids produced by another model?' });
      }
    }
    const spec = this.normalizerSpec;
    let text = '';
    let isBosWs = true, bosWsSeen = false;
    let bytes: number[] = [];
    const flushBytes = (): void => {
      if (bytes.length > 0) { text += decodeUtf8Lenient(bytes); bytes = []; }
    };
    for (const id of ids) {
      const lit = literal?.(id);
      if (lit === undefined && this.isByte(id)) {
        bytes.push(parseInt(BYTE_PIECE.exec(this.pieces[id].piece)![1], 16));
        continue;
      }
      flushBytes();
      if (bosWsSeen || text !== '') isBosWs = false;
      let piece: string;
      bosWsSeen = false;
      if (lit !== undefined) {
        piece = lit;
      } else if (this.isControl(id)) {
        piece = '';
      } else if (this.isUnknown(id)) {
        piece = this.unkSurface;
      } else {
        piece = this.pieces[id].piece;
        if (isBosWs && (spec.addDummyPrefix || spec.removeExtraWhitespaces) && piece.startsWith(SPACE_SYMBOL)) {
          piece = piece.slice(1);
          bosWsSeen = !spec.removeExtraWhitespaces;
        }
        piece = piece.replaceAll(SPACE_SYMBOL, ' ');
      }
      text += piece;
    }
    flushBytes();
    return text;
  }
}

function isLowSurrogate(c: number): boolean {
  return c >= 0xdc00 && c <= 0xdfff;
}

/** UTF-16 code units of `s` from `i` that make up `nBytes` UTF-8 bytes (a user-defined symbol's match). */
function codeUnitsOfBytes(s: string, i: number, nBytes: number): number {
  let j = i, b = 0;
  while (b < nBytes && j < s.length) {
    const cp = s.codePointAt(j)!;
    b += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    j += cp > 0xffff ? 2 : 1;
  }
  return j - i;
}

/** UTF-8 with sentencepiece's rule for bad input: each byte that does not start a valid character → U+FFFD. */
function decodeUtf8Lenient(b: number[]): string {
  let out = '';
  for (let i = 0; i < b.length;) {
    const c = b[i];
    let cp = -1, n = 1;
    const trail = (k: number): boolean => i + k < b.length && (b[i + k] & 0xc0) === 0x80;
    if (c < 0x80) cp = c;
    else if ((c & 0xe0) === 0xc0 && trail(1)) { cp = ((c & 0x1f) << 6) | (b[i + 1] & 0x3f); n = 2; if (cp < 0x80) cp = -1; }
    else if ((c & 0xf0) === 0xe0 && trail(1) && trail(2)) { cp = ((c & 0x0f) << 12) | ((b[i + 1] & 0x3f) << 6) | (b[i + 2] & 0x3f); n = 3; if (cp < 0x800) cp = -1; }
    else if ((c & 0xf8) === 0xf0 && trail(1) && trail(2) && trail(3)) { cp = ((c & 0x07) << 18) | ((b[i + 1] & 0x3f) << 12) | ((b[i + 2] & 0x3f) << 6) | (b[i + 3] & 0x3f); n = 4; if (cp < 0x10000) cp = -1; }
    if (cp < 0 || (cp >= 0xd800 && cp < 0xe000) || cp > 0x10ffff) { out += '\ufffd'; i += 1; continue; }
    out += String.fromCodePoint(cp);
    i += n;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The transformers layer: tokenizer_config.json & co., Llama rules, ChatGLM2 rules.

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function own(o: Obj, k: string): unknown {
  return Object.prototype.hasOwnProperty.call(o, k) ? o[k] : undefined;
}

function errMsg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** A special token in tokenizer_config.json: a string, or an AddedToken dict {content, ...}. */
function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (isObj(v) && typeof own(v, 'content') === 'string') return own(v, 'content') as string;
  return null;
}

function readJsonFile(p: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    throw new FormatError(`cannot read ${p}: ${errMsg(e)}`, { cause: e });
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${p}: invalid JSON: ${errMsg(e)}`, { cause: e });
  }
}

/** ChatGLM2's tokenization_chatglm.py appends these after the SentencePiece vocabulary, in this order. */
export const CHATGLM_SPECIAL_TOKENS = ['[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop'] as const;

/** Whether a tokenizer_config.json names ChatGLM's remote-code tokenizer (tokenizer_class or auto_map). */
export function isChatGlmConfig(config: object): boolean {
  const c = config as Obj;
  if (own(c, 'tokenizer_class') === 'ChatGLMTokenizer') return true;
  const auto = own(c, 'auto_map');
  const at = isObj(auto) ? own(auto, 'AutoTokenizer') : undefined;
  const names = Array.isArray(at) ? at : [at];
  return names.some((n) => typeof n === 'string' && /(^|\.)ChatGLMTokenizer$/.test(n));
}

/**
 * ChatGLM2's prompt (tokenization_chatglm.py build_prompt): every past round i (from 1) as
 * "[Round i]\n\n问：{q}\n\n答：{a}\n\n", then "[Round n+1]\n\n问：{query}\n\n答：" (full-width colons, U+FF1A).
 */
export function chatGlmPrompt(query: string, history: readonly (readonly [string, string])[] = []): string {
  let prompt = '';
  history.forEach(([q, a], i) => { prompt += `[Round ${i + 1}]\n\n问：${q}\n\n答：${a}\n\n`; });
  return prompt + `[Round ${history.length + 1}]\n\n问：${query}\n\n答：`;
}

export interface SpChatMessage { role: string; content: string }

export interface SentencePieceTokenizerOptions {
  /** A chat template that overrides the config's (chat_template.jinja / chat_template.json). */
  chatTemplate?: string | null;
}

/**
 * A transformers-style tokenizer over a SentencePiece model: the same public surface as TextTokenizer
 * (encode / decode / tokenToId / idToToken / applyChatTemplate, bosId / eosId / padId / vocabSize / chatTemplate).
 *
 * Generic (Llama-1/2 LlamaTokenizer rules): added and special tokens written in the text are split out first and
 * map to their ids; every other span goes through SentencePiece — each with the dummy prefix ("legacy", the
 * transformers default), or only the first one when tokenizer_config.json says `"legacy": false`; addSpecialTokens
 * adds BOS (`add_bos_token`, default true) and EOS (`add_eos_token`, default false). AddedToken lstrip/rstrip
 * flags are not applied (Llama's are all false).
 *
 * ChatGLM2 (tokenization_chatglm.py): ids n … n+4 (n = SP pieces) are [MASK] [gMASK] [sMASK] sop eop;
 * addSpecialTokens gives `[gMASK, sop] + ids` (no EOS); bosId is null (transformers has no bos_token for it, and
 * the data pipeline must not prepend <s>), eosId = </s> (2), padId = <unk> (0); no chat template (use
 * `chatGlmPrompt`). As with transformers 4.30 (what ChatGLM2 was released for), "</s>" written in text is plain
 * text, not EOS; an SP piece spelled like a special ("sop") maps to the special's id, as the remote code does.
 */
export class SentencePieceTokenizer {
  readonly kind: 'sentencepiece' | 'chatglm2';
  /** Number of ids the tokenizer can produce (`len(tokenizer)`): SP pieces + added / ChatGLM special tokens. */
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number | null;
  readonly padId: number | null;
  readonly unkId: number | null;
  readonly chatTemplate: string | null;
  readonly source: string;
  readonly sp: SentencePieceProcessor;
  private readonly addBos: boolean;
  private readonly addEos: boolean;
  private readonly legacy: boolean;
  /** Text → id for tokens split out of the text before SentencePiece sees it (generic only), longest first. */
  private readonly splitTokens: [string, number][] = [];
  /** id → text of added tokens and ChatGLM specials (ids SentencePiece cannot decode). */
  private readonly addedById = new Map<number, string>();
  private readonly addedByText = new Map<string, number>();
  /** Ids removed by decode(…, {skipSpecialTokens: true}). */
  private readonly specialIds = new Set<number>();
  /** ChatGLM2: SP ids whose piece is spelled like a special → the special's id. */
  private readonly remap = new Map<number, number>();
  private readonly specials: Record<string, string | undefined> = {};
  private readonly templateNames: string[] = [];
  /**
   * The model's own prompt format (ChatGLM2's rounds), used by the data pipeline and generation when there is no
   * chat template; undefined for generic SentencePiece models (they get the documented default format).
   */
  readonly formatQuery?: (query: string, history?: [string, string][]) => string;

  private constructor(sp: SentencePieceProcessor, config: Obj, source: string, opts: SentencePieceTokenizerOptions) {
    this.sp = sp;
    this.source = source;
    const n = sp.size;
    if (isChatGlmConfig(config)) {
      this.kind = 'chatglm2';
      this.formatQuery = (query, history = []) => chatGlmPrompt(query, history);
      CHATGLM_SPECIAL_TOKENS.forEach((t, i) => {
        this.addedById.set(n + i, t);
        this.addedByText.set(t, n + i);
        this.specialIds.add(n + i);
        const spId = sp.lookup(t);
        if (spId >= 0 && !sp.isControl(spId) && !sp.isUnknown(spId)) this.remap.set(spId, n + i);
      });
      this.vocabSize = n + CHATGLM_SPECIAL_TOKENS.length;
      this.bosId = null;
      this.eosId = sp.eosId >= 0 ? sp.eosId : null;
      this.unkId = sp.unkId;
      this.padId = sp.unkId;
      for (const id of [sp.bosId, sp.eosId, sp.unkId]) if (id >= 0) this.specialIds.add(id);
      this.specials = { eos_token: sp.eosId >= 0 ? sp.pieces[sp.eosId].piece : undefined, unk_token: sp.pieces[sp.unkId].piece, pad_token: sp.pieces[sp.unkId].piece };
      this.addBos = false;
      this.addEos = false;
      this.legacy = true;
      this.chatTemplate = null;
      return;
    }
    this.kind = 'sentencepiece';
    this.readAddedTokens(config);
    // A special-token key missing from the config falls back to the model's own piece (LlamaTokenizer's defaults
    // are the SP pieces <unk> <s> </s>); an explicit null means "none".
    const special = (key: string, fallback: number): string | undefined => {
      const v = own(config, key);
      if (v === undefined) return fallback >= 0 ? sp.pieces[fallback].piece : undefined;
      return tokenContent(v) ?? undefined;
    };
    this.specials = { bos_token: special('bos_token', sp.bosId), eos_token: special('eos_token', sp.eosId), unk_token: special('unk_token', sp.unkId), pad_token: special('pad_token', -1) };
    const idOf = (key: string): number | null => {
      const t = this.specials[key];
      if (t === undefined) return null;
      const id = this.tokenToId(t);
      if (id === null) throw new FormatError(`${source}: ${key} ${JSON.stringify(t)} is not in the vocabulary`, { hint: 'add it to added_tokens.json or fix tokenizer_config.json' });
      return id;
    };
    this.bosId = idOf('bos_token');
    this.eosId = idOf('eos_token');
    this.unkId = idOf('unk_token');
    this.padId = idOf('pad_token');
    const extra = own(config, 'additional_special_tokens');
    const extraTokens = Array.isArray(extra) ? extra.map(tokenContent).filter((t): t is string => t !== null) : [];
    for (const t of [...Object.values(this.specials), ...extraTokens]) {
      if (t === undefined) continue;
      const id = this.tokenToId(t);
      if (id === null) continue;
      this.specialIds.add(id);
      if (!this.addedByText.has(t)) this.addedByText.set(t, id);
    }
    for (let id = 0; id < n; id++) if (sp.isControl(id)) this.specialIds.add(id);
    this.splitTokens = [...this.addedByText].filter(([t]) => t !== '').sort((a, b) => b[0].length - a[0].length);
    let max = n - 1;
    for (const id of this.addedById.keys()) if (id > max) max = id;
    this.vocabSize = max + 1;
    const flag = (key: string, dflt: boolean): boolean => {
      const v = own(config, key);
      if (v === undefined || v === null) return dflt;
      if (typeof v !== 'boolean') throw new FormatError(`${source}: "${key}" must be true or false, found ${JSON.stringify(v)}`);
      return v;
    };
    this.addBos = flag('add_bos_token', true);
    this.addEos = flag('add_eos_token', false);
    this.legacy = flag('legacy', true);

    const ct = opts.chatTemplate ?? own(config, 'chat_template') ?? null;
    if (ct === null || typeof ct === 'string') {
      this.chatTemplate = ct;
    } else if (Array.isArray(ct)) {
      const named = new Map<string, string>();
      for (const e of ct) {
        if (!isObj(e) || typeof own(e, 'name') !== 'string' || typeof own(e, 'template') !== 'string') throw new FormatError(`${source}: "chat_template" list entries must be {name, template} strings`);
        named.set(own(e, 'name') as string, own(e, 'template') as string);
      }
      this.templateNames = [...named.keys()];
      this.chatTemplate = named.get('default') ?? (named.size === 1 ? [...named.values()][0] : null);
    } else {
      throw new FormatError(`${source}: "chat_template" must be a string or a list of {name, template}`);
    }
  }

  /** added_tokens.json entries (merged into the config as `__added_tokens_json`) and added_tokens_decoder. */
  private readAddedTokens(config: Obj): void {
    const n = this.sp.size;
    const limit = n + 1_000_000;
    const add = (text: string, id: unknown, special: boolean, where: string): void => {
      if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0 || id >= limit) {
        throw new FormatError(`${this.source}: ${where}: token ${JSON.stringify(text)} has id ${JSON.stringify(id)}; ids must be integers in [0, ${limit})`);
      }
      if (text === '') throw new FormatError(`${this.source}: ${where}: an added token is empty`);
      if (id >= n) this.addedById.set(id, text);
      else if (this.sp.pieces[id].piece !== text && this.addedById.get(id) === undefined) this.addedById.set(id, text);
      this.addedByText.set(text, id);
      if (special) this.specialIds.add(id);
    };
    const json = own(config, '__added_tokens_json');
    if (json !== undefined) {
      if (!isObj(json)) throw new FormatError(`${this.source}: added_tokens.json must be an object {token: id}`);
      for (const [t, id] of Object.entries(json)) add(t, id, false, 'added_tokens.json');
    }
    const dec = own(config, 'added_tokens_decoder');
    if (dec !== undefined && dec !== null) {
      if (!isObj(dec)) throw new FormatError(`${this.source}: "added_tokens_decoder" must be an object {id: {content, ...}}`);
      for (const [k, v] of Object.entries(dec)) {
        const text = tokenContent(v);
        if (text === null || !/^\d+$/.test(k)) throw new FormatError(`${this.source}: added_tokens_decoder entry ${JSON.stringify(k)} must be "id": {"content": ...}`);
        add(text, Number(k), isObj(v) && own(v, 'special') === true, 'added_tokens_decoder');
      }
    }
  }

  /**
   * Loads `tokenizer.model` from an HF model directory with tokenizer_config.json, special_tokens_map.json,
   * added_tokens.json and chat_template.jinja / chat_template.json when present (the same merge rules as
   * TextTokenizer.load: the config wins over the map except for values it leaves null).
   */
  static load(dir: string): SentencePieceTokenizer {
    const mp = path.join(dir, 'tokenizer.model');
    if (!fs.existsSync(mp)) throw new FormatError(`${dir}: no tokenizer.model`, { hint: 'point --model at a Hugging Face model directory' });
    const config: Obj = {};
    const sp = path.join(dir, 'special_tokens_map.json');
    if (fs.existsSync(sp)) {
      const s = readJsonFile(sp);
      if (!isObj(s)) throw new FormatError(`${sp}: must be a JSON object`);
      Object.assign(config, s);
    }
    const cp = path.join(dir, 'tokenizer_config.json');
    if (fs.existsSync(cp)) {
      const c = readJsonFile(cp);
      if (!isObj(c)) throw new FormatError(`${cp}: must be a JSON object`);
      for (const [k, v] of Object.entries(c)) if (v !== null || !(k in config)) config[k] = v;
    }
    const ap = path.join(dir, 'added_tokens.json');
    if (fs.existsSync(ap)) config.__added_tokens_json = readJsonFile(ap);
    let chatTemplate: string | null = null;
    const jp = path.join(dir, 'chat_template.jinja');
    const jsp = path.join(dir, 'chat_template.json');
    if (fs.existsSync(jp)) chatTemplate = fs.readFileSync(jp, 'utf8');
    else if (fs.existsSync(jsp)) {
      const j = readJsonFile(jsp);
      if (!isObj(j) || typeof own(j, 'chat_template') !== 'string') throw new FormatError(`${jsp}: must be {"chat_template": "..."}`);
      chatTemplate = own(j, 'chat_template') as string;
    }
    return new SentencePieceTokenizer(SentencePieceProcessor.load(mp), config, mp, { chatTemplate });
  }

  /** Builds a tokenizer from model bytes and an already parsed (merged) tokenizer config. */
  static fromModel(model: Uint8Array, config: object, source: string, opts: SentencePieceTokenizerOptions = {}): SentencePieceTokenizer {
    if (!isObj(config)) throw new FormatError(`${source}: tokenizer config must be a JSON object`);
    return new SentencePieceTokenizer(SentencePieceProcessor.fromBytes(model, source), config, source, opts);
  }

  /** Token ids of `text`; addSpecialTokens (default true) adds BOS/EOS per the config, or ChatGLM2's [gMASK, sop]. */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== 'string') throw new DataError(`encode expects a string, got ${typeof text}`);
    const addSpecial = opts.addSpecialTokens ?? true;
    if (this.kind === 'chatglm2') {
      const ids = this.sp.encodeIds(text);
      if (this.remap.size > 0) for (let i = 0; i < ids.length; i++) ids[i] = this.remap.get(ids[i]) ?? ids[i];
      return addSpecial ? [...this.prefixTokens(), ...ids] : ids;
    }
    const ids: number[] = [];
    let first = true;
    for (const seg of this.split(text)) {
      if (typeof seg === 'number') ids.push(seg);
      // legacy: every span gets the dummy prefix; legacy false: only a span at the very start of the text.
      else ids.push(...this.sp.encodeIds(this.legacy ? seg : seg.replaceAll(SPACE_SYMBOL, ' '), { addDummyPrefix: this.legacy || first }));
      first = false;
    }
    if (addSpecial && this.addBos && this.bosId !== null) ids.unshift(this.bosId);
    if (addSpecial && this.addEos && this.eosId !== null) ids.push(this.eosId);
    return ids;
  }

  /** Splits added / special tokens out of `text`: strings for SentencePiece, numbers for token ids. */
  private split(text: string): (string | number)[] {
    if (this.splitTokens.length === 0 || text === '') return text === '' ? [] : [text];
    const out: (string | number)[] = [];
    let pos = 0;
    for (;;) {
      // The earliest occurrence of any token; the longest one where several start there.
      let at = -1, hit: [string, number] | null = null;
      for (const t of this.splitTokens) {
        const i = text.indexOf(t[0], pos);
        if (i >= 0 && (at < 0 || i < at)) { at = i; hit = t; }
      }
      if (!hit) break;
      if (at > pos) out.push(text.slice(pos, at));
      out.push(hit[1]);
      pos = at + hit[0].length;
    }
    if (pos < text.length) out.push(text.slice(pos));
    return out;
  }

  /**
   * Text of `ids`. skipSpecialTokens drops special ids (BOS/EOS/UNK/PAD, control pieces, ChatGLM's five) before
   * decoding, as transformers does; otherwise they appear as their token text ("<s>", "[gMASK]").
   */
  decode(ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    for (const id of ids) {
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.vocabSize || (id >= this.sp.size && !this.addedById.has(id))) {
        throw new ShapeError(`token id ${id} is out of range for the tokenizer of ${this.source} (${this.vocabSize} ids)`, { hint: 'were these ids produced by another model?' });
      }
    }
    const skip = opts.skipSpecialTokens ?? false;
    const kept = skip ? ids.filter((id) => !this.specialIds.has(id)) : ids;
    return this.sp.decodeIds(kept, (id) => {
      const added = this.addedById.get(id);
      if (added !== undefined) return added;
      if (this.sp.isControl(id) || this.sp.isUnknown(id)) return this.sp.pieces[id].piece;
      return undefined;
    });
  }

  tokenToId(token: string): number | null {
    const added = this.addedByText.get(token);
    if (added !== undefined) return added;
    const id = this.sp.lookup(token);
    return id >= 0 ? id : null;
  }

  idToToken(id: number): string | null {
    if (!Number.isSafeInteger(id) || id < 0) return null;
    return this.addedById.get(id) ?? this.sp.pieces[id]?.piece ?? null;
  }

  /** The ids addSpecialTokens puts in front: ChatGLM2's [gMASK, sop], or [BOS] when the config adds one. */
  prefixTokens(): number[] {
    if (this.kind === 'chatglm2') return [this.sp.size + 1, this.sp.size + 3];
    return this.addBos && this.bosId !== null ? [this.bosId] : [];
  }

  /** ChatGLM2's prompt for `query` after `history` (see the exported chatGlmPrompt). */
  chatGlmPrompt(query: string, history: readonly (readonly [string, string])[] = []): string {
    return chatGlmPrompt(query, history);
  }

  /** Renders the chat template the way transformers' `apply_chat_template(tokenize=False)` does. */
  applyChatTemplate(messages: SpChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    if (this.chatTemplate === null && this.kind === 'chatglm2') {
      throw new ConfigError(`${this.source}: ChatGLM2 has no chat template`, { hint: 'its prompt format is chatGlmPrompt(): "[Round 1]\\n\\n问：…\\n\\n答："' });
    }
    return renderChatTemplate(this.source, this.chatTemplate, this.templateNames, this.specials, messages, opts);
  }
}
