// The SentencePiece model file (`tokenizer.model`): a ModelProto protobuf (sentencepiece_model.proto, proto2). Only
// the fields encoding/decoding depend on are read, by a bounds-checked reader written for hostile input: every
// malformed structure is a FormatError naming the file and the byte (fuzzed in test/formats). Hand-written rather
// than generated: proto2 defaults (add_dummy_prefix = true, ...), strict UTF-8 and wire-type checks with those
// messages are what the tokenizer relies on, and the reader is ~150 lines.
import { FormatError } from './errors.ts';

/** ModelProto.SentencePiece.Type values. */
export const PieceType = { Normal: 1, Unknown: 2, Control: 3, UserDefined: 4, Unused: 5, Byte: 6 } as const;
export type PieceType = (typeof PieceType)[keyof typeof PieceType];

export interface SpModelProto {
  pieces: { piece: string; score: number; type: PieceType }[];
  /** TrainerSpec.model_type: 1 unigram, 2 bpe, 3 word, 4 char. */
  modelType: number;
  byteFallback: boolean;
  treatWhitespaceAsSuffix: boolean;
  unkSurface: string;
  unkPiece: string; bosPiece: string; eosPiece: string; padPiece: string;
  normalizer: NormalizerSpec;
  /** Denormalizer charsmap (applied to decoded text); almost never present. */
  denormalizerCharsmap: Uint8Array | null;
}

export interface NormalizerSpec {
  name: string;
  /** <uint32 LE trie size><darts-clone double array><NUL-separated replacement strings>, or null (identity). */
  precompiledCharsmap: Uint8Array | null;
  addDummyPrefix: boolean;
  removeExtraWhitespaces: boolean;
  escapeWhitespaces: boolean;
}

const utf8Strict = new TextDecoder('utf-8', { fatal: true });

/** A bounds-checked protobuf wire reader over buf[pos, end). */
class PbReader {
  pos: number;
  constructor(private readonly buf: Uint8Array, start: number, readonly end: number, private readonly where: string) { this.pos = start; }

  fail(what: string): never {
    throw new FormatError(`${this.where}: malformed protobuf at byte ${this.pos}: ${what}`, { hint: 'the tokenizer.model file is truncated or not a SentencePiece model' });
  }

  /** A varint as a JS number (exact below 2^53; only enums, bools, lengths and tags are read). */
  varint(): number {
    let v = 0;
    for (let i = 0, mul = 1; i < 10; i++, mul *= 128) {
      if (this.pos >= this.end) this.fail('truncated varint');
      const b = this.buf[this.pos++];
      v += (b & 0x7f) * mul;
      if (b < 0x80) return v;
    }
    return this.fail('varint longer than 10 bytes');
  }

  /** Sub-range [start, end) of a length-delimited field. */
  bytes(): [number, number] {
    const n = this.varint();
    if (n > this.end - this.pos) this.fail(`field length ${n} runs past the end`);
    const s = this.pos;
    this.pos += n;
    return [s, this.pos];
  }

  string(): string {
    const [s, e] = this.bytes();
    try {
      return utf8Strict.decode(this.buf.subarray(s, e));
    } catch {
      return this.fail('string field is not UTF-8');
    }
  }

  float32(): number {
    if (this.end - this.pos < 4) this.fail('truncated fixed32');
    const v = new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, 4).getFloat32(0, true);
    this.pos += 4;
    return v;
  }

  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) { if (this.end - this.pos < 8) this.fail('truncated fixed64'); this.pos += 8; }
    else if (wire === 2) this.bytes();
    else if (wire === 5) { if (this.end - this.pos < 4) this.fail('truncated fixed32'); this.pos += 4; }
    else this.fail(`unsupported wire type ${wire}`);
  }

  /** Calls `field(number, wire)` for every field; `field` returns false to have it skipped. */
  fields(field: (num: number, wire: number) => boolean): void {
    while (this.pos < this.end) {
      const tag = this.varint();
      const num = Math.floor(tag / 8), wire = tag % 8;
      if (num === 0) this.fail('field number 0');
      if (!field(num, wire)) this.skip(wire);
    }
  }

  expect(wire: number, want: number, name: string): void {
    if (wire !== want) this.fail(`field ${name} has wire type ${wire}, expected ${want}`);
  }
}

/** Parses the bytes of a SentencePiece `tokenizer.model`. Structure only; SentencePieceProcessor checks meaning. */
export function parseModelProto(buf: Uint8Array, where: string): SpModelProto {
  const m: SpModelProto = {
    pieces: [], modelType: 1, byteFallback: false, treatWhitespaceAsSuffix: false, unkSurface: ' \u2047 ',
    unkPiece: '<unk>', bosPiece: '<s>', eosPiece: '</s>', padPiece: '<pad>',
    normalizer: { name: '', precompiledCharsmap: null, addDummyPrefix: true, removeExtraWhitespaces: true, escapeWhitespaces: true },
    denormalizerCharsmap: null,
  };
  const readNormalizer = (r: PbReader, spec: NormalizerSpec): void => r.fields((num, wire) => {
    switch (num) {
      case 1: r.expect(wire, 2, 'name'); spec.name = r.string(); return true;
      case 2: { r.expect(wire, 2, 'precompiled_charsmap'); const [s, e] = r.bytes(); spec.precompiledCharsmap = e > s ? buf.slice(s, e) : null; return true; }
      case 3: r.expect(wire, 0, 'add_dummy_prefix'); spec.addDummyPrefix = r.varint() !== 0; return true;
      case 4: r.expect(wire, 0, 'remove_extra_whitespaces'); spec.removeExtraWhitespaces = r.varint() !== 0; return true;
      case 5: r.expect(wire, 0, 'escape_whitespaces'); spec.escapeWhitespaces = r.varint() !== 0; return true;
      default: return false;
    }
  });
  const top = new PbReader(buf, 0, buf.length, where);
  top.fields((num, wire) => {
    if (num < 1 || num > 5) return false;
    top.expect(wire, 2, `ModelProto field ${num}`);
    const [s, e] = top.bytes();
    const r = new PbReader(buf, s, e, where);
    if (num === 1) {
      const p: { piece: string; score: number; type: PieceType } = { piece: '', score: 0, type: PieceType.Normal };
      r.fields((n, w) => {
        if (n === 1) { r.expect(w, 2, 'piece'); p.piece = r.string(); return true; }
        if (n === 2) { r.expect(w, 5, 'score'); p.score = r.float32(); return true; }
        if (n === 3) {
          r.expect(w, 0, 'type');
          const t = r.varint();
          if (t < 1 || t > 6) r.fail(`unknown piece type ${t}`);
          p.type = t as PieceType;
          return true;
        }
        return false;
      });
      m.pieces.push(p);
    } else if (num === 2) {
      r.fields((n, w) => {
        switch (n) {
          case 3: r.expect(w, 0, 'model_type'); m.modelType = r.varint(); return true;
          case 24: r.expect(w, 0, 'treat_whitespace_as_suffix'); m.treatWhitespaceAsSuffix = r.varint() !== 0; return true;
          case 35: r.expect(w, 0, 'byte_fallback'); m.byteFallback = r.varint() !== 0; return true;
          case 44: r.expect(w, 2, 'unk_surface'); m.unkSurface = r.string(); return true;
          case 45: r.expect(w, 2, 'unk_piece'); m.unkPiece = r.string() || '<unk>'; return true;
          case 46: r.expect(w, 2, 'bos_piece'); m.bosPiece = r.string() || '<s>'; return true;
          case 47: r.expect(w, 2, 'eos_piece'); m.eosPiece = r.string() || '</s>'; return true;
          case 48: r.expect(w, 2, 'pad_piece'); m.padPiece = r.string() || '<pad>'; return true;
          default: return false;
        }
      });
    } else if (num === 3) {
      readNormalizer(r, m.normalizer);
    } else if (num === 5) {
      const d: NormalizerSpec = { name: '', precompiledCharsmap: null, addDummyPrefix: true, removeExtraWhitespaces: true, escapeWhitespaces: true };
      readNormalizer(r, d);
      m.denormalizerCharsmap = d.precompiledCharsmap;
    }
    return true;
  });
  return m;
}
