// safetensors: byte-exact agreement with the Rust reference's own test vectors, round trips of every dtype,
// lazy reads, sharded model directories, hostile headers, and a seeded fuzz of mutated and random files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MAX_HEADER_BYTES, SafetensorsFile, writeSafetensors, writeShardedSafetensors, type StDtype, type TensorRecord } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { FormatError, ShapeError, UnsupportedError } from '../../common/errors.ts';
import { f32ToBf16, f32ToF16 } from '../../common/halfprec.ts';
import { CounterRng } from '../../common/rng.ts';

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-st-'));
}

/** A file from raw header text + data bytes (header used verbatim, length prefix computed). */
/** Writes a file anew (unlink first: truncating a file in place makes ext4 flush it on close, ~3 ms each). */
function writeFresh(p: string, bytes: Uint8Array): void {
  fs.rmSync(p, { force: true });
  fs.writeFileSync(p, bytes);
}

// Plain Uint8Array helpers (this @types/node's Buffer does not type-check as a Uint8Array under TS 5.9).
const enc = new TextEncoder();
function readBytes(p: string): Uint8Array {
  return new Uint8Array(fs.readFileSync(p));
}
function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, x) => a + x.length, 0));
  let o = 0;
  for (const x of parts) { out.set(x, o); o += x.length; }
  return out;
}
function u64le(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
}
function getU64(b: Uint8Array): number {
  return Number(new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true));
}

function rawFile(p: string, header: string | Uint8Array, data: Uint8Array = new Uint8Array(0)): void {
  const h = typeof header === 'string' ? enc.encode(header) : header;
  writeFresh(p, concat(u64le(BigInt(h.length)), h, data));
}

function f32Bytes(xs: number[]): Uint8Array {
  return new Uint8Array(Float32Array.from(xs).buffer);
}

test('writes the exact bytes of the Rust reference test vectors', () => {
  const dir = tmpdir();
  // safetensors/src/tensor.rs test_serialization: "attn.0" F32 [1,2,3] = 0..5.
  const p = path.join(dir, 'a.safetensors');
  writeSafetensors(p, [{ name: 'attn.0', dtype: 'F32', shape: [1, 2, 3], data: Float32Array.from([0, 1, 2, 3, 4, 5]) }]);
  assert.deepEqual([...readBytes(p)], [
    64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
    116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
    58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
    101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
    0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64,
  ]);
  // test_serialization_forced_alignement: a shorter name forces 7 padding spaces.
  writeSafetensors(p, [{ name: 'attn0', dtype: 'F32', shape: [1, 1, 2, 3], data: Float32Array.from([0, 1, 2, 3, 4, 5]) }]);
  assert.deepEqual([...readBytes(p)], [
    72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116,
    121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58,
    91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102,
    115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 32, 32, 32, 32, 32,
    32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0,
    160, 64,
  ]);
  // test_empty: no tensors, with and without metadata.
  writeSafetensors(p, []);
  assert.deepEqual([...readBytes(p)], [8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]);
  writeSafetensors(p, [], { framework: 'pt' });
  assert.deepEqual([...readBytes(p)], [
    40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
    95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
    116, 34, 125, 125, 32, 32, 32, 32, 32,
  ]);
  const f = SafetensorsFile.open(p);
  assert.deepEqual({ ...f.metadata }, { framework: 'pt' });
  assert.deepEqual(f.names(), []);
  f.close();
  assert.deepEqual(fs.readdirSync(dir), ['a.safetensors'], 'no temp files left behind');
});

test('round trip of every dtype: exact bytes, float32 and int32 conversions', () => {
  const dir = tmpdir();
  const p = path.join(dir, 'all.safetensors');
  const vals = [0, 1, -2.5, 3.25, 65504, -0.000061035156, 1e-3, 7];
  const i64 = new BigInt64Array([0n, 1n, -2n, 2147483647n, -2147483648n, 5n]);
  const recs: TensorRecord[] = [
    { name: 'f64', dtype: 'F64', shape: [2, 4], data: new Uint8Array(Float64Array.from(vals).buffer) },
    { name: 'f32', dtype: 'F32', shape: [8], data: Float32Array.from(vals) },
    { name: 'f16', dtype: 'F16', shape: [4, 2], data: f32ToF16(Float32Array.from(vals)) },
    { name: 'bf16', dtype: 'BF16', shape: [8, 1], data: f32ToBf16(Float32Array.from(vals)) },
    { name: 'i64', dtype: 'I64', shape: [3, 2], data: new Uint8Array(i64.buffer) },
    { name: 'i32', dtype: 'I32', shape: [3], data: Int32Array.from([-7, 0, 123456789]) },
    { name: 'i16', dtype: 'I16', shape: [3], data: new Uint16Array(Int16Array.from([-32768, 5, 32767]).buffer) },
    { name: 'i8', dtype: 'I8', shape: [3], data: new Uint8Array(Int8Array.from([-128, 0, 127]).buffer) },
    { name: 'u8', dtype: 'U8', shape: [3], data: Uint8Array.from([0, 128, 255]) },
    { name: 'bool', dtype: 'BOOL', shape: [3], data: Uint8Array.from([1, 0, 1]) },
    { name: 'scalar', dtype: 'F32', shape: [], data: Float32Array.from([42]) },
    { name: 'empty', dtype: 'BF16', shape: [0, 5], data: new Uint16Array(0) },
  ];
  writeSafetensors(p, recs, { format: 'pt' });
  const f = SafetensorsFile.open(p);
  for (const r of recs) {
    const info = f.info(r.name);
    assert.equal(info.dtype, r.dtype);
    assert.deepEqual(info.shape, [...r.shape]);
    assert.equal(info.byteLength, r.data.byteLength);
    assert.equal(info.fileOffset % 8 === 0 || info.byteLength === 0 || info.fileOffset % (r.data.BYTES_PER_ELEMENT) === 0, true);
    assert.deepEqual(f.readRaw(r.name), new Uint8Array(r.data.buffer, r.data.byteOffset, r.data.byteLength), r.name);
  }
  const close = (got: Float32Array, want: number[], tol: number) => want.forEach((w, i) => assert.ok(Math.abs(got[i] - w) <= tol * Math.max(1, Math.abs(w)), `${got[i]} vs ${w}`));
  assert.deepEqual([...f.readF32('f32')], [...Float32Array.from(vals)]);
  assert.deepEqual([...f.readF32('f64')], [...Float32Array.from(vals)]);
  close(f.readF32('f16'), vals, 1e-3);
  close(f.readF32('bf16'), vals, 1e-2);
  assert.deepEqual([...f.readF32('i64')], [0, 1, -2, 2147483648, -2147483648, 5]);
  assert.deepEqual([...f.readI32('i64')], [0, 1, -2, 2147483647, -2147483648, 5]);
  assert.deepEqual([...f.readI32('i32')], [-7, 0, 123456789]);
  assert.deepEqual([...f.readI32('i16')], [-32768, 5, 32767]);
  assert.deepEqual([...f.readI32('i8')], [-128, 0, 127]);
  assert.deepEqual([...f.readI32('u8')], [0, 128, 255]);
  assert.deepEqual([...f.readF32('bool')], [1, 0, 1]);
  assert.deepEqual([...f.readF32('scalar')], [42]);
  assert.equal(f.readF32('empty').length, 0);
  assert.throws(() => f.readI32('f32'), UnsupportedError);
  assert.throws(() => f.readF32('nope'), FormatError);
  // Sorted as the reference: dtype descending in Rust enum order (I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL), then name.
  assert.deepEqual(f.names(), ['i64', 'f64', 'f32', 'scalar', 'i32', 'bf16', 'empty', 'f16', 'i16', 'i8', 'u8', 'bool']);
  assert.deepEqual({ ...f.metadata }, { format: 'pt' });
  f.close();
  assert.throws(() => f.readRaw('f32'), FormatError);
});

test('writer rejects records whose data does not match dtype × shape, and duplicate names', () => {
  const p = path.join(tmpdir(), 'x.safetensors');
  assert.throws(() => writeSafetensors(p, [{ name: 'a', dtype: 'F32', shape: [3], data: Float32Array.from([1, 2]) }]), ShapeError);
  assert.throws(() => writeSafetensors(p, [{ name: 'a', dtype: 'BF16', shape: [2], data: Float32Array.from([1, 2]) }]), ShapeError);
  assert.throws(() => writeSafetensors(p, [
    { name: 'a', dtype: 'U8', shape: [1], data: Uint8Array.from([1]) },
    { name: 'a', dtype: 'U8', shape: [1], data: Uint8Array.from([1]) },
  ]), FormatError);
  assert.equal(fs.existsSync(p), false);
});

test('integer-like and non-ASCII tensor names keep their place and bytes', () => {
  const p = path.join(tmpdir(), 'names.safetensors');
  writeSafetensors(p, [
    { name: '10', dtype: 'U8', shape: [1], data: Uint8Array.from([10]) },
    { name: '9', dtype: 'U8', shape: [1], data: Uint8Array.from([9]) },
    { name: '权重.0', dtype: 'U8', shape: [1], data: Uint8Array.from([7]) },
    { name: '__proto__', dtype: 'U8', shape: [1], data: Uint8Array.from([5]) },
  ]);
  const f = SafetensorsFile.open(p);
  assert.deepEqual(f.names(), ['10', '9', '__proto__', '权重.0']);
  assert.deepEqual([...f.readRaw('权重.0')], [7]);
  assert.deepEqual([...f.readRaw('__proto__')], [5]);
  f.close();
});

test('reads are lazy: one small tensor from a 3 GiB (sparse) file reads only header + that tensor', () => {
  const dir = tmpdir();
  const p = path.join(dir, 'big.safetensors');
  const big = 3 * 2 ** 30;
  const header = enc.encode(JSON.stringify({
    big: { dtype: 'U8', shape: [big], data_offsets: [0, big] },
    small: { dtype: 'F32', shape: [2], data_offsets: [big, big + 8] },
  }));
  const fd = fs.openSync(p, 'w');
  fs.writeSync(fd, u64le(BigInt(header.length)), 0, 8, 0);
  fs.writeSync(fd, header, 0, header.length, 8);
  fs.writeSync(fd, f32Bytes([1.5, -2]), 0, 8, 8 + header.length + big);
  fs.closeSync(fd);
  const orig = fs.readSync;
  let bytesRead = 0;
  (fs as { readSync: unknown }).readSync = (...args: Parameters<typeof fs.readSync>) => {
    const n = (orig as (...a: unknown[]) => number)(...args);
    bytesRead += n;
    return n;
  };
  try {
    const f = SafetensorsFile.open(p);
    assert.deepEqual([...f.readF32('small')], [1.5, -2]);
    assert.equal(f.info('big').byteLength, big);
    f.close();
  } finally {
    (fs as { readSync: unknown }).readSync = orig;
  }
  assert.equal(fs.statSync(p).size, 8 + header.length + big + 8);
  assert.ok(bytesRead < 4096, `read ${bytesRead} bytes`);
  fs.unlinkSync(p);
});

test('sharded model directory: shards + index as transformers writes them, read back through ModelWeights', () => {
  const dir = tmpdir();
  const recs: TensorRecord[] = [];
  for (let l = 0; l < 3; l++) {
    recs.push({ name: `model.layers.${l}.mlp.up_proj.weight`, dtype: 'F32', shape: [4, 8], data: Float32Array.from({ length: 32 }, (_, i) => l * 100 + i) });
    recs.push({ name: `model.layers.${l}.input_layernorm.weight`, dtype: 'BF16', shape: [8], data: f32ToBf16(Float32Array.from({ length: 8 }, (_, i) => l + i / 8)) });
  }
  const written = writeShardedSafetensors(dir, recs, { maxShardBytes: 200, metadata: { format: 'pt' } });
  assert.deepEqual(written.map((p) => path.basename(p)), [
    'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors', 'model.safetensors.index.json',
  ]);
  const index = JSON.parse(fs.readFileSync(path.join(dir, 'model.safetensors.index.json'), 'utf8'));
  assert.deepEqual(index.metadata, { total_size: 3 * (128 + 16) });
  assert.equal(index.weight_map['model.layers.1.mlp.up_proj.weight'], 'model-00002-of-00003.safetensors');
  assert.deepEqual(Object.keys(index.weight_map), [...Object.keys(index.weight_map)].sort());
  const w = ModelWeights.open(dir);
  assert.equal(w.names().length, 6);
  assert.deepEqual([...w.readF32('model.layers.2.mlp.up_proj.weight')].slice(0, 3), [200, 201, 202]);
  assert.deepEqual([...w.readF32('model.layers.1.input_layernorm.weight')].slice(0, 2), [1, 1.125]);
  assert.equal(w.info('model.layers.0.mlp.up_proj.weight').file, path.join(dir, 'model-00001-of-00003.safetensors'));
  assert.throws(() => w.readF32('lm_head.weight'), FormatError);
  w.close();
  // Saving again with a larger limit writes one file and removes the stale shards and index.
  const again = writeShardedSafetensors(dir, recs, { maxShardBytes: 1 << 20 });
  assert.deepEqual(again.map((p) => path.basename(p)), ['model.safetensors']);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['model.safetensors']);
  const w2 = ModelWeights.open(dir);
  assert.equal(w2.names().length, 6);
  assert.deepEqual([...w2.readF32('model.layers.2.mlp.up_proj.weight')].slice(0, 2), [200, 201]);
  w2.close();
});

test('ModelWeights: broken indexes, missing shards, path escapes, pickle-only and ambiguous directories', () => {
  const mk = (files: Record<string, string | TensorRecord[]>): string => {
    const d = tmpdir();
    for (const [n, c] of Object.entries(files)) {
      if (typeof c === 'string') fs.writeFileSync(path.join(d, n), c);
      else writeSafetensors(path.join(d, n), c);
    }
    return d;
  };
  const t: TensorRecord[] = [{ name: 'a', dtype: 'F32', shape: [1], data: Float32Array.from([3]) }];
  const idx = (m: Record<string, string>) => JSON.stringify({ metadata: {}, weight_map: m });
  assert.throws(() => ModelWeights.open(mk({ 'model.safetensors.index.json': idx({ a: 'model-00001-of-00002.safetensors' }) })), /does not exist/);
  assert.throws(() => ModelWeights.open(mk({ 's.safetensors': t, 'model.safetensors.index.json': idx({ b: 's.safetensors' }) })), /does not contain it/);
  assert.throws(() => ModelWeights.open(mk({ 'model.safetensors.index.json': idx({ a: '../s.safetensors' }) })), /not a file name/);
  assert.throws(() => ModelWeights.open(mk({ 'model.safetensors.index.json': '{"weight_map": [1]}' })), FormatError);
  assert.throws(() => ModelWeights.open(mk({ 'model.safetensors.index.json': '{"weight_map": {"a": "s.safetensors", "a": "s.safetensors"}}' })), /duplicate key/);
  assert.throws(() => ModelWeights.open(mk({ 'pytorch_model.bin': 'x', 'config.json': '{}' })), (e: unknown) => e instanceof UnsupportedError && /convert them to safetensors/.test(e.message));
  assert.throws(() => ModelWeights.open(mk({ 'a.safetensors': t, 'b.safetensors': t })), /2 .safetensors files/);
  assert.throws(() => ModelWeights.open(mk({ 'config.json': '{}' })), /no model weights found/);
  assert.throws(() => ModelWeights.open(path.join(os.tmpdir(), 'dqlora-does-not-exist-xyz')), FormatError);
  const one = ModelWeights.open(mk({ 'consolidated.safetensors': t }));
  assert.deepEqual([...one.readF32('a')], [3]);
  one.close();
});

test('hostile headers are FormatErrors that name the file and the tensor', () => {
  const dir = tmpdir();
  const p = path.join(dir, 'h.safetensors');
  const cases: [string | Uint8Array, Uint8Array, RegExp][] = [
    ['{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', new Uint8Array(8), /duplicate key "a"/],
    ['{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', new Uint8Array(12), /tensor 'b'.*overlap tensor 'a'/],
    ['{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', new Uint8Array(8), /tensor 'a'.*needs 12 bytes/],
    ['{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', new Uint8Array(4), /tensor 'a'.*run past the data section/],
    ['{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}', new Uint8Array(1), /tensor 'a': unknown dtype "Q4"/],
    ['{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', new Uint8Array(4), /tensor 'a': shape/],
    ['{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}', new Uint8Array(4), /tensor 'a': shape/],
    ['{"a":{"dtype":"F32","shape":[1],"data_offsets":[0.5,4]}}', new Uint8Array(4), /tensor 'a': data_offsets/],
    ['{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', new Uint8Array(4), /tensor 'a': data_offsets/],
    ['{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}', new Uint8Array(4), /tensor 'a': data_offsets/],
    ['{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}', new Uint8Array(4), /too many elements/],
    ['{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', new Uint8Array(2), /whole number of bytes/],
    ['{"__metadata__":{"k":1}}', new Uint8Array(0), /"__metadata__"\["k"\] must be a string/],
    ['{"a":[1,2]}', new Uint8Array(0), /tensor 'a': entry must be an object/],
    ['[1,2,3]', new Uint8Array(0), /does not start with/],
    ['{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x', new Uint8Array(4), /trailing characters/],
    ['{"a":' + '['.repeat(50) + ']'.repeat(50) + '}', new Uint8Array(0), /nesting deeper/],
    [Uint8Array.from([0x7b, 0xff, 0xfe, 0x7d]), new Uint8Array(0), /not valid UTF-8/],
  ];
  for (const [hdr, data, re] of cases) {
    rawFile(p, hdr, data);
    assert.throws(() => SafetensorsFile.open(p), (e: unknown) => e instanceof FormatError && re.test(e.message) && e.message.includes(p), `${String(hdr).slice(0, 60)} → ${re}`);
  }
  // Header length beyond the file, beyond the limit, and a file too short for the length itself.
  writeFresh(p, concat(u64le(1000n), new Uint8Array(8)));
  assert.throws(() => SafetensorsFile.open(p), /runs past the end/);
  writeFresh(p, concat(u64le(BigInt(MAX_HEADER_BYTES) + 1n), new Uint8Array(8)));
  assert.throws(() => SafetensorsFile.open(p), /exceeds/);
  writeFresh(p, concat(u64le(0xffffffffffffffffn), new Uint8Array(8)));
  assert.throws(() => SafetensorsFile.open(p), /exceeds/);
  writeFresh(p, Uint8Array.from([1, 2, 3]));
  assert.throws(() => SafetensorsFile.open(p), /shorter than/);
});

test('foreign dtypes (FP8 ...) are listed and readable raw, but not converted', () => {
  const p = path.join(tmpdir(), 'f8.safetensors');
  rawFile(p, '{"w":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"__metadata__":null}', Uint8Array.from([1, 2, 3, 4]));
  const f = SafetensorsFile.open(p);
  assert.equal(f.info('w').dtype, 'F8_E4M3');
  assert.deepEqual([...f.readRaw('w')], [1, 2, 3, 4]);
  assert.throws(() => f.readF32('w'), (e: unknown) => e instanceof UnsupportedError && /F8_E4M3/.test(e.message));
  assert.throws(() => f.readI32('w'), UnsupportedError);
  f.close();
});

test('gaps between tensors and unordered offsets are accepted (coverage is not required)', () => {
  const p = path.join(tmpdir(), 'gap.safetensors');
  rawFile(p, '{"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"z":{"dtype":"U8","shape":[0],"data_offsets":[1,1]}}', Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9]));
  const f = SafetensorsFile.open(p);
  assert.deepEqual(f.names(), ['a', 'z', 'b']);
  assert.deepEqual([...f.readRaw('b')], [7, 8]);
  assert.deepEqual([...f.readRaw('a')], [1, 2]);
  assert.equal(f.readRaw('z').length, 0);
  f.close();
});

// ---------------------------------------------------------------------------------------------------------
// Fuzz. Every outcome must be either the right data or a FormatError/UnsupportedError.

const DTYPES: StDtype[] = ['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL'];
const SIZE: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1, F8_E4M3: 1, U32: 4 };

function allowedError(e: unknown): boolean {
  return e instanceof FormatError || e instanceof UnsupportedError;
}

/** Checks every tensor of an opened file against an independent reading of the same bytes. */
function checkAgainstBytes(f: SafetensorsFile, bytes: Uint8Array): void {
  const n = getU64(bytes);
  const hdr = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const names = Object.keys(hdr).filter((k) => k !== '__metadata__');
  assert.deepEqual([...f.names()].sort(), names.sort());
  for (const name of names) {
    const { dtype, shape, data_offsets: [b, e] } = hdr[name];
    const want = bytes.subarray(8 + n + b, 8 + n + e);
    assert.deepEqual(f.readRaw(name), want.slice());
    assert.equal(e - b, shape.reduce((x, y) => x * y, 1) * SIZE[dtype]);
    try {
      const x = f.readF32(name);
      assert.equal(x.length, shape.reduce((p, q) => p * q, 1));
      if (dtype === 'F32') assert.deepEqual(new Uint8Array(x.buffer), want.slice());
    } catch (err) {
      if (!allowedError(err)) throw err;
    }
  }
}

function tryOpen(p: string, bytes: Uint8Array): boolean {
  let f: SafetensorsFile;
  try {
    f = SafetensorsFile.open(p);
  } catch (e) {
    if (!allowedError(e)) throw e;
    return false;
  }
  try {
    checkAgainstBytes(f, bytes);
  } finally {
    f.close();
  }
  return true;
}

test('fuzz: 3000 seeded mutations and truncations of a valid file give right data or clean errors', () => {
  const dir = tmpdir();
  const src = path.join(dir, 'src.safetensors');
  const rng = new CounterRng(2024, 1);
  const recs: TensorRecord[] = DTYPES.map((dt, i) => ({
    name: `t${i}.${dt.toLowerCase()}`, dtype: dt, shape: [2, i + 1],
    data: Uint8Array.from({ length: 2 * (i + 1) * SIZE[dt] }, () => rng.int(256)),
  }));
  writeSafetensors(src, recs, { format: 'pt' });
  const orig = readBytes(src);
  const hlen = 8 + getU64(orig);
  const p = path.join(dir, 'm.safetensors');
  let opened = 0;
  for (let it = 0; it < 3000; it++) {
    const b = orig.slice();
    let out: Uint8Array = b;
    const kind = rng.int(6);
    let dataOnly = false;
    if (kind === 0) { // flip a few bytes anywhere
      for (let k = 1 + rng.int(3); k > 0; k--) b[rng.int(b.length)] = rng.int(256);
    } else if (kind === 1) { // flip bytes in the header text only
      for (let k = 1 + rng.int(3); k > 0; k--) b[8 + rng.int(hlen - 8)] = rng.int(256);
    } else if (kind === 2) { // truncate
      out = b.subarray(0, rng.int(b.length));
    } else if (kind === 3) { // insert or delete a byte in the header
      const at = 8 + rng.int(hlen - 8);
      out = rng.int(2) ? concat(b.subarray(0, at), Uint8Array.of(rng.int(256)), b.subarray(at)) : concat(b.subarray(0, at), b.subarray(at + 1));
    } else if (kind === 4) { // change the length prefix
      const v = [0n, 1n, BigInt(rng.int(hlen * 2)), BigInt(hlen - 8 + rng.int(9) - 4), 0xffffffffn, 1n << 63n][rng.int(6)];
      b.set(u64le(v), 0);
    } else { // corrupt tensor data only: the file must still open, and reads return the new bytes
      for (let k = 1 + rng.int(8); k > 0; k--) b[hlen + rng.int(b.length - hlen)] = rng.int(256);
      dataOnly = true;
    }
    writeFresh(p, out);
    const ok = tryOpen(p, out);
    if (dataOnly) assert.ok(ok, 'a file whose data bytes changed must still open');
    if (ok) opened++;
  }
  assert.ok(opened > 500 && opened < 3000, `opened ${opened}`);
});

test('fuzz: 2000 random headers open exactly when they are valid, and read right', () => {
  const dir = tmpdir();
  const p = path.join(dir, 'r.safetensors');
  const rng = new CounterRng(99, 7);
  const pick = <T>(xs: readonly T[]): T => xs[rng.int(xs.length)];
  const weird: unknown[] = [null, true, -1, 1.5, 'x', [], {}, [1, 2, 3], 2 ** 60, '1'];
  let valid = 0;
  for (let it = 0; it < 2000; it++) {
    const dataSize = rng.int(64);
    const entries: [string, unknown][] = [];
    const nT = rng.int(5);
    let cursor = 0;
    for (let t = 0; t < nT; t++) {
      const dtype = rng.int(10) === 0 ? pick(['F8_E4M3', 'U32', 'Q8', 7]) : pick(DTYPES);
      const shape = rng.int(12) === 0 ? pick(weird) : Array.from({ length: rng.int(3) }, () => rng.int(4));
      const numel = Array.isArray(shape) && shape.every((d) => Number.isInteger(d)) ? (shape as number[]).reduce((a, c) => a * c, 1) : 1;
      const sz = numel * (SIZE[dtype as string] ?? 1);
      let off: unknown = [cursor, cursor + sz];
      const r = rng.int(10);
      if (r === 0) off = pick(weird);
      else if (r === 1) off = [cursor + rng.int(3) - 1, cursor + sz + rng.int(3) - 1];
      else if (r === 2) off = [Math.max(0, cursor - sz), cursor];
      cursor += sz + (rng.int(4) === 0 ? rng.int(3) : 0);
      const entry = rng.int(20) === 0 ? pick(weird) : { dtype, shape, data_offsets: off };
      entries.push([rng.int(15) === 0 && t > 0 ? entries[0][0] : `w${t}`, entry]);
    }
    if (rng.int(5) === 0) entries.push(['__metadata__', rng.int(2) ? { a: 'b' } : pick(weird)]);
    const header = '{' + entries.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(',') + '}';
    const data = Uint8Array.from({ length: dataSize }, () => rng.int(256));
    rawFile(p, header, data);
    const bytes = readBytes(p);
    // Independent oracle of validity.
    const expectValid = ((): boolean => {
      const names = new Set<string>();
      const ranges: [number, number][] = [];
      for (const [k, v] of entries) {
        if (names.has(k)) return false;
        names.add(k);
        if (k === '__metadata__') {
          if (v === null) continue;
          if (typeof v !== 'object' || Array.isArray(v)) return false;
          if (!Object.values(v as object).every((s) => typeof s === 'string')) return false;
          continue;
        }
        if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
        const { dtype, shape, data_offsets } = v as { dtype: unknown; shape: unknown; data_offsets: unknown };
        if (typeof dtype !== 'string' || !(dtype in SIZE)) return false;
        if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) return false;
        if (!Array.isArray(data_offsets) || data_offsets.length !== 2 || !data_offsets.every((d) => Number.isInteger(d))) return false;
        const [b, e] = data_offsets as number[];
        if (b < 0 || e < b || e > dataSize) return false;
        if (e - b !== shape.reduce((a: number, c: number) => a * c, 1) * SIZE[dtype]) return false;
        if (e > b) ranges.push([b, e]);
      }
      ranges.sort((x, y) => x[0] - y[0]);
      for (let i = 1; i < ranges.length; i++) if (ranges[i][0] < ranges[i - 1][1]) return false;
      return true;
    })();
    const ok = tryOpen(p, bytes);
    assert.equal(ok, expectValid, header);
    if (ok) valid++;
  }
  assert.ok(valid > 300, `valid ${valid}`);
});

test('fuzz: 600 mutated model.safetensors.index.json files open right or fail cleanly', () => {
  const dir = tmpdir();
  const recs: TensorRecord[] = ['a', 'b', 'c', 'd'].map((n, i) => ({ name: n, dtype: 'F32', shape: [2], data: Float32Array.from([i, -i]) }));
  writeShardedSafetensors(dir, recs, { maxShardBytes: 8 });
  const ip = path.join(dir, 'model.safetensors.index.json');
  const orig = readBytes(ip);
  const rng = new CounterRng(5, 5);
  let opened = 0;
  for (let it = 0; it < 600; it++) {
    const b = orig.slice();
    for (let k = 1 + rng.int(3); k > 0; k--) b[rng.int(b.length)] = rng.int(2) ? rng.int(128) : b[rng.int(b.length)];
    writeFresh(ip, b);
    try {
      const w = ModelWeights.open(dir);
      opened++;
      for (const n of w.names()) {
        const i = ['a', 'b', 'c', 'd'].indexOf(n);
        assert.ok(i >= 0, `unexpected name ${n}`);
        assert.deepEqual([...w.readF32(n)], [i, -i]);
      }
      w.close();
    } catch (e) {
      if (!allowedError(e)) throw e;
    }
  }
  assert.ok(opened > 0);
});
