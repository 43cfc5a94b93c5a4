// PyTorch .bin checkpoints (common/torch-pickle.ts): every fixture written by torch.save
// (test/reference/make_torch_bin.py) reads back bit for bit; ModelWeights serves .bin model directories;
// hostile pickles and archives end in named errors, and nothing in them is ever executed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { FormatError, UnsupportedError } from '../../common/errors.ts';
import { f16ToF32 } from '../../common/halfprec.ts';
import { writeSafetensors } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { TorchBinFile } from '../../common/torch-pickle.ts';
import { ZipArchive } from '../../common/torchbin/zip.ts';
import { Philox } from '../helpers/prng.ts';

const FIX = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'torch-bin');
interface Expected { dtype: string; shape: number[]; data: string }
const EXPECTED = JSON.parse(fs.readFileSync(path.join(FIX, 'expected.json'), 'utf8')) as { checkpoints: Record<string, Record<string, Expected>> };

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-torchbin-'));
}

/** Asserts every tensor of `f` equals expected.json's entry for `checkpoint`, bit for bit. */
function assertMatches(f: { names(): string[]; info(n: string): { dtype: string; shape: number[] }; readRaw(n: string): Uint8Array }, checkpoint: string): void {
  const want = EXPECTED.checkpoints[checkpoint];
  assert.deepEqual([...f.names()].sort(), Object.keys(want).sort(), checkpoint);
  for (const [name, e] of Object.entries(want)) {
    const info = f.info(name);
    assert.equal(info.dtype, e.dtype, `${checkpoint} ${name} dtype`);
    assert.deepEqual(info.shape, e.shape, `${checkpoint} ${name} shape`);
    assert.deepEqual(Buffer.from(f.readRaw(name)), Buffer.from(e.data, 'base64'), `${checkpoint} ${name} bytes`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Test-side writers: a zip writer (STORED/DEFLATE, optional ZIP64 records) and a pickle assembler, so hostile
// and unusual archives can be built without Python.

const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(b: Uint8Array): number {
  let c = 0xffffffff;
  for (const x of b) c = CRC_TABLE[(c ^ x) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

interface ZipIn { name: string; data: Uint8Array | string }

/** A zip as torch would write it (STORED, local data aligned to 64), or DEFLATE / forced-ZIP64 variants. */
function buildZip(members: ZipIn[], opts: { deflate?: boolean; zip64?: boolean } = {}): Buffer {
  const parts: Buffer[] = [];
  const central: Buffer[] = [];
  let off = 0;
  for (const m of members) {
    const raw = typeof m.data === 'string' ? Buffer.from(m.data) : Buffer.from(m.data);
    const body = opts.deflate ? zlib.deflateRawSync(raw) : raw;
    const name = Buffer.from(m.name);
    const padLen = (64 - ((off + 30 + name.length + 4) % 64)) % 64;
    const extra = Buffer.alloc(4 + padLen);
    extra.writeUInt16LE(0x4246, 0); // torch's "FB" padding field
    extra.writeUInt16LE(padLen, 2);
    const lh = Buffer.alloc(30);
    lh.writeUInt32LE(0x04034b50, 0);
    lh.writeUInt16LE(45, 4);
    lh.writeUInt16LE(opts.deflate ? 8 : 0, 8);
    lh.writeUInt32LE(crc32(raw), 14);
    lh.writeUInt32LE(body.length, 18);
    lh.writeUInt32LE(raw.length, 22);
    lh.writeUInt16LE(name.length, 26);
    lh.writeUInt16LE(extra.length, 28);
    parts.push(lh, name, extra, body);
    const z64 = Buffer.alloc(opts.zip64 ? 28 : 0);
    if (opts.zip64) {
      z64.writeUInt16LE(1, 0);
      z64.writeUInt16LE(24, 2);
      z64.writeBigUInt64LE(BigInt(raw.length), 4);
      z64.writeBigUInt64LE(BigInt(body.length), 12);
      z64.writeBigUInt64LE(BigInt(off), 20);
    }
    const ch = Buffer.alloc(46);
    ch.writeUInt32LE(0x02014b50, 0);
    ch.writeUInt16LE(45, 4);
    ch.writeUInt16LE(45, 6);
    ch.writeUInt16LE(opts.deflate ? 8 : 0, 10);
    ch.writeUInt32LE(crc32(raw), 16);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : body.length, 20);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : raw.length, 24);
    ch.writeUInt16LE(name.length, 28);
    ch.writeUInt16LE(z64.length, 30);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : off, 42);
    central.push(ch, name, z64);
    off += lh.length + name.length + extra.length + body.length;
  }
  const cd = Buffer.concat(central);
  const tail: Buffer[] = [];
  if (opts.zip64) {
    const e64 = Buffer.alloc(56);
    e64.writeUInt32LE(0x06064b50, 0);
    e64.writeBigUInt64LE(44n, 4);
    e64.writeUInt16LE(45, 12);
    e64.writeUInt16LE(45, 14);
    e64.writeBigUInt64LE(BigInt(members.length), 24);
    e64.writeBigUInt64LE(BigInt(members.length), 32);
    e64.writeBigUInt64LE(BigInt(cd.length), 40);
    e64.writeBigUInt64LE(BigInt(off), 48);
    const loc = Buffer.alloc(20);
    loc.writeUInt32LE(0x07064b50, 0);
    loc.writeBigUInt64LE(BigInt(off + cd.length), 8);
    loc.writeUInt32LE(1, 16);
    tail.push(e64, loc);
  }
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0);
  eocd.writeUInt16LE(opts.zip64 ? 0xffff : members.length, 8);
  eocd.writeUInt16LE(opts.zip64 ? 0xffff : members.length, 10);
  eocd.writeUInt32LE(opts.zip64 ? 0xffffffff : cd.length, 12);
  eocd.writeUInt32LE(opts.zip64 ? 0xffffffff : off, 16);
  return Buffer.concat([...parts, cd, ...tail, eocd]);
}

/** The members of a fixture, in archive order, via the reader's own directory parser. */
function membersOf(file: string): ZipIn[] {
  const fd = fs.openSync(file, 'r');
  try {
    const z = ZipArchive.read(fd, file);
    return [...z.members.values()].sort((a, b) => a.dataOffset - b.dataOffset).map((m) => ({ name: m.name, data: z.read(m, 0, m.size) }));
  } finally {
    fs.closeSync(fd);
  }
}

/** Pickle assembler: enough opcodes to write state dicts (and hostile variants) by hand. */
class Pk {
  private readonly out: number[] = [];
  op(...bytes: number[]): this { this.out.push(...bytes); return this; }
  proto(v = 2): this { return this.op(0x80, v); }
  str(s: string): this {
    const b = Buffer.from(s);
    const len = Buffer.alloc(4);
    len.writeUInt32LE(b.length);
    return this.op(0x58, ...len, ...b);
  }
  int(n: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32LE(n);
    return this.op(0x4a, ...b);
  }
  global(module: string, name: string): this { return this.op(0x63, ...Buffer.from(`${module}\n${name}\n`)); }
  stackGlobal(module: string, name: string): this { return this.str(module).str(name).op(0x93); }
  mark(): this { return this.op(0x28); }
  tuple(): this { return this.op(0x74); }
  intTuple(xs: number[]): this { this.mark(); for (const x of xs) this.int(x); return this.tuple(); }
  orderedDict(): this { return this.global('collections', 'OrderedDict').op(0x29, 0x52); }
  /** _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()) of a fresh persistent id. */
  tensor(t: { cls: string; key: string; numel: number; offset: number; size: number[]; stride: number[] }): this {
    this.global('torch._utils', '_rebuild_tensor_v2').mark();
    this.mark().str('storage').global('torch', t.cls).str(t.key).str('cpu').int(t.numel).tuple().op(0x51);
    this.int(t.offset).intTuple(t.size).intTuple(t.stride).op(0x89).orderedDict();
    return this.tuple().op(0x52);
  }
  stop(): this { return this.op(0x2e); }
  bytes(): Uint8Array { return Uint8Array.from(this.out); }
}

type TensorSpec = { name: string; cls: string; key: string; numel: number; offset: number; size: number[]; stride: number[] };

/** data.pkl of an OrderedDict of the given tensors. */
function stateDictPickle(tensors: TensorSpec[]): Uint8Array {
  const p = new Pk().proto().orderedDict().mark();
  for (const t of tensors) p.str(t.name).tensor(t);
  return p.op(0x75).stop().bytes();
}

/** Writes a torch-style archive with the given pickle and storages into a temp file; returns its path. */
function writeCheckpoint(pkl: Uint8Array, storages: Record<string, Uint8Array>, extra: ZipIn[] = []): string {
  const members: ZipIn[] = [{ name: 'archive/data.pkl', data: pkl }];
  for (const [k, v] of Object.entries(storages)) members.push({ name: `archive/data/${k}`, data: v });
  members.push({ name: 'archive/version', data: '3\n' }, ...extra);
  const p = path.join(tmpDir(), 'pytorch_model.bin');
  fs.writeFileSync(p, buildZip(members));
  return p;
}

const f32Bytes = (xs: number[]): Uint8Array => new Uint8Array(Float32Array.from(xs).buffer);

// ---------------------------------------------------------------------------------------------------------

test('every tensor torch.save wrote reads back bit for bit: all dtypes, views, empty and 0-d tensors, pickle protocols 2 and 4, DEFLATE', () => {
  for (const checkpoint of Object.keys(EXPECTED.checkpoints)) {
    const f = TorchBinFile.open(path.join(FIX, checkpoint));
    assertMatches(f, checkpoint);
    f.close();
  }
});

test('state dict order, views and conversions of the single-file fixture', () => {
  const f = TorchBinFile.open(path.join(FIX, 'single', 'pytorch_model.bin'));
  // nn.Linear's own entries first, then the rest in insertion order (the OrderedDict's order).
  assert.deepEqual(f.names().slice(0, 4), ['weight', 'bias', 'f16', 'f16_t']);
  // The transposed view equals the transpose of its base.
  const base = f.readF32('f16'); // [8, 16]
  const tr = f.readF32('f16_t'); // [16, 8]
  for (let i = 0; i < 8; i++) for (let j = 0; j < 16; j++) assert.equal(tr[j * 8 + i], base[i * 16 + j]);
  assert.deepEqual([...f.readF32('f16_row3')], [...base.subarray(48, 64)]);
  const cols = f.readF32('f16_cols'); // base[2:6, 5:11]
  for (let i = 0; i < 4; i++) for (let j = 0; j < 6; j++) assert.equal(cols[i * 6 + j], base[(2 + i) * 16 + 5 + j]);
  assert.deepEqual([...f.readF32('expand')], [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
  assert.deepEqual([...f.readF32('scalar')], [2.5]);
  assert.deepEqual(f.info('scalar').shape, []);
  assert.equal(f.readRaw('empty').length, 0);
  assert.deepEqual(f.info('empty'), { name: 'empty', dtype: 'F32', shape: [0, 4], byteLength: 0, file: path.join(FIX, 'single', 'pytorch_model.bin'), fileOffset: f.info('empty').fileOffset });
  assert.deepEqual([...f.readI32('perm3d')].slice(0, 6), [0, 4, 8, 12, 16, 20]); // arange(24).reshape(2,3,4).permute(2,0,1)
  assert.deepEqual([...f.readI32('i64_small')], [1, -2, 300000, -2147483648]);
  assert.deepEqual([...f.readF32('bool')], [1, 0, 1]);
  assert.deepEqual([...f.readI32('bool')], [1, 0, 1]);
  assert.deepEqual([...f.readF32('u8')], [0, 255, 17]);
  const f32 = f.readF32('f32');
  assert.equal(f32[0], Infinity);
  assert.equal(f32[1], -Infinity);
  assert.ok(Number.isNaN(f32[2]));
  assert.ok(Object.is(f32[3], -0));
  assert.deepEqual([...f.readF32('f16').subarray(0, 3)], [...f16ToF32(new Uint16Array(f.readRaw('f16').buffer)).subarray(0, 3)]);
  assert.throws(() => f.readI32('i64'), (e: unknown) => e instanceof FormatError && /does not fit in int32/.test(e.message));
  assert.throws(() => f.readI32('f16'), UnsupportedError);
  assert.throws(() => f.readRaw('nope'), (e: unknown) => e instanceof FormatError && /no tensor named 'nope'/.test(e.message));
  // readRawInto fills a caller's (here unaligned) buffer.
  const stage = new Uint8Array(1 + f.info('f16_t').byteLength);
  f.readRawInto('f16_t', stage.subarray(1));
  assert.deepEqual(Buffer.from(stage.subarray(1)), Buffer.from(f.readRaw('f16_t')));
  f.close();
  assert.throws(() => f.readRaw('f16'), /after close/);
});

test('info().fileOffset points at the bytes of contiguous STORED tensors and is -1 for gathered or inflated ones', () => {
  const file = path.join(FIX, 'single', 'pytorch_model.bin');
  const f = TorchBinFile.open(file);
  const bytes = fs.readFileSync(file);
  for (const name of ['f16', 'f16_row3', 'bf16', 'i64', 'scalar', 'weight']) {
    const i = f.info(name);
    assert.ok(i.fileOffset > 0, name);
    assert.equal(i.byteLength, Buffer.from(EXPECTED.checkpoints['single/pytorch_model.bin'][name].data, 'base64').length);
    assert.deepEqual(bytes.subarray(i.fileOffset, i.fileOffset + i.byteLength), Buffer.from(f.readRaw(name)), name);
  }
  for (const name of ['f16_t', 'f16_cols', 'expand', 'perm3d']) assert.equal(f.info(name).fileOffset, -1, name);
  f.close();
  const d = TorchBinFile.open(path.join(FIX, 'deflated.bin'));
  assert.equal(d.info('f16').fileOffset, -1);
  d.close();
});

test('ZIP64 and DEFLATE archives of the same members read the same tensors', () => {
  const src = path.join(FIX, 'single', 'pytorch_model.bin');
  const members = membersOf(src);
  for (const opts of [{ zip64: true }, { deflate: true }, { zip64: true, deflate: true }, {}]) {
    const p = path.join(tmpDir(), 'pytorch_model.bin');
    fs.writeFileSync(p, buildZip(members, opts));
    const f = TorchBinFile.open(p);
    assertMatches(f, 'single/pytorch_model.bin');
    f.close();
  }
});

test('ModelWeights.open serves pytorch_model.bin, sharded .bin + index, and prefers safetensors when both exist', () => {
  const sharded = ModelWeights.open(path.join(FIX, 'sharded'));
  assertMatches({ names: () => sharded.names().filter((n) => EXPECTED.checkpoints['sharded/pytorch_model-00001-of-00002.bin'][n]), info: (n) => sharded.info(n), readRaw: (n) => sharded.readRaw(n) }, 'sharded/pytorch_model-00001-of-00002.bin');
  assert.equal(sharded.names().length, 6);
  assert.equal(sharded.info('transformer.output_layer.weight').file, path.join(FIX, 'sharded', 'pytorch_model-00002-of-00002.bin'));
  assert.deepEqual(sharded.info('transformer.output_layer.weight').shape, [32, 16]);
  assert.equal(sharded.readF32('transformer.encoder.final_layernorm.weight').length, 16);
  assert.throws(() => sharded.readF32('missing'), /has no tensor named 'missing'/);
  sharded.close();

  const single = ModelWeights.open(path.join(FIX, 'single'));
  assertMatches(single, 'single/pytorch_model.bin');
  single.close();

  // A lone pytorch_model-00001-of-00001.bin is read; safetensors wins over .bin.
  const d = tmpDir();
  fs.copyFileSync(path.join(FIX, 'parameter.bin'), path.join(d, 'pytorch_model-00001-of-00001.bin'));
  const lone = ModelWeights.open(d);
  assertMatches(lone, 'parameter.bin');
  lone.close();
  writeSafetensors(path.join(d, 'model.safetensors'), [{ name: 'st', dtype: 'F32', shape: [1], data: Float32Array.from([7]) }]);
  const st = ModelWeights.open(d);
  assert.deepEqual(st.names(), ['st']);
  st.close();

  // Index problems are named.
  const e = tmpDir();
  for (const k of [1, 2]) fs.copyFileSync(path.join(FIX, 'sharded', `pytorch_model-0000${k}-of-00002.bin`), path.join(e, `pytorch_model-0000${k}-of-00002.bin`));
  assert.throws(() => ModelWeights.open(e), (x: unknown) => x instanceof FormatError && /2 pytorch_model\*\.bin files .* but no pytorch_model\.bin\.index\.json/.test(x.message));
  fs.writeFileSync(path.join(e, 'pytorch_model.bin.index.json'), JSON.stringify({ metadata: {}, weight_map: { 'transformer.output_layer.weight': 'pytorch_model-00001-of-00002.bin' } }));
  assert.throws(() => ModelWeights.open(e), /is mapped to pytorch_model-00001-of-00002.bin, which does not contain it/);
  fs.writeFileSync(path.join(e, 'pytorch_model.bin.index.json'), JSON.stringify({ weight_map: { a: '../x.bin' } }));
  assert.throws(() => ModelWeights.open(e), /not a file name/);
});

test('a pickle that calls os.system is refused by name and never executed', () => {
  const marker = '/tmp/dqlora-torch-bin-pwned';
  try { fs.unlinkSync(marker); } catch { /* absent */ }
  const file = path.join(FIX, 'malicious.bin');
  assert.throws(() => TorchBinFile.open(file), (e: unknown) => e instanceof FormatError
    && e.message.startsWith(`refusing to load ${file} (data.pkl): the pickle references posix.system, which is not a tensor; only plain state dicts are read (convert it to safetensors)`));
  const d = tmpDir();
  fs.copyFileSync(file, path.join(d, 'pytorch_model.bin'));
  assert.throws(() => ModelWeights.open(d), /refusing to load .*posix\.system/);
  assert.equal(fs.existsSync(marker), false);
});

test('every global outside the allow-list is refused, through GLOBAL and STACK_GLOBAL alike', () => {
  const hostile: [string, string][] = [
    ['os', 'system'], ['posix', 'system'], ['builtins', 'eval'], ['__builtin__', 'exec'], ['builtins', 'getattr'],
    ['numpy.core.multiarray', '_reconstruct'], ['subprocess', 'Popen'], ['torch', 'load'], ['torch._utils', '_rebuild_qtensor'],
    ['torch.nn.modules.linear', 'Linear'], ['collections', 'defaultdict'], ['torch', 'UntypedStorage'], ['torch._utils', '_rebuild_tensor_v2 '],
  ];
  for (const [module, name] of hostile) {
    for (const stack of [false, true]) {
      const p = new Pk().proto(stack ? 4 : 2);
      (stack ? p.stackGlobal(module, name) : p.global(module, name)).str('touch /tmp/x').op(0x85, 0x52).stop();
      const file = writeCheckpoint(p.bytes(), {});
      assert.throws(() => TorchBinFile.open(file), (e: unknown) => e instanceof FormatError
        && e.message.includes(`refusing to load ${file} (data.pkl): the pickle references ${module}.${name}, which is not a tensor`), `${module}.${name}`);
    }
  }
  // Allow-listed names that are data, not functions, cannot be called.
  const call = new Pk().proto().global('torch', 'FloatStorage').op(0x29, 0x52).stop();
  assert.throws(() => TorchBinFile.open(writeCheckpoint(call.bytes(), {})), /REDUCE calls torch\.FloatStorage, which is not callable here/);
});

test('a hand-assembled state dict reads; views past their storage, size mismatches and odd structure are named errors', () => {
  const w: TensorSpec = { name: 'w', cls: 'FloatStorage', key: '0', numel: 6, offset: 0, size: [2, 3], stride: [3, 1] };
  const good = writeCheckpoint(stateDictPickle([w, { ...w, name: 'wt', size: [3, 2], stride: [1, 3] }]), { 0: f32Bytes([1, 2, 3, 4, 5, 6]) });
  const f = TorchBinFile.open(good);
  assert.deepEqual([...f.readF32('w')], [1, 2, 3, 4, 5, 6]);
  assert.deepEqual([...f.readF32('wt')], [1, 4, 2, 5, 3, 6]);
  f.close();

  const bad = (pkl: Uint8Array, storages: Record<string, Uint8Array>, re: RegExp, extra: ZipIn[] = [], cls: typeof FormatError = FormatError): void => {
    const file = writeCheckpoint(pkl, storages, extra);
    assert.throws(() => TorchBinFile.open(file), (e: unknown) => e instanceof cls && e.message.includes(file) && re.test(e.message), re.source);
  };
  const six = { 0: f32Bytes([1, 2, 3, 4, 5, 6]) };
  bad(stateDictPickle([{ ...w, offset: 1 }]), six, /reaches element 6 of a 6-element storage/);
  bad(stateDictPickle([{ ...w, stride: [5, 1] }]), six, /reaches element 7 /);
  bad(stateDictPickle([{ ...w, size: [2, 3], stride: [1e9, 1] }]), six, /reaches element/);
  bad(stateDictPickle([{ ...w, size: [100000, 100000], stride: [0, 0] }]), six, /repeats its 6-element storage into 10000000000 elements/);
  bad(stateDictPickle([{ ...w, numel: 5 }]), six, /holds 5 F32 elements \(20 bytes\) but its member has 24 bytes/);
  bad(stateDictPickle([w]), {}, /storage '0' has no member archive\/data\/0/);
  bad(stateDictPickle([w, { ...w, name: 'v', cls: 'HalfStorage' }]), six, /storage '0' is described twice, differently/);
  bad(stateDictPickle([{ ...w, size: [2, 3, 1], stride: [3, 1] }]), six, /size has 3 dims, stride 2/);
  bad(stateDictPickle([w]), six, /only little-endian/, [{ name: 'archive/byteorder', data: 'big' }], UnsupportedError);
  bad(new Pk().proto().op(0x7d).str('w').str('not a tensor').op(0x73).stop().bytes(), six, /entry 'w' is the string "not a tensor", not a tensor/);
  bad(new Pk().proto().op(0x5d).stop().bytes(), six, /holds a list, not a state dict/);
  bad(new Pk().proto().op(0x7d).str('nested').op(0x7d).op(0x73).stop().bytes(), six, /entry 'nested' is a dict, not a tensor/);
  bad(new Pk().proto().op(...new Array<number>(20_000).fill(0x28)).stop().bytes(), six, /more than 10000 nested MARKs/);
  bad(new Pk().proto().op(0x8a, 200, ...new Array<number>(200).fill(1)).stop().bytes(), six, /integer of 200 bytes/);
  bad(new Pk().proto().op(0x58, 0xff, 0xff, 0xff, 0x7f, 0x41).stop().bytes(), six, /truncated pickle/);
  bad(new Pk().proto().op(0x68, 9).stop().bytes(), six, /memo entry 9 was never stored/);
  bad(new Pk().proto().op(0x7d).bytes(), six, /pickle ends without STOP/);
  bad(new Pk().proto().op(0x7d, 0x2e, 0x4e).bytes(), six, /1 bytes after the pickle's STOP/);
  bad(new Pk().proto().op(0x81).stop().bytes(), six, /unsupported pickle opcode 0x81/);
  bad(new Pk().proto(9).op(0x7d).stop().bytes(), six, /pickle protocol 9 is not supported/);
  bad(new Pk().proto().op(0x58, 2, 0, 0, 0, 0xc3, 0x28).stop().bytes(), six, /not valid UTF-8/);
  // A dict that contains itself is fine to build; only its entries are inspected (no recursion, no hang).
  bad(new Pk().proto().op(0x7d, 0x71, 0).str('self').op(0x68, 0, 0x73).stop().bytes(), six, /entry 'self' is a dict, not a tensor/);
});

test('archives that are not torch.save checkpoints, legacy ones and damaged zips are named errors', () => {
  assert.throws(() => TorchBinFile.open(path.join(FIX, 'legacy.bin')), (e: unknown) => e instanceof UnsupportedError
    && /legacy PyTorch checkpoint \(pre-1\.6 pickle format\)/.test(e.message) && /torch\.save\(torch\.load\(f\), f\)/.test(e.message));
  const d = tmpDir();
  const put = (name: string, data: Uint8Array | string): string => { const p = path.join(d, name); fs.writeFileSync(p, data); return p; };
  const tar = Buffer.alloc(1024);
  tar.write('ustar', 257);
  assert.throws(() => TorchBinFile.open(put('tar.bin', tar)), /legacy PyTorch checkpoint \(tar format\)/);
  assert.throws(() => TorchBinFile.open(put('text.bin', 'hello')), (e: unknown) => e instanceof UnsupportedError && /not a PyTorch zip checkpoint/.test(e.message));
  assert.throws(() => TorchBinFile.open(put('empty.bin', '')), UnsupportedError);
  assert.throws(() => TorchBinFile.open(path.join(d, 'absent.bin')), (e: unknown) => e instanceof FormatError && /cannot open PyTorch checkpoint/.test(e.message));
  assert.throws(() => TorchBinFile.open(put('nopkl.bin', buildZip([{ name: 'a/version', data: '3' }]))), /no <archive>\/data\.pkl member/);
  assert.throws(() => TorchBinFile.open(put('bz2.bin', (() => {
    const z = buildZip([{ name: 'a/data.pkl', data: '}.' }]);
    z.writeUInt16LE(12, z.indexOf(Buffer.from([0x50, 0x4b, 1, 2])) + 10); // central method := bzip2
    return z;
  })())), (e: unknown) => e instanceof UnsupportedError && /compression method 12/.test(e.message));
  const ok = fs.readFileSync(path.join(FIX, 'parameter.bin'));
  assert.throws(() => TorchBinFile.open(put('cut.bin', ok.subarray(0, ok.length - 10))), /no zip end-of-central-directory record/);
  const members = membersOf(path.join(FIX, 'parameter.bin'));
  assert.throws(() => TorchBinFile.open(put('dup.bin', buildZip([...members, members[1]]))), /appears twice/);
  // Two central entries pointing at the same local header: overlapping members.
  const twice = buildZip([members[0], { name: 'parameter/data/zz', data: members[0].data }]);
  const second = twice.indexOf(Buffer.from([0x50, 0x4b, 1, 2]), twice.indexOf(Buffer.from([0x50, 0x4b, 1, 2])) + 1);
  twice.writeUInt32LE(0, second + 42);
  assert.throws(() => TorchBinFile.open(put('overlap.bin', twice)), /overlap/);
});

test('random strided views (transposes, permutes, steps, expands; 1/2/4/8-byte elements, several tiles) gather like a naive index walk', () => {
  const rng = new Philox(99);
  const rand = (n: number): number => rng.int(n);
  const classes: [string, number][] = [['CharStorage', 1], ['ShortStorage', 2], ['FloatStorage', 4], ['LongStorage', 8]];
  const specs: TensorSpec[] = [];
  const storages: Record<string, Uint8Array> = {};
  const naive: Buffer[] = [];
  for (let t = 0; t < 32; t++) {
    const [cls, es] = classes[t % 4];
    // The first four: [150, 130] transposes (3×3 tiles, partial edges) of every element size.
    const nd = t < 4 ? 2 : 1 + rand(4);
    const shape = t < 4 ? [150, 130] : Array.from({ length: nd }, () => 1 + rand(nd <= 2 ? 150 : 12));
    // Strides of a random permutation of a contiguous layout, with an occasional step or zero (expand).
    const perm = t < 4 ? [1, 0] : Array.from({ length: nd }, (_, i) => i).sort(() => rand(3) - 1);
    const stride = new Array<number>(nd).fill(0);
    let acc = 1;
    for (let i = nd - 1; i >= 0; i--) {
      const d = perm[i];
      stride[d] = t < 4 ? acc : rand(6) === 0 ? 0 : acc * (rand(4) === 0 ? 2 : 1);
      acc *= shape[d] * (t < 4 ? 1 : 2);
    }
    const offset = rand(5);
    let last = offset;
    for (let d = 0; d < nd; d++) last += (shape[d] - 1) * stride[d];
    const numel = last + 1 + rand(3);
    const data = Uint8Array.from({ length: numel * es }, () => rand(256));
    storages[String(t)] = data;
    specs.push({ name: `t${t}`, cls, key: String(t), numel, offset, size: shape, stride });
    const out: Buffer[] = [];
    const idx = new Array<number>(nd).fill(0);
    const total = shape.reduce((a, b) => a * b, 1);
    for (let e = 0; e < total; e++) {
      let at = offset;
      for (let d = 0; d < nd; d++) at += idx[d] * stride[d];
      out.push(Buffer.from(data.subarray(at * es, (at + 1) * es)));
      for (let d = nd - 1; d >= 0; d--) { if (++idx[d] < shape[d]) break; idx[d] = 0; }
    }
    naive.push(Buffer.concat(out));
  }
  const f = TorchBinFile.open(writeCheckpoint(stateDictPickle(specs), storages));
  specs.forEach((s, t) => assert.deepEqual(Buffer.from(f.readRaw(s.name)), naive[t], `${s.name} [${s.size}] stride (${s.stride})`));
  f.close();
});
