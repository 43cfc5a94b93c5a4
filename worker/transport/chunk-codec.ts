// The protobuf encoding of one pipeline chunk (ActivationChunk / GradientChunk: the same fields), written and read
// by hand for the hot path of worker/transport/pipeline.ts. What it saves, per chunk of up to a few MiB:
//   send:    the generated encoder copies the data into a growing writer buffer, then `Buffer.from` copies the
//            result again; here the message is laid out in one exact-size Buffer (the data copied once).
//   receive: the data field is returned as a view of the received message (no copy); ChunkAssembler copies it
//            once, into the tensor's final array.
// The bytes are exactly the generated encoder's (field order, proto3 defaults omitted; test/distributed/
// pipeline-transport.test.ts checks it). Anything the fast reader does not expect — other field order, unknown
// fields, unpacked shapes, negative or huge numbers, truncation — goes to the generated decoder (wire/tensor.ts
// decodeChunk), so malformed input is judged and reported exactly as before.
import { decodeChunk, type TensorChunk } from '../../wire/tensor.ts';
import { ActivationChunk } from '../../proto/gen/dqlora/v1/pipeline.ts';
import type { Dtype, Tensor } from '../../proto/gen/dqlora/v1/tensor.ts';

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

function varintLen(v: number): number {
  let n = 1;
  while (v >= 128) { v = Math.floor(v / 128); n++; }
  return n;
}

function putVarint(b: Buffer, pos: number, v: number): number {
  while (v >= 128) {
    b[pos++] = (v % 128) | 128;
    v = Math.floor(v / 128);
  }
  b[pos++] = v;
  return pos;
}

const isU = (v: unknown, max: number): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max;

/** Serialises a chunk (the gRPC requestSerialize of the pipeline calls). */
export function encodeChunkFast(c: TensorChunk): Buffer {
  const t = c.tensor;
  // Values the hand-written path does not cover (negative int64s, oversized uint32s) take the generated one.
  if (!isU(c.step, MAX_SAFE) || !isU(c.microBatch, 0xffffffff) || !isU(c.chunkIndex, 0xffffffff) || !isU(c.numChunks, 0xffffffff)
    || !isU(c.crc32, 0xffffffff) || (t && (!isU(t.dtype, 0x7fffffff) || !t.shape.every((d) => isU(d, MAX_SAFE))))) {
    return Buffer.from(ActivationChunk.encode(c).finish());
  }
  const job = Buffer.from(c.jobId, 'utf8');
  let tensorLen = 0, shapeLen = 0;
  if (t) {
    if (t.dtype !== 0) tensorLen += 1 + varintLen(t.dtype);
    for (const d of t.shape) shapeLen += varintLen(d);
    if (t.shape.length) tensorLen += 1 + varintLen(shapeLen) + shapeLen;
    if (t.data.length) tensorLen += 1 + varintLen(t.data.length) + t.data.length;
  }
  let len = 0;
  if (job.length) len += 1 + varintLen(job.length) + job.length;
  if (c.step) len += 1 + varintLen(c.step);
  if (c.microBatch) len += 1 + varintLen(c.microBatch);
  if (c.chunkIndex) len += 1 + varintLen(c.chunkIndex);
  if (c.numChunks) len += 1 + varintLen(c.numChunks);
  if (t) len += 1 + varintLen(tensorLen) + tensorLen;
  if (c.crc32) len += 1 + varintLen(c.crc32);
  const b = Buffer.allocUnsafe(len);
  let p = 0;
  if (job.length) { b[p++] = 10; p = putVarint(b, p, job.length); p += job.copy(b, p); }
  if (c.step) { b[p++] = 16; p = putVarint(b, p, c.step); }
  if (c.microBatch) { b[p++] = 24; p = putVarint(b, p, c.microBatch); }
  if (c.chunkIndex) { b[p++] = 32; p = putVarint(b, p, c.chunkIndex); }
  if (c.numChunks) { b[p++] = 40; p = putVarint(b, p, c.numChunks); }
  if (t) {
    b[p++] = 50; p = putVarint(b, p, tensorLen);
    if (t.dtype !== 0) { b[p++] = 8; p = putVarint(b, p, t.dtype); }
    if (t.shape.length) { b[p++] = 18; p = putVarint(b, p, shapeLen); for (const d of t.shape) p = putVarint(b, p, d); }
    if (t.data.length) { b[p++] = 26; p = putVarint(b, p, t.data.length); b.set(t.data, p); p += t.data.length; }
  }
  if (c.crc32) { b[p++] = 56; p = putVarint(b, p, c.crc32); }
  return b;
}

/** Thrown inside the fast reader to hand the message to the generated decoder. */
const FALLBACK = Symbol('fallback');

/** Parses a chunk message; the tensor data is a view into `buf` (no copy). */
export function decodeChunkFast(buf: Uint8Array): TensorChunk {
  try {
    return readChunk(buf);
  } catch (e) {
    if (e === FALLBACK) return decodeChunk(buf);
    throw e;
  }
}

function readChunk(buf: Uint8Array): TensorChunk {
  let p = 0;
  const varint = (end: number): number => {
    let v = 0, mul = 1;
    for (let i = 0; i < 8; i++) {
      if (p >= end) throw FALLBACK;
      const byte = buf[p++];
      v += (byte & 127) * mul;
      if (byte < 128) {
        if (v > MAX_SAFE) throw FALLBACK;
        return v;
      }
      mul *= 128;
    }
    throw FALLBACK; // ≥ 2^56: not a value this protocol uses
  };
  const c: TensorChunk = { jobId: '', step: 0, microBatch: 0, chunkIndex: 0, numChunks: 0, tensor: undefined, crc32: 0 };
  let last = 0;
  while (p < buf.length) {
    const tag = varint(buf.length);
    const field = tag >>> 3;
    // Canonical order only (each field once, ascending): anything else is the generated decoder's business.
    if (field <= last) throw FALLBACK;
    last = field;
    switch (tag) {
      case 10: { const n = varint(buf.length); if (p + n > buf.length) throw FALLBACK; c.jobId = Buffer.from(buf.buffer, buf.byteOffset + p, n).toString('utf8'); p += n; break; }
      case 16: c.step = varint(buf.length); break;
      case 24: c.microBatch = u32(varint(buf.length)); break;
      case 32: c.chunkIndex = u32(varint(buf.length)); break;
      case 40: c.numChunks = u32(varint(buf.length)); break;
      case 50: {
        const n = varint(buf.length);
        const end = p + n;
        if (end > buf.length) throw FALLBACK;
        const t: Tensor = { dtype: 0, shape: [], data: Buffer.alloc(0) };
        let lastT = 0;
        while (p < end) {
          const tt = varint(end);
          if ((tt >>> 3) <= lastT) throw FALLBACK;
          lastT = tt >>> 3;
          if (tt === 8) {
            const d = varint(end);
            if (d > 0x7fffffff) throw FALLBACK;
            t.dtype = d as Dtype;
          } else if (tt === 18) {
            const m = varint(end);
            const se = p + m;
            if (se > end) throw FALLBACK;
            while (p < se) t.shape.push(varint(se));
          } else if (tt === 26) {
            const m = varint(end);
            if (p + m > end) throw FALLBACK;
            t.data = Buffer.from(buf.buffer, buf.byteOffset + p, m);
            p += m;
          } else throw FALLBACK;
        }
        c.tensor = t;
        break;
      }
      case 56: c.crc32 = u32(varint(buf.length)); break;
      default: throw FALLBACK;
    }
  }
  return c;
}

function u32(v: number): number {
  if (v > 0xffffffff) throw FALLBACK;
  return v;
}
