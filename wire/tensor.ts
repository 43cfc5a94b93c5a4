// The edge between proto tensors (proto/gen Tensor: dtype enum, int64 shape, bytes) and host typed arrays,
// plus chunking of large tensors for gRPC streams and their validated reassembly.
//
// Everything that arrives from the network goes through `decodeTensor` or `ChunkAssembler`, which check
// every field before allocating anything, so a hostile or corrupt message yields a WireError that says
// what was wrong, never a crash, a giant allocation or silently wrong data.
//
// Byte order is little-endian on the wire. Like common/halfprec.ts, the typed-array views below assume a
// little-endian host; the module refuses to load on a big-endian one rather than sending swapped bytes.
import zlib from 'node:zlib';
import { WireError } from '../common/errors.ts';
import { f32ToBf16, bf16ToF32 } from '../common/halfprec.ts';
import { Dtype, type Tensor } from '../proto/gen/dqlora/v1/tensor.ts';
import { ActivationChunk } from '../proto/gen/dqlora/v1/pipeline.ts';

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new WireError('wire/tensor.ts: this host is big-endian; the dqlora wire format is little-endian', {
    hint: 'run workers on a little-endian machine (x86-64, arm64)',
  });
}

/** Default chunk limit for one gRPC message: 1 MiB, well under gRPC's 4 MiB default receive limit. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;
/** Default upper bound on the elements of one received tensor: 2^28 (1 GiB of float32). */
export const DEFAULT_MAX_NUMEL = 1 << 28;
/** Default upper bound on the chunks of one tensor (1 GiB in 1 MiB chunks, with room to spare). */
export const DEFAULT_MAX_CHUNKS = 4096;

/** Host-side tensor: the domain type the rest of the code sees. bf16 data is raw bits (see common/halfprec). */
export type HostTensor =
  | { dtype: 'f32'; shape: number[]; data: Float32Array }
  | { dtype: 'bf16'; shape: number[]; data: Uint16Array }
  | { dtype: 'i32'; shape: number[]; data: Int32Array }
  | { dtype: 'u8'; shape: number[]; data: Uint8Array };
export type WireDtype = HostTensor['dtype'];

const DTYPE_INFO: Record<WireDtype, { proto: Dtype; size: number }> = {
  f32: { proto: Dtype.DTYPE_F32, size: 4 },
  bf16: { proto: Dtype.DTYPE_BF16, size: 2 },
  i32: { proto: Dtype.DTYPE_I32, size: 4 },
  u8: { proto: Dtype.DTYPE_U8, size: 1 },
};

/** Bytes per element of a wire dtype. */
export function dtypeSize(dtype: WireDtype): number {
  return DTYPE_INFO[dtype].size;
}

function wireDtypeOf(d: unknown): WireDtype | undefined {
  switch (d) {
    case Dtype.DTYPE_F32: return 'f32';
    case Dtype.DTYPE_BF16: return 'bf16';
    case Dtype.DTYPE_I32: return 'i32';
    case Dtype.DTYPE_U8: return 'u8';
    default: return undefined;
  }
}

/**
 * Checks a shape and returns its element count. Rejects non-integers, negatives and products above
 * `maxNumel` (checked while multiplying, so a shape like [2^40, 2^40] cannot overflow into a small number).
 */
export function checkShape(
  shape: readonly unknown[], maxNumel: number, what: string,
  fail: (kind: 'malformed' | 'oversized', message: string, hint?: string) => Error = (_k, m, hint) => new WireError(m, { hint }),
): number {
  if (!Array.isArray(shape)) throw fail('malformed', `${what}: shape is not a list`);
  if (shape.length > 8) throw fail('malformed', `${what}: shape [${shape.slice(0, 9).join(', ')}, …] has ${shape.length} dimensions, at most 8 are allowed`);
  let numel = 1;
  for (const d of shape) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
      throw fail('malformed', `${what}: shape [${shape.join(', ')}] has dimension ${String(d)}, expected non-negative integers`);
    }
    numel *= d;
    if (numel > maxNumel) {
      throw fail('oversized', `${what}: shape [${shape.join(', ')}] has more than ${maxNumel} elements (the receive limit)`,
        'use smaller micro-batches or raise the receiver\'s maxNumel');
    }
  }
  return numel;
}

// ---------------------------------------------------------------------------------------------------
// Host ⇄ proto tensors

/** A byte view over a typed array's memory (no copy: do not mutate the array until the message is sent). */
function bytesOf(a: ArrayBufferView): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

function encodeChecked(dtype: WireDtype, numel: number, shape: readonly number[], data: ArrayBufferView): Tensor {
  const n = checkShape(shape, Number.MAX_SAFE_INTEGER, `encode ${dtype} tensor`);
  if (n !== numel) throw new WireError(`encode ${dtype} tensor: shape [${shape.join(', ')}] has ${n} elements but the array has ${numel}`);
  return { dtype: DTYPE_INFO[dtype].proto, shape: [...shape], data: bytesOf(data) };
}

/** float32 [shape] → proto Tensor (f32). Shares the array's memory. */
export function f32ToTensor(data: Float32Array, shape: readonly number[]): Tensor {
  return encodeChecked('f32', data.length, shape, data);
}
/** float32 [shape] → proto Tensor (bf16, round-to-nearest-even): half the bytes, for activations on the wire. */
export function f32ToBf16Tensor(data: Float32Array, shape: readonly number[]): Tensor {
  return encodeChecked('bf16', data.length, shape, f32ToBf16(data));
}
/** Raw bfloat16 bits [shape] → proto Tensor (bf16). Shares the array's memory. */
export function bf16ToTensor(bits: Uint16Array, shape: readonly number[]): Tensor {
  return encodeChecked('bf16', bits.length, shape, bits);
}
export function i32ToTensor(data: Int32Array, shape: readonly number[]): Tensor {
  return encodeChecked('i32', data.length, shape, data);
}
export function u8ToTensor(data: Uint8Array, shape: readonly number[]): Tensor {
  return encodeChecked('u8', data.length, shape, data);
}
/** Any HostTensor → proto Tensor. */
export function encodeTensor(t: HostTensor): Tensor {
  return encodeChecked(t.dtype, t.data.length, t.shape, t.data);
}

export interface DecodeOptions {
  /** Upper bound on elements (default DEFAULT_MAX_NUMEL). */
  maxNumel?: number;
  /** Names the tensor in error messages, e.g. "forward step 3 micro-batch 1". */
  what?: string;
}

/**
 * Validates a proto Tensor and copies it into a fresh, aligned typed array (the decoded bytes are often a
 * slice of a larger receive buffer at an odd offset, which typed-array views cannot start at).
 */
export function decodeTensor(t: Tensor | undefined, opts: DecodeOptions = {}): HostTensor {
  const what = opts.what ?? 'tensor';
  if (t === undefined || t === null) throw new WireError(`${what}: missing tensor`);
  const dtype = wireDtypeOf(t.dtype);
  if (dtype === undefined) throw new WireError(`${what}: unknown dtype ${String(t.dtype)}, expected one of f32, bf16, i32, u8`);
  const numel = checkShape(t.shape, opts.maxNumel ?? DEFAULT_MAX_NUMEL, what);
  const data = t.data;
  if (!(data instanceof Uint8Array)) throw new WireError(`${what}: data is not bytes`);
  const expected = numel * DTYPE_INFO[dtype].size;
  if (data.byteLength !== expected) {
    throw new WireError(`${what}: ${dtype} [${t.shape.join(', ')}] needs ${expected} bytes of data, got ${data.byteLength}`);
  }
  return fromBytes(dtype, [...t.shape], numel, data);
}

function fromBytes(dtype: WireDtype, shape: number[], numel: number, bytes: Uint8Array): HostTensor {
  switch (dtype) {
    case 'f32': { const a = new Float32Array(numel); new Uint8Array(a.buffer).set(bytes); return { dtype, shape, data: a }; }
    case 'bf16': { const a = new Uint16Array(numel); new Uint8Array(a.buffer).set(bytes); return { dtype, shape, data: a }; }
    case 'i32': { const a = new Int32Array(numel); new Uint8Array(a.buffer).set(bytes); return { dtype, shape, data: a }; }
    case 'u8': return { dtype, shape, data: Uint8Array.from(bytes) };
  }
}

/** Typed view over a fresh, exclusively owned byte array that starts at offset 0 (so it is aligned). */
function viewBytes(dtype: WireDtype, shape: number[], numel: number, bytes: Uint8Array): HostTensor {
  switch (dtype) {
    case 'f32': return { dtype, shape, data: new Float32Array(bytes.buffer, 0, numel) };
    case 'bf16': return { dtype, shape, data: new Uint16Array(bytes.buffer, 0, numel) };
    case 'i32': return { dtype, shape, data: new Int32Array(bytes.buffer, 0, numel) };
    case 'u8': return { dtype, shape, data: bytes };
  }
}

/** A decoded tensor as float32: f32 as is, bf16 widened exactly; other dtypes are an error. */
export function hostToF32(t: HostTensor, what = 'tensor'): Float32Array {
  if (t.dtype === 'f32') return t.data;
  if (t.dtype === 'bf16') return bf16ToF32(t.data);
  throw new WireError(`${what}: expected a float tensor (f32 or bf16), got ${t.dtype} [${t.shape.join(', ')}]`);
}

/** Decodes and checks dtype (and shape, when given) in one go; `-1` in `expectShape` matches any size. */
export function decodeTensorAs<D extends WireDtype>(
  t: Tensor | undefined, dtype: D, expectShape?: readonly number[], opts: DecodeOptions = {},
): Extract<HostTensor, { dtype: D }> {
  const h = decodeTensor(t, opts);
  const what = opts.what ?? 'tensor';
  if (h.dtype !== dtype) throw new WireError(`${what}: expected dtype ${dtype}, got ${h.dtype}`);
  if (expectShape && (expectShape.length !== h.shape.length || expectShape.some((d, i) => d !== -1 && d !== h.shape[i]))) {
    throw new WireError(`${what}: expected shape [${expectShape.join(', ')}], got [${h.shape.join(', ')}]`);
  }
  return h as Extract<HostTensor, { dtype: D }>;
}

// ---------------------------------------------------------------------------------------------------
// CRC-32 (IEEE, as zlib): zlib.crc32 where Node has it (≥ 20.15), else a table-driven fallback.

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32Fallback(bytes: Uint8Array, crc = 0): number {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const zlibCrc32 = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

/** CRC-32 of `bytes`, continuing from `crc` (0 to start). */
export function crc32(bytes: Uint8Array, crc = 0): number {
  return zlibCrc32 ? zlibCrc32(bytes, crc) >>> 0 : crc32Fallback(bytes, crc);
}
/** The pure-JS path, exported so tests can check both agree. */
export const crc32Js = crc32Fallback;

// ---------------------------------------------------------------------------------------------------
// Chunking

/** The fields ActivationChunk and GradientChunk share (the generated types are structurally this). */
export interface TensorChunk {
  jobId: string;
  step: number;
  microBatch: number;
  chunkIndex: number;
  numChunks: number;
  tensor?: Tensor | undefined;
  crc32: number;
}

export interface ChunkIds {
  jobId: string;
  step: number;
  microBatch: number;
}

/**
 * Splits a proto Tensor into chunks whose ENCODED size (ids, dtype, shape, data slice, framing) is at
 * most `limitBytes`. Every chunk repeats the whole tensor's dtype, shape and CRC; data slices share the
 * tensor's memory. A tensor with no elements still travels as one (empty) chunk.
 */
export function chunkTensor(ids: ChunkIds, tensor: Tensor, limitBytes = DEFAULT_CHUNK_BYTES, precomputedCrc?: number): TensorChunk[] {
  const data = tensor.data;
  // `precomputedCrc`: crc32(tensor.data), computed where the bytes were made (e.g. the compute thread), so the
  // sending thread does not pass over the whole tensor once more.
  const crc = precomputedCrc ?? crc32(data);
  // Framing: encode a chunk with empty data and the largest index values, then allow 10 bytes for the
  // data field's length varint. What is left of the limit is the data budget per chunk.
  const empty = Buffer.alloc(0);
  const framing = ActivationChunk.encode({
    ...ids, chunkIndex: 0xffffffff, numChunks: 0xffffffff, crc32: 0xffffffff,
    tensor: { dtype: tensor.dtype, shape: tensor.shape, data: empty },
  }).finish().length + 10;
  const budget = limitBytes - framing;
  if (budget < 1) throw new WireError(`chunk limit ${limitBytes} bytes is below the ${framing} bytes of framing one chunk needs`);
  const numChunks = Math.max(1, Math.ceil(data.byteLength / budget));
  const chunks: TensorChunk[] = [];
  for (let i = 0; i < numChunks; i++) {
    chunks.push({
      ...ids, chunkIndex: i, numChunks, crc32: crc,
      tensor: { dtype: tensor.dtype, shape: tensor.shape, data: data.subarray(i * budget, Math.min(data.byteLength, (i + 1) * budget)) },
    });
  }
  return chunks;
}

/** Decodes one serialized chunk; protobuf decoding failures (truncated varints, bad tags…) become WireErrors. */
export function decodeChunk(bytes: Uint8Array): TensorChunk {
  try {
    return ActivationChunk.decode(bytes);
  } catch (err) {
    throw new WireError(`malformed chunk message (${bytes.byteLength} bytes): ${(err as Error).message}`, { cause: err });
  }
}

/** Why a chunk stream was rejected (transports map these to status codes). */
export type ChunkErrorReason = 'malformed' | 'foreign-job' | 'stale' | 'duplicate' | 'out-of-order' | 'oversized' | 'corrupt' | 'incomplete';

/** A rejected chunk or chunk stream; `reason` classifies it, the message says what and where. */
export class ChunkError extends WireError {
  readonly reason: ChunkErrorReason;
  constructor(reason: ChunkErrorReason, message: string, opts: { hint?: string; cause?: unknown } = {}) {
    super(message, opts);
    this.reason = reason;
  }
}

export interface AssemblerOptions {
  /** The receiver's job; chunks of any other job are rejected. */
  jobId: string;
  /** Names the stream in errors, e.g. "Forward". */
  what?: string;
  /** Steps below this are stale (an earlier step's retry or a late duplicate). */
  minStep?: number;
  /** When set, the stream must carry exactly this step and micro-batch. */
  expect?: { step: number; microBatch: number };
  maxNumel?: number;
  maxChunks?: number;
  /** Upper bound on the tensor's data bytes (default maxNumel × 4). */
  maxBytes?: number;
  /** Where the output array comes from (default: a new one); e.g. a pool of arrays the stage has given back. */
  alloc?: (bytes: number) => Uint8Array;
}

/**
 * Reassembles one tensor from its chunks, in order. `push` returns the tensor after the last chunk and
 * undefined before; `finish` (at end of stream) throws if chunks are missing. The first chunk fixes
 * step, micro-batch, dtype, shape, chunk count and CRC; every later chunk must repeat them. The output
 * buffer is allocated only after the first chunk has been validated against the limits.
 */
export class ChunkAssembler {
  private readonly opts: AssemblerOptions;
  private first?: { step: number; microBatch: number; numChunks: number; dtype: WireDtype; protoDtype: Dtype; shape: number[]; numel: number; total: number; crc: number };
  private buf?: Uint8Array;
  private received = 0;
  private nextIndex = 0;
  /** CRC-32 of the bytes so far, chunk by chunk: no pass over the whole tensor at the end. */
  private crcSoFar = 0;
  private result?: HostTensor;

  constructor(opts: AssemblerOptions) {
    this.opts = opts;
  }

  /** True once the whole tensor has arrived and passed its checksum. */
  get complete(): boolean {
    return this.result !== undefined;
  }

  /** Step and micro-batch of the stream, known after the first chunk. */
  get ids(): { step: number; microBatch: number } | undefined {
    return this.first && { step: this.first.step, microBatch: this.first.microBatch };
  }

  push(c: TensorChunk): HostTensor | undefined {
    const what = this.opts.what ?? 'tensor stream';
    if (c === null || typeof c !== 'object') throw new ChunkError('malformed', `${what}: chunk is not a message`);
    if (c.jobId !== this.opts.jobId) {
      throw new ChunkError('foreign-job', `${what}: chunk belongs to job "${String(c.jobId)}", this worker serves job "${this.opts.jobId}"`, {
        hint: 'a worker of another job (or an old run) is sending to this address',
      });
    }
    const at = `${what} step ${String(c.step)} micro-batch ${String(c.microBatch)} chunk ${String(c.chunkIndex)}/${String(c.numChunks)}`;
    if (this.result !== undefined) throw new ChunkError('duplicate', `${at}: too many chunks, the tensor was already complete`);
    if (!this.first) this.start(c, at);
    const f = this.first!;
    if (c.step !== f.step || c.microBatch !== f.microBatch) {
      throw new ChunkError('stale', `${at}: chunk of step ${String(c.step)} micro-batch ${String(c.microBatch)} inside the stream of step ${f.step} micro-batch ${f.microBatch} (stale or misrouted)`);
    }
    if (c.numChunks !== f.numChunks) throw new ChunkError('malformed', `${at}: chunk count changed from ${f.numChunks} to ${String(c.numChunks)} mid-stream`);
    if (!Number.isInteger(c.chunkIndex) || c.chunkIndex < 0) throw new ChunkError('malformed', `${at}: invalid chunk index`);
    if (c.chunkIndex >= f.numChunks) throw new ChunkError('malformed', `${at}: too many chunks, index ${c.chunkIndex} ≥ count ${f.numChunks}`);
    if (c.chunkIndex < this.nextIndex) throw new ChunkError('duplicate', `${at}: duplicate chunk ${c.chunkIndex} (already received 0..${this.nextIndex - 1})`);
    if (c.chunkIndex > this.nextIndex) throw new ChunkError('out-of-order', `${at}: out-of-order chunk, expected index ${this.nextIndex}`);
    if (c.crc32 !== f.crc) throw new ChunkError('malformed', `${at}: checksum field changed mid-stream`);
    const t = c.tensor;
    if (!t || t.dtype !== f.protoDtype || !sameShape(t.shape, f.shape)) {
      throw new ChunkError('malformed', `${at}: dtype/shape differ from the first chunk's ${f.dtype} [${f.shape.join(', ')}]`);
    }
    if (!(t.data instanceof Uint8Array)) throw new ChunkError('malformed', `${at}: data is not bytes`);
    if (this.received + t.data.byteLength > f.total) {
      throw new ChunkError('oversized', `${at}: size overflow, chunks carry more than the ${f.total} bytes of ${f.dtype} [${f.shape.join(', ')}]`);
    }
    this.buf!.set(t.data, this.received);
    this.crcSoFar = crc32(t.data, this.crcSoFar);
    this.received += t.data.byteLength;
    this.nextIndex++;
    if (this.nextIndex < f.numChunks) return undefined;
    if (this.received !== f.total) {
      throw new ChunkError('corrupt', `${at}: truncated tensor, ${this.received} of ${f.total} bytes after the last chunk`);
    }
    const crc = this.crcSoFar;
    if (crc !== f.crc) {
      throw new ChunkError('corrupt', `${at}: checksum mismatch (crc32 ${hex(crc)} received, ${hex(f.crc)} sent): data corrupted in transit`);
    }
    this.result = viewBytes(f.dtype, f.shape, f.numel, this.buf!); // buf is ours and aligned: no second copy
    this.buf = undefined;
    return this.result;
  }

  /** Call at end of stream: returns the tensor, or throws if it is incomplete (or nothing arrived). */
  finish(): HostTensor {
    const what = this.opts.what ?? 'tensor stream';
    if (this.result) return this.result;
    if (!this.first) throw new ChunkError('incomplete', `${what}: stream ended before any chunk arrived`);
    throw new ChunkError('incomplete', `${what} step ${this.first.step} micro-batch ${this.first.microBatch}: stream ended after ${this.nextIndex} of ${this.first.numChunks} chunks`);
  }

  private start(c: TensorChunk, at: string): void {
    const o = this.opts;
    if (!Number.isSafeInteger(c.step) || c.step < 0) throw new ChunkError('malformed', `${at}: invalid step`);
    if (!Number.isInteger(c.microBatch) || c.microBatch < 0) throw new ChunkError('malformed', `${at}: invalid micro-batch`);
    if (o.minStep !== undefined && c.step < o.minStep) {
      throw new ChunkError('stale', `${at}: stale step ${c.step}, this stage is at step ${o.minStep}`, { hint: 'a late retry or duplicate from an earlier step; it is dropped' });
    }
    if (o.expect && (c.step !== o.expect.step || c.microBatch !== o.expect.microBatch)) {
      throw new ChunkError('stale', `${at}: expected step ${o.expect.step} micro-batch ${o.expect.microBatch}`);
    }
    const maxChunks = o.maxChunks ?? DEFAULT_MAX_CHUNKS;
    if (!Number.isInteger(c.numChunks) || c.numChunks < 1 || c.numChunks > maxChunks) {
      throw new ChunkError('malformed', `${at}: chunk count ${String(c.numChunks)} outside 1..${maxChunks}`);
    }
    if (c.chunkIndex !== 0) throw new ChunkError('out-of-order', `${at}: stream must start at chunk 0 (out of order or a lost first chunk)`);
    const t = c.tensor;
    if (!t) throw new ChunkError('malformed', `${at}: missing tensor`);
    const dtype = wireDtypeOf(t.dtype);
    if (dtype === undefined) throw new ChunkError('malformed', `${at}: unknown dtype ${String(t.dtype)}, expected one of f32, bf16, i32, u8`);
    const maxNumel = o.maxNumel ?? DEFAULT_MAX_NUMEL;
    const numel = checkShape(t.shape, maxNumel, at, (kind, m, hint) => new ChunkError(kind, m, { hint }));
    const total = numel * DTYPE_INFO[dtype].size;
    const maxBytes = o.maxBytes ?? maxNumel * 4;
    if (total > maxBytes) throw new ChunkError('oversized', `${at}: ${dtype} [${t.shape.join(', ')}] is ${total} bytes, over the ${maxBytes}-byte limit`);
    if (c.numChunks > Math.max(1, total)) throw new ChunkError('malformed', `${at}: ${c.numChunks} chunks for ${total} bytes (chunks may not be empty)`);
    if (!Number.isInteger(c.crc32) || c.crc32 < 0 || c.crc32 > 0xffffffff) throw new ChunkError('malformed', `${at}: invalid crc32`);
    this.first = { step: c.step, microBatch: c.microBatch, numChunks: c.numChunks, dtype, protoDtype: t.dtype, shape: [...t.shape], numel, total, crc: c.crc32 };
    this.buf = this.opts.alloc ? this.opts.alloc(total) : new Uint8Array(total);
    if (this.buf.byteLength !== total) throw new WireError(`${at}: the receive buffer has ${this.buf.byteLength} bytes, the tensor needs ${total}`);
  }
}

function sameShape(a: readonly number[] | undefined, b: readonly number[]): boolean {
  return Array.isArray(a) && a.length === b.length && a.every((d, i) => d === b[i]);
}

function hex(n: number): string {
  return '0x' + (n >>> 0).toString(16).padStart(8, '0');
}
