// safetensors reading and writing (https://github.com/huggingface/safetensors), the format of every HF model,
// adapter and checkpoint this project touches.
//
// Layout: 8-byte little-endian u64 N | N bytes of UTF-8 JSON header | data section. The header maps each tensor
// name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the data section) plus an optional
// "__metadata__": {string: string}.
//
// Files come from the internet, so the header is treated as hostile: its length is bounded, the JSON is
// parsed by a strict parser that rejects duplicate keys and deep nesting, and every offset is checked
// against the dtype, the shape and the file size before anything is read. Tensor data is read lazily with
// positioned reads, one tensor at a time, so a worker that holds four layers of a 70B model never reads the
// rest of the file. Every problem with a file is a FormatError naming the file and the tensor.
//
// Writing follows the Rust reference (`safetensors::tensor::prepare`): tensors sorted by dtype alignment
// (descending, in the Rust `Dtype` enum order) then by name (UTF-8 bytes), compact JSON header with
// "__metadata__" first, padded with spaces to a multiple of 8 bytes so every tensor starts aligned. Files
// are written atomically: temp file, fsync, rename, fsync of the directory.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FormatError, ShapeError, UnsupportedError } from './errors.ts';
import { bf16ToF32, f16ToF32 } from './halfprec.ts';
import { MAX_JSON_DEPTH, describeJson as describe, parseJsonStrict, type Json } from './json-strict.ts';
import { writeFileAtomic } from './fs-atomic.ts';

if (os.endianness() !== 'LE') {
  // Typed-array views over file bytes assume the host byte order is the file's (little-endian).
  throw new UnsupportedError('safetensors: big-endian hosts are not supported');
}

/** The dtypes this project reads and writes. */
export type StDtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';
/** Dtypes the format defines that we list but do not convert (reading them as numbers is an UnsupportedError). */
export type ForeignDtype = 'U64' | 'U32' | 'U16' | 'C64' | 'F8_E5M2' | 'F8_E4M3' | 'F8_E8M0' | 'F6_E2M3' | 'F6_E3M2' | 'F4';

export interface TensorInfo {
  name: string;
  /** One of StDtype for every tensor this project can convert; a ForeignDtype can be listed and read raw only. */
  dtype: StDtype | ForeignDtype;
  shape: number[];
  byteLength: number;
  /** The file that holds the tensor. */
  file: string;
  /** Absolute byte offset of the tensor's data in `file` (for callers that stream it themselves). */
  fileOffset: number;
}

export interface TensorRecord {
  name: string;
  dtype: StDtype;
  shape: readonly number[];
  /** Raw little-endian bytes, or a typed array whose bytes are the payload (F32 → Float32Array, I32 →
   *  Int32Array, F16/BF16/I16 → Uint16Array). */
  data: Uint8Array | Float32Array | Int32Array | Uint16Array;
}

/** Size of one element in bits (sub-byte dtypes F4/F6 pack elements; the byte count must come out whole). */
const DTYPE_BITS: Record<StDtype | ForeignDtype, number> = {
  F64: 64, F32: 32, F16: 16, BF16: 16, I64: 64, I32: 32, I16: 16, I8: 8, U8: 8, BOOL: 8,
  U64: 64, U32: 32, U16: 16, C64: 64, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8, F6_E2M3: 6, F6_E3M2: 6, F4: 4,
};
const READABLE = new Set<string>(['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL']);

/** Position in the Rust `Dtype` enum; the writer sorts by it, descending, so larger alignments come first. */
const RUST_DTYPE_ORDER: readonly string[] = [
  'BOOL', 'F4', 'F6_E2M3', 'F6_E3M2', 'U8', 'I8', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'I16', 'U16', 'F16', 'BF16',
  'I32', 'U32', 'F32', 'C64', 'F64', 'I64', 'U64',
];

/** Same bound as the Rust reader (MAX_HEADER_SIZE). */
export const MAX_HEADER_BYTES = 100_000_000;
/** File names of an HF model's safetensors weights (single file / sharded index). */
export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';
const UTF8 = new TextEncoder();
/** fs.readSync takes at most 2 GiB - 1 per call; read in 1 GiB pieces. */
const READ_CHUNK = 1 << 30;

export function dtypeByteSize(dtype: StDtype): number {
  return DTYPE_BITS[dtype] / 8;
}

// ---------------------------------------------------------------------------------------------------------
// Reading

interface Entry {
  dtype: StDtype | ForeignDtype;
  shape: number[];
  begin: number; // relative to the data section
  end: number;
}

/** One open .safetensors file: the validated header in memory, tensor data read on demand. */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Record<string, string>;
  /** Absolute offset of the data section (8 + header length). */
  readonly dataStart: number;
  private fd: number | null;
  private readonly entries: Map<string, Entry>;

  private constructor(p: string, fd: number, metadata: Record<string, string>, entries: Map<string, Entry>, dataStart: number) {
    this.path = p;
    this.fd = fd;
    this.metadata = metadata;
    this.entries = entries;
    this.dataStart = dataStart;
  }

  /** Opens and validates a file; reads only its header. Throws FormatError for anything malformed. */
  static open(p: string): SafetensorsFile {
    let fd: number;
    try {
      fd = fs.openSync(p, 'r');
    } catch (e) {
      throw new FormatError(`cannot open safetensors file ${p}: ${(e as Error).message}`, { cause: e });
    }
    try {
      const { metadata, entries, dataStart } = readHeader(fd, p);
      return new SafetensorsFile(p, fd, metadata, entries, dataStart);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** Tensor names in file order (by data offset). */
  names(): string[] {
    return [...this.entries.keys()];
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  info(name: string): TensorInfo {
    const e = this.entry(name);
    return { name, dtype: e.dtype, shape: [...e.shape], byteLength: e.end - e.begin, file: this.path, fileOffset: this.dataStart + e.begin };
  }

  /**
   * The tensor's exact bytes, read from disk now. The result owns a fresh ArrayBuffer (byteOffset 0), so it
   * can be viewed as any typed array of the dtype. Works for ForeignDtype tensors too (bytes are bytes).
   */
  readRaw(name: string): Uint8Array {
    const e = this.entry(name);
    const out = new Uint8Array(e.end - e.begin);
    this.readInto(name, e, out);
    return out;
  }

  /** Reads the tensor's bytes into `dst` (exactly byteLength bytes), e.g. a reused staging buffer. */
  readRawInto(name: string, dst: Uint8Array): void {
    const e = this.entry(name);
    if (dst.byteLength !== e.end - e.begin) {
      throw new ShapeError(`${this.path}: tensor '${name}' has ${e.end - e.begin} bytes, destination has ${dst.byteLength}`);
    }
    this.readInto(name, e, dst);
  }

  /** The tensor as float32, converted from any readable dtype (F64 rounds, I64 beyond 2^24 loses precision). */
  readF32(name: string): Float32Array {
    const e = this.entry(name);
    const numel = numelOf(e.shape);
    switch (e.dtype) {
      case 'F32': {
        const out = new Float32Array(numel);
        this.readInto(name, e, new Uint8Array(out.buffer));
        return out;
      }
      case 'F16': return f16ToF32(new Uint16Array(this.readRaw(name).buffer));
      case 'BF16': return bf16ToF32(new Uint16Array(this.readRaw(name).buffer));
      case 'F64': return Float32Array.from(new Float64Array(this.readRaw(name).buffer));
      case 'I64': {
        const src = new BigInt64Array(this.readRaw(name).buffer);
        const out = new Float32Array(numel);
        for (let i = 0; i < numel; i++) out[i] = Number(src[i]);
        return out;
      }
      case 'I32': return Float32Array.from(new Int32Array(this.readRaw(name).buffer));
      case 'I16': return Float32Array.from(new Int16Array(this.readRaw(name).buffer));
      case 'I8': return Float32Array.from(new Int8Array(this.readRaw(name).buffer));
      case 'U8': return Float32Array.from(this.readRaw(name));
      case 'BOOL': return Float32Array.from(this.readRaw(name), (b) => (b !== 0 ? 1 : 0));
      default: throw this.unsupported(name, e.dtype, 'readF32');
    }
  }

  /** The tensor as int32, from an integer or BOOL tensor; I64 values must fit in int32. */
  readI32(name: string): Int32Array {
    const e = this.entry(name);
    const numel = numelOf(e.shape);
    switch (e.dtype) {
      case 'I32': {
        const out = new Int32Array(numel);
        this.readInto(name, e, new Uint8Array(out.buffer));
        return out;
      }
      case 'I64': {
        const src = new BigInt64Array(this.readRaw(name).buffer);
        const out = new Int32Array(numel);
        for (let i = 0; i < numel; i++) {
          const v = src[i];
          if (v > 2147483647n || v < -2147483648n) {
            throw new FormatError(`${this.path}: tensor '${name}' (I64) element ${i} = ${v} does not fit in int32`);
          }
          out[i] = Number(v);
        }
        return out;
      }
      case 'I16': return Int32Array.from(new Int16Array(this.readRaw(name).buffer));
      case 'I8': return Int32Array.from(new Int8Array(this.readRaw(name).buffer));
      case 'U8': return Int32Array.from(this.readRaw(name));
      case 'BOOL': return Int32Array.from(this.readRaw(name), (b) => (b !== 0 ? 1 : 0));
      case 'F64': case 'F32': case 'F16': case 'BF16':
        throw new UnsupportedError(`${this.path}: tensor '${name}' is ${e.dtype}; readI32 reads integer tensors only`, { hint: 'use readF32' });
      default: throw this.unsupported(name, e.dtype, 'readI32');
    }
  }

  close(): void {
    if (this.fd !== null) {
      fs.closeSync(this.fd);
      this.fd = null;
    }
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (!e) throw new FormatError(`${this.path}: no tensor named '${name}'`, { hint: `the file has ${this.entries.size} tensors; check the name (and the model architecture)` });
    return e;
  }

  private unsupported(name: string, dtype: string, op: string): UnsupportedError {
    return new UnsupportedError(`${this.path}: tensor '${name}' has dtype ${dtype}, which ${op} cannot convert`, {
      hint: 'supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL; readRaw returns the bytes of any dtype',
    });
  }

  private readInto(name: string, e: Entry, dst: Uint8Array): void {
    if (this.fd === null) throw new FormatError(`${this.path}: read of '${name}' after close()`);
    const len = e.end - e.begin;
    const pos = this.dataStart + e.begin;
    let done = 0;
    while (done < len) {
      const n = fs.readSync(this.fd, dst, done, Math.min(len - done, READ_CHUNK), pos + done);
      if (n === 0) {
        // The header was checked against the size at open; the file shrank since (being rewritten?).
        throw new FormatError(`${this.path}: file ended while reading tensor '${name}' (${done} of ${len} bytes)`, {
          hint: 'the file was truncated or replaced after it was opened',
        });
      }
      done += n;
    }
  }
}

function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function readHeader(fd: number, p: string): { metadata: Record<string, string>; entries: Map<string, Entry>; dataStart: number } {
  const size = fs.fstatSync(fd).size;
  if (size < 8) throw new FormatError(`${p}: not a safetensors file (${size} bytes, shorter than the 8-byte header length)`);
  const lenBuf = new Uint8Array(8);
  readExact(fd, lenBuf, 0, p);
  const n64 = new DataView(lenBuf.buffer).getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_BYTES)) {
    throw new FormatError(`${p}: header length ${n64} exceeds the ${MAX_HEADER_BYTES}-byte limit`, { hint: 'the file is corrupt or not a safetensors file' });
  }
  const n = Number(n64);
  if (8 + n > size) throw new FormatError(`${p}: header length ${n} runs past the end of the ${size}-byte file`, { hint: 'the file is truncated or not a safetensors file' });
  if (n < 2) throw new FormatError(`${p}: header length ${n} is too small for a JSON object`);
  const hdr = new Uint8Array(n);
  readExact(fd, hdr, 8, p);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(hdr);
  } catch (e) {
    throw new FormatError(`${p}: header is not valid UTF-8`, { cause: e });
  }
  if (text[0] !== '{') throw new FormatError(`${p}: header does not start with '{'`, { hint: 'not a safetensors file' });
  const root = parseJsonStrict(text, `${p} (header)`);
  if (!(root instanceof Map)) throw new FormatError(`${p}: header is not a JSON object`);

  const dataStart = 8 + n;
  const dataSize = size - dataStart;
  const metadata: Record<string, string> = Object.create(null);
  const entries: [string, Entry][] = [];
  for (const [name, v] of root) {
    if (name === '__metadata__') {
      if (v === null) continue;
      if (!(v instanceof Map)) throw new FormatError(`${p}: "__metadata__" must be an object of strings, found ${describe(v)}`);
      for (const [k, s] of v) {
        if (typeof s !== 'string') throw new FormatError(`${p}: "__metadata__"["${k}"] must be a string, found ${describe(s)}`);
        metadata[k] = s;
      }
      continue;
    }
    entries.push([name, parseEntry(p, name, v, dataSize)]);
  }
  // Overlap check: sort by begin; a non-empty range must start at or after the furthest end seen so far.
  const byOffset = [...entries].sort((a, b) => a[1].begin - b[1].begin || a[1].end - b[1].end);
  let maxEnd = 0;
  let maxEndName = '';
  for (const [name, e] of byOffset) {
    if (e.end === e.begin) continue;
    if (e.begin < maxEnd) {
      throw new FormatError(`${p}: tensor '${name}' bytes [${e.begin}, ${e.end}) overlap tensor '${maxEndName}' (ends at ${maxEnd})`, {
        hint: 'the header is corrupt or hostile',
      });
    }
    maxEnd = e.end;
    maxEndName = name;
  }
  return { metadata, entries: new Map(byOffset), dataStart };
}

function parseEntry(p: string, name: string, v: Json, dataSize: number): Entry {
  const where = `${p}: tensor '${name.length > 200 ? name.slice(0, 200) + '...' : name}'`;
  if (!(v instanceof Map)) throw new FormatError(`${where}: entry must be an object {dtype, shape, data_offsets}, found ${describe(v)}`);
  const dtype = v.get('dtype');
  if (typeof dtype !== 'string' || !Object.prototype.hasOwnProperty.call(DTYPE_BITS, dtype)) {
    throw new FormatError(`${where}: unknown dtype ${describe(dtype)}`, { hint: `known dtypes: ${Object.keys(DTYPE_BITS).join(', ')}` });
  }
  const shapeV = v.get('shape');
  if (!Array.isArray(shapeV)) throw new FormatError(`${where}: shape must be an array of integers, found ${describe(shapeV)}`);
  const shape: number[] = [];
  let numel = 1;
  for (const d of shapeV) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw new FormatError(`${where}: shape ${describe(shapeV)} has a dimension that is not a non-negative integer`);
    shape.push(d);
    numel *= d;
    if (numel > Number.MAX_SAFE_INTEGER) throw new FormatError(`${where}: shape ${describe(shapeV)} has too many elements`);
  }
  const offs = v.get('data_offsets');
  if (!Array.isArray(offs) || offs.length !== 2) throw new FormatError(`${where}: data_offsets must be [begin, end], found ${describe(offs)}`);
  const [begin, end] = offs;
  if (typeof begin !== 'number' || typeof end !== 'number' || !Number.isSafeInteger(begin) || !Number.isSafeInteger(end) || begin < 0 || end < begin) {
    throw new FormatError(`${where}: data_offsets ${describe(offs)} must be integers with 0 <= begin <= end`);
  }
  if (end > dataSize) {
    throw new FormatError(`${where}: data_offsets [${begin}, ${end}] run past the data section (${dataSize} bytes)`, { hint: 'the file is truncated or its header is corrupt' });
  }
  const bits = DTYPE_BITS[dtype as StDtype | ForeignDtype];
  const totalBits = numel * bits;
  if (totalBits > Number.MAX_SAFE_INTEGER || totalBits % 8 !== 0) {
    throw new FormatError(`${where}: ${numel} elements of ${dtype} do not make a whole number of bytes`);
  }
  if (end - begin !== totalBits / 8) {
    throw new FormatError(`${where}: ${dtype} ${describe(shapeV)} needs ${totalBits / 8} bytes, data_offsets [${begin}, ${end}] give ${end - begin}`);
  }
  return { dtype: dtype as StDtype | ForeignDtype, shape, begin, end };
}

function readExact(fd: number, buf: Uint8Array, pos: number, p: string): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, Math.min(buf.length - done, READ_CHUNK), pos + done);
    if (n === 0) throw new FormatError(`${p}: unexpected end of file at byte ${pos + done}`);
    done += n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Writing

interface Planned {
  name: string;
  dtype: StDtype;
  shape: readonly number[];
  bytes: Uint8Array;
}

function checkRecords(tensors: readonly TensorRecord[], target: string): Planned[] {
  const seen = new Set<string>();
  return tensors.map((t) => {
    if (seen.has(t.name)) throw new FormatError(`${target}: tensor name '${t.name}' appears twice`);
    if (t.name === '__metadata__') throw new FormatError(`${target}: '__metadata__' is reserved and cannot name a tensor`);
    seen.add(t.name);
    if (!READABLE.has(t.dtype)) throw new FormatError(`${target}: tensor '${t.name}' has unknown dtype ${String(t.dtype)}`);
    for (const d of t.shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new ShapeError(`${target}: tensor '${t.name}' shape [${t.shape.join(', ')}] has a bad dimension`);
    }
    const d = t.data;
    const okType = d instanceof Uint8Array
      || (d instanceof Float32Array && t.dtype === 'F32')
      || (d instanceof Int32Array && t.dtype === 'I32')
      || (d instanceof Uint16Array && (t.dtype === 'F16' || t.dtype === 'BF16' || t.dtype === 'I16'));
    if (!okType) throw new ShapeError(`${target}: tensor '${t.name}' is ${t.dtype} but its data is a ${d.constructor.name}`, { hint: 'pass raw bytes (Uint8Array) or the matching typed array' });
    const want = numelOf(t.shape) * dtypeByteSize(t.dtype);
    if (d.byteLength !== want) {
      throw new ShapeError(`${target}: tensor '${t.name}' ${t.dtype} [${t.shape.join(', ')}] needs ${want} bytes, data has ${d.byteLength}`);
    }
    return { name: t.name, dtype: t.dtype, shape: t.shape, bytes: new Uint8Array(d.buffer, d.byteOffset, d.byteLength) };
  });
}

/** Sorted as the Rust reference: dtype (enum order, descending), then name by UTF-8 bytes. */
function sortForWrite(ts: Planned[]): Planned[] {
  return [...ts].sort((a, b) =>
    RUST_DTYPE_ORDER.indexOf(b.dtype) - RUST_DTYPE_ORDER.indexOf(a.dtype) || compareUtf8(a.name, b.name));
}

/** Orders strings by their UTF-8 bytes, as Rust's `str::cmp` does (JS `<` compares UTF-16 units). */
function compareUtf8(a: string, b: string): number {
  const x = UTF8.encode(a), y = UTF8.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/** The file's first bytes: u64 length + compact JSON header padded with spaces to a multiple of 8. */
function buildHeader(sorted: readonly Planned[], metadata: Record<string, string> | undefined, target: string): Uint8Array {
  const parts: string[] = [];
  if (metadata !== undefined) {
    const md: string[] = [];
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new FormatError(`${target}: metadata["${k}"] must be a string`);
      md.push(`${JSON.stringify(k)}:${JSON.stringify(v)}`);
    }
    parts.push(`"__metadata__":{${md.join(',')}}`);
  }
  let offset = 0;
  for (const t of sorted) {
    const end = offset + t.bytes.byteLength;
    // Built by hand: JSON.stringify of an object would move integer-like names ("0", "1") to the front.
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${offset},${end}]}`);
    offset = end;
  }
  const json = UTF8.encode(`{${parts.join(',')}}`);
  const pad = (8 - (json.length % 8)) % 8;
  const out = new Uint8Array(8 + json.length + pad).fill(0x20);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length + pad), true);
  out.set(json, 8);
  return out;
}

/**
 * Writes one .safetensors file the way the Rust reference lays it out (see the header comment), atomically.
 * Throws FormatError (duplicate/reserved names, bad metadata) or ShapeError (data does not match dtype × shape).
 */
export function writeSafetensors(target: string, tensors: TensorRecord[], metadata?: Record<string, string>): void {
  const sorted = sortForWrite(checkRecords(tensors, target));
  writeFileAtomic(target, [buildHeader(sorted, metadata, target), ...sorted.map((t) => t.bytes)]);
}

const SHARD_RE = /^model-\d{5}-of-\d{5}\.safetensors$/;

/**
 * Writes `model.safetensors` when everything fits in `maxShardBytes`, else `model-0000k-of-0000N.safetensors`
 * shards plus `model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`, keys sorted,
 * indent 2, as transformers writes it). Tensors are assigned to shards greedily in the given order; a tensor
 * larger than the limit gets a shard of its own. Weight files of an earlier save in `dir` that this save did
 * not write (stale shards, a stale index or single file) are removed afterwards, as `save_pretrained` does.
 * Returns the paths written (shards first, the index last).
 */
export function writeShardedSafetensors(dir: string, tensors: TensorRecord[], opts: { maxShardBytes: number; metadata?: Record<string, string> }): string[] {
  if (!(opts.maxShardBytes > 0)) throw new FormatError(`writeShardedSafetensors: maxShardBytes must be positive, got ${opts.maxShardBytes}`);
  const planned = checkRecords(tensors, dir);
  const groups: Planned[][] = [[]];
  let cur = 0;
  for (const t of planned) {
    const sz = t.bytes.byteLength;
    if (cur + sz > opts.maxShardBytes && groups[groups.length - 1].length > 0) {
      groups.push([]);
      cur = 0;
    }
    groups[groups.length - 1].push(t);
    cur += sz;
  }
  fs.mkdirSync(dir, { recursive: true });
  const written: string[] = [];
  if (groups.length === 1) {
    const p = path.join(dir, SINGLE_FILE);
    const sorted = sortForWrite(groups[0]);
    writeFileAtomic(p, [buildHeader(sorted, opts.metadata, p), ...sorted.map((t) => t.bytes)]);
    written.push(p);
  } else {
    const total = groups.length;
    const weightMap: [string, string][] = [];
    let totalSize = 0;
    groups.forEach((g, k) => {
      const name = `model-${String(k + 1).padStart(5, '0')}-of-${String(total).padStart(5, '0')}.safetensors`;
      const p = path.join(dir, name);
      const sorted = sortForWrite(g);
      writeFileAtomic(p, [buildHeader(sorted, opts.metadata, p), ...sorted.map((t) => t.bytes)]);
      for (const t of g) { weightMap.push([t.name, name]); totalSize += t.bytes.byteLength; }
      written.push(p);
    });
    weightMap.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const lines = weightMap.map(([k, v]) => `    ${JSON.stringify(k)}: ${JSON.stringify(v)}`);
    const json = `{\n  "metadata": {\n    "total_size": ${totalSize}\n  },\n  "weight_map": {\n${lines.join(',\n')}\n  }\n}\n`;
    const ip = path.join(dir, INDEX_FILE);
    writeFileAtomic(ip, [UTF8.encode(json)]);
    written.push(ip);
  }
  const keep = new Set(written.map((p) => path.basename(p)));
  for (const f of fs.readdirSync(dir)) {
    if (keep.has(f)) continue;
    if (f === SINGLE_FILE || f === INDEX_FILE || SHARD_RE.test(f)) fs.unlinkSync(path.join(dir, f));
  }
  return written;
}
