// wire/tensor.ts: proto tensors ⇄ typed arrays, chunking under a message limit, validated reassembly, and
// a fuzz test that feeds mutated chunk streams and random bytes and accepts only the original tensor or
// a WireError.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WireError } from '../../common/errors.ts';
import {
  ChunkAssembler, ChunkError, chunkTensor, crc32, crc32Js, decodeChunk, decodeTensor, decodeTensorAs, encodeTensor,
  f32ToBf16Tensor, f32ToTensor, hostToF32, i32ToTensor, u8ToTensor, bf16ToTensor, type HostTensor, type TensorChunk,
} from '../../wire/tensor.ts';
import { Dtype, Tensor } from '../../proto/gen/dqlora/v1/tensor.ts';
import { ActivationChunk } from '../../proto/gen/dqlora/v1/pipeline.ts';
import { Philox } from '../helpers/prng.ts';

/** Proto round trip: encode to bytes and decode, as the wire does. */
function viaBytes(t: Tensor): Tensor {
  return Tensor.decode(Tensor.encode(t).finish());
}

test('every dtype survives encode → protobuf bytes → decode with the same values and shape', () => {
  const f = new Float32Array([1.5, -0, Infinity, -3.25e-30, NaN, 7]);
  const df = decodeTensorAs(viaBytes(f32ToTensor(f, [2, 3])), 'f32', [2, 3]);
  assert.deepEqual(Array.from(new Uint32Array(df.data.buffer)), Array.from(new Uint32Array(f.buffer)));
  const i = new Int32Array([-100, 0, 2147483647, -2147483648]);
  assert.deepEqual(decodeTensorAs(viaBytes(i32ToTensor(i, [4])), 'i32').data, i);
  const u = new Uint8Array([0, 1, 255]);
  assert.deepEqual(decodeTensorAs(viaBytes(u8ToTensor(u, [1, 3])), 'u8', [-1, 3]).data, u);
  const bits = new Uint16Array([0x3f80, 0xc000, 0x7fc0]); // 1, -2, NaN
  const db = decodeTensor(viaBytes(bf16ToTensor(bits, [3])));
  assert.equal(db.dtype, 'bf16');
  assert.deepEqual(Array.from(hostToF32(db)).slice(0, 2), [1, -2]);
  // f32 → bf16 on the wire rounds to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 → 1.
  const rounded = hostToF32(decodeTensor(viaBytes(f32ToBf16Tensor(new Float32Array([1 + 2 ** -8, 3]), [2]))));
  assert.deepEqual(Array.from(rounded), [1, 3]);
  // A scalar has shape [] and one element; an empty tensor has none.
  assert.deepEqual(decodeTensorAs(viaBytes(f32ToTensor(new Float32Array([4]), [])), 'f32').data, new Float32Array([4]));
  assert.equal(decodeTensor(viaBytes(f32ToTensor(new Float32Array(0), [0, 5]))).data.length, 0);
});

test('decoding copies into aligned memory even when the bytes start at an odd offset', () => {
  const raw = Buffer.alloc(13);
  const f = new Float32Array([1, 2, 3]);
  Buffer.from(f.buffer).copy(raw, 1);
  const d = decodeTensorAs({ dtype: Dtype.DTYPE_F32, shape: [3], data: raw.subarray(1) }, 'f32');
  assert.deepEqual(Array.from(d.data), [1, 2, 3]);
});

test('invalid tensors are WireErrors that say what is wrong', () => {
  const cases: [Tensor | undefined, RegExp][] = [
    [undefined, /missing tensor/],
    [{ dtype: 99 as Dtype, shape: [1], data: Buffer.alloc(4) }, /unknown dtype 99/],
    [{ dtype: Dtype.DTYPE_UNSPECIFIED, shape: [1], data: Buffer.alloc(4) }, /unknown dtype 0/],
    [{ dtype: Dtype.DTYPE_F32, shape: [-1], data: Buffer.alloc(4) }, /dimension -1/],
    [{ dtype: Dtype.DTYPE_F32, shape: [1.5], data: Buffer.alloc(4) }, /dimension 1.5/],
    [{ dtype: Dtype.DTYPE_F32, shape: [2, 3], data: Buffer.alloc(20) }, /needs 24 bytes of data, got 20/],
    [{ dtype: Dtype.DTYPE_F32, shape: [2 ** 40, 2 ** 40], data: Buffer.alloc(0) }, /more than 268435456 elements/],
    [{ dtype: Dtype.DTYPE_U8, shape: [1, 1, 1, 1, 1, 1, 1, 1, 1], data: Buffer.alloc(1) }, /at most 8/],
  ];
  for (const [t, re] of cases) assert.throws(() => decodeTensor(t, { what: 'forward step 3' }), (e: unknown) => e instanceof WireError && re.test(e.message) && /forward step 3/.test(e.message));
  assert.throws(() => decodeTensor({ dtype: Dtype.DTYPE_F32, shape: [10], data: Buffer.alloc(40) }, { maxNumel: 9 }), /more than 9 elements/);
  assert.throws(() => decodeTensorAs(i32ToTensor(new Int32Array(2), [2]), 'f32'), /expected dtype f32, got i32/);
  assert.throws(() => decodeTensorAs(i32ToTensor(new Int32Array(2), [2]), 'i32', [3]), /expected shape \[3\], got \[2\]/);
  assert.throws(() => f32ToTensor(new Float32Array(5), [2, 3]), WireError);
});

test('crc32 matches the standard check value and the JS fallback agrees with zlib', () => {
  const check = new TextEncoder().encode('123456789');
  assert.equal(crc32(check), 0xcbf43926);
  assert.equal(crc32Js(check), 0xcbf43926);
  const rng = new Philox(7);
  const big = rng.bytes(100_003);
  assert.equal(crc32(big), crc32Js(big));
  assert.equal(crc32(big.subarray(5000), crc32(big.subarray(0, 5000))), crc32(big));
});

const ids = { jobId: 'job-a', step: 5, microBatch: 2 };

function chunksOf(nfloats: number, limit: number, seed = 1): { src: Float32Array; chunks: TensorChunk[] } {
  const rng = new Philox(seed);
  const src = new Float32Array(nfloats);
  for (let i = 0; i < nfloats; i++) src[i] = rng.normal();
  return { src, chunks: chunkTensor(ids, f32ToTensor(src, [nfloats]), limit) };
}

test('chunking keeps every encoded message under the limit and reassembles the exact tensor', () => {
  for (const [n, limit] of [[0, 300], [1, 300], [1000, 300], [25_000, 4096], [262_144 + 7, 1 << 20]] as const) {
    const { src, chunks } = chunksOf(n, limit);
    for (const c of chunks) assert.ok(ActivationChunk.encode(c).finish().length <= limit, `chunk over the ${limit}-byte limit`);
    if (n * 4 > limit) assert.ok(chunks.length > 1);
    const a = new ChunkAssembler({ jobId: 'job-a' });
    let out: HostTensor | undefined;
    for (const c of chunks) {
      assert.equal(a.complete, false);
      out = a.push(ActivationChunk.decode(ActivationChunk.encode(c).finish()));
    }
    assert.ok(out && a.complete);
    assert.deepEqual(a.finish(), out);
    assert.deepEqual(out.shape, [n]);
    assert.deepEqual(out.data, src);
  }
  assert.throws(() => chunkTensor(ids, f32ToTensor(new Float32Array(4), [4]), 20), /below the \d+ bytes of framing/);
});

test('the assembler rejects duplicate, out-of-order, stale, foreign, oversized and corrupt chunks', () => {
  const { chunks } = chunksOf(1000, 600);
  assert.ok(chunks.length >= 4);
  const feed = (cs: TensorChunk[], opts: Partial<ConstructorParameters<typeof ChunkAssembler>[0]> = {}): void => {
    const a = new ChunkAssembler({ jobId: 'job-a', what: 'Forward', ...opts });
    for (const c of cs) a.push(c);
    a.finish();
  };
  const rejects = (cs: TensorChunk[], re: RegExp, opts = {}): void => {
    assert.throws(() => feed(cs, opts), (e: unknown) => e instanceof WireError && re.test(e.message), `expected ${re}`);
  };
  const [c0, c1, c2] = chunks;
  feed(chunks); // the unmodified stream is fine
  rejects([c0, c1, c1, ...chunks.slice(2)], /duplicate chunk 1/);
  rejects([c0, c2], /out-of-order chunk, expected index 1/);
  rejects([c1], /must start at chunk 0/);
  rejects(chunks, /stale step 5, this stage is at step 6/, { minStep: 6 });
  rejects(chunks, /expected step 5 micro-batch 3/, { expect: { step: 5, microBatch: 3 } });
  rejects([c0, { ...c1, step: 4 }], /chunk of step 4 micro-batch 2 inside the stream of step 5/);
  rejects([c0, { ...c1, microBatch: 9 }], /stale or misrouted/);
  rejects([{ ...c0, jobId: 'job-b' }], /belongs to job "job-b"/);
  rejects([...chunks, { ...c0, chunkIndex: chunks.length }], /too many chunks/);
  rejects([c0, { ...c1, chunkIndex: 99 }], /too many chunks, index 99/);
  rejects(chunks.slice(0, -1), /stream ended after \d+ of \d+ chunks/);
  rejects([], /ended before any chunk/);
  rejects(chunks, /over the 100-byte limit/, { maxBytes: 100 });
  rejects(chunks, /outside 1\.\.2/, { maxChunks: 2 });
  rejects([c0, { ...c1, numChunks: 99 }], /chunk count changed/);
  rejects([c0, { ...c1, crc32: (c1.crc32 + 1) >>> 0 }], /checksum field changed/);
  rejects([c0, { ...c1, tensor: { ...c1.tensor!, shape: [999] } }], /dtype\/shape differ/);
  // One flipped bit in the data is caught by the checksum.
  const flipped = Buffer.from(c2.tensor!.data);
  flipped[3] ^= 0x10;
  rejects([c0, c1, { ...c2, tensor: { ...c2.tensor!, data: flipped } }, ...chunks.slice(3)], /checksum mismatch/);
  // A sender's precomputed checksum (computed off the sending thread) is what chunkTensor would compute; a wrong
  // one is caught at the receiver exactly like corruption.
  const t = f32ToTensor(Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i)), [1000]);
  assert.deepEqual(chunkTensor(ids, t, 600, crc32(t.data)), chunkTensor(ids, t, 600));
  rejects(chunkTensor(ids, t, 600, (crc32(t.data) ^ 1) >>> 0), /checksum mismatch/);
  // A chunk carrying more data than the shape allows overflows the buffer bound.
  const fat = Buffer.concat([c0.tensor!.data, Buffer.alloc(8)]);
  const one = chunkTensor(ids, f32ToTensor(new Float32Array(4), [4]), 1 << 20);
  rejects([{ ...one[0], tensor: { ...one[0].tensor!, data: fat.subarray(0, 24) } }], /size overflow/);
  rejects([{ ...one[0], tensor: { ...one[0].tensor!, data: Buffer.alloc(12) } }], /truncated tensor, 12 of 16 bytes/);
});

test('every rejection carries a reason transports map to status codes', () => {
  const { chunks } = chunksOf(1000, 600);
  const reason = (cs: TensorChunk[], opts = {}): string => {
    try {
      const a = new ChunkAssembler({ jobId: 'job-a', ...opts });
      for (const c of cs) a.push(c);
      a.finish();
    } catch (e) {
      assert.ok(e instanceof ChunkError && e instanceof WireError);
      return e.reason;
    }
    return 'accepted';
  };
  const flipped = Buffer.from(chunks[1].tensor!.data);
  flipped[0] ^= 4;
  assert.deepEqual([
    reason(chunks),
    reason([chunks[0], chunks[0]]),
    reason([chunks[0], chunks[2]]),
    reason(chunks, { minStep: 9 }),
    reason([{ ...chunks[0], jobId: 'x' }]),
    reason(chunks, { maxNumel: 999 }),
    reason([chunks[0], { ...chunks[1], tensor: { ...chunks[1].tensor!, data: flipped } }, ...chunks.slice(2)]),
    reason(chunks.slice(0, 1)),
    reason([{ ...chunks[0], tensor: { ...chunks[0].tensor!, shape: [-3] } }]),
  ], ['accepted', 'duplicate', 'out-of-order', 'stale', 'foreign-job', 'oversized', 'corrupt', 'incomplete', 'malformed']);
});

test('fuzz: mutated chunk streams give the original tensor or a WireError, never anything else', () => {
  const rng = new Philox(2024);
  const base = chunksOf(300, 400, 3);
  const srcBytes = Buffer.from(base.src.buffer);
  let accepted = 0, rejected = 0;
  for (let iter = 0; iter < 3000; iter++) {
    let cs: TensorChunk[] = base.chunks.map((c) => ({ ...c, tensor: { ...c.tensor!, shape: [...c.tensor!.shape], data: Buffer.from(c.tensor!.data) } }));
    const nMut = 1 + rng.int(3);
    for (let m = 0; m < nMut; m++) cs = mutate(cs, rng);
    const a = new ChunkAssembler({ jobId: 'job-a', maxNumel: 1 << 16, maxChunks: 64 });
    try {
      let out: HostTensor | undefined;
      for (const c of cs) out = a.push(c);
      out = a.finish();
      // Accepted: must be exactly the original tensor (a mutation that changed nothing, e.g. the same value).
      assert.equal(out.dtype, 'f32');
      assert.deepEqual(out.shape, [300]);
      assert.ok(Buffer.from(out.data.buffer).equals(srcBytes), 'accepted a stream with different data');
      accepted++;
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      rejected++;
    }
  }
  assert.ok(rejected > 2500, `only ${rejected} rejections`);
  // Random bytes through the protobuf decoder: a WireError or a message the assembler then judges.
  for (let iter = 0; iter < 3000; iter++) {
    const bytes = iter % 2 ? rng.bytes(rng.int(200)) : mutateBytes(Buffer.from(ActivationChunk.encode(base.chunks[0]).finish()), rng);
    try {
      const c = decodeChunk(bytes);
      new ChunkAssembler({ jobId: 'job-a', maxNumel: 1 << 16 }).push(c);
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
    }
  }
  assert.ok(accepted >= 0);
});

function mutate(cs: TensorChunk[], rng: Philox): TensorChunk[] {
  if (cs.length === 0) return cs;
  const i = cs.length ? rng.int(cs.length) : 0;
  const c = cs[i];
  const out = [...cs];
  const t = c.tensor ?? { dtype: Dtype.DTYPE_F32, shape: [], data: Buffer.alloc(0) };
  const pick = <T>(xs: T[]): T => xs[rng.int(xs.length)];
  const weird = (): number => pick([0, 1, -1, 2, 255, 2 ** 31, 2 ** 32, 2 ** 53, 0.5, NaN, rng.int(10)]);
  switch (rng.int(14)) {
    case 0: out.splice(i, 1); break; // drop
    case 1: out.splice(i, 0, c); break; // duplicate
    case 2: { const j = rng.int(cs.length); [out[i], out[j]] = [out[j], out[i]]; break; } // swap
    case 3: out[i] = { ...c, step: weird() }; break;
    case 4: out[i] = { ...c, microBatch: weird() }; break;
    case 5: out[i] = { ...c, chunkIndex: weird() }; break;
    case 6: out[i] = { ...c, numChunks: weird() }; break;
    case 7: out[i] = { ...c, crc32: weird() }; break;
    case 8: out[i] = { ...c, tensor: { ...t, dtype: weird() as Dtype } }; break;
    case 9: out[i] = { ...c, tensor: { ...t, shape: [weird(), weird()].slice(0, 1 + rng.int(2)) } }; break;
    case 10: { const d = Buffer.from(t.data); if (d.length) d[rng.int(d.length)] ^= 1 << rng.int(8); out[i] = { ...c, tensor: { ...t, data: d } }; break; }
    case 11: out[i] = { ...c, tensor: { ...t, data: t.data.subarray(0, rng.int(t.data.length + 1)) } }; break;
    case 12: out[i] = { ...c, tensor: undefined }; break;
    case 13: out.length = rng.int(out.length + 1); break; // truncate the stream
  }
  return out.filter((x) => x !== undefined);
}

function mutateBytes(b: Buffer, rng: Philox): Buffer {
  const n = 1 + rng.int(4);
  for (let k = 0; k < n && b.length; k++) b[rng.int(b.length)] = rng.int(256);
  return rng.int(2) ? b.subarray(0, rng.int(b.length + 1)) : b;
}
