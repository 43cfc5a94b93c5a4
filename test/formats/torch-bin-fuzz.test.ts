// Fuzzing the PyTorch .bin reader: seeded mutations and truncations of a real torch.save checkpoint, and
// random pickle streams (raw bytes and opcode soup), must each end in correct data or a FormatError /
// UnsupportedError — never another exception, a hang, or a view that reads outside its storage.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FormatError, UnsupportedError } from '../../common/errors.ts';
import { TorchBinFile } from '../../common/torch-pickle.ts';
import { unpickle, type PValue } from '../../common/torchbin/pickle.ts';
import { ZipArchive } from '../../common/torchbin/zip.ts';
import { Philox } from '../helpers/prng.ts';

const FIX = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'torch-bin');
const SOURCE = path.join(FIX, 'single', 'pytorch_model.bin');
const ELEM: Record<string, number> = { F16: 2, BF16: 2, F32: 4, F64: 8, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

function named(e: unknown): boolean {
  return e instanceof FormatError || e instanceof UnsupportedError;
}

interface Read { info: string; raw: Uint8Array }

/** Opens `file` and reads every tensor; returns infos (less the path) and bytes, or null when it was refused with a named error. */
function readAll(file: string): Map<string, Read> | null {
  let f: TorchBinFile;
  try {
    f = TorchBinFile.open(file);
  } catch (e) {
    if (!named(e)) throw e;
    return null;
  }
  const infos = new Map<string, Read>();
  try {
    for (const name of f.names()) {
      const info = f.info(name);
      const numel = info.shape.reduce((a, b) => a * b, 1);
      assert.equal(info.byteLength, numel * ELEM[info.dtype], name);
      const raw = f.readRaw(name);
      assert.equal(raw.length, info.byteLength, name);
      assert.equal(f.readF32(name).length, numel, name);
      infos.set(name, { info: JSON.stringify({ ...info, file: '' }), raw });
    }
  } catch (e) {
    if (!named(e)) throw e;
    return null;
  } finally {
    f.close();
  }
  return infos;
}

test('fuzz: 3000 seeded mutations of a torch.save checkpoint give correct-sized data or a named error', () => {
  const orig = fs.readFileSync(SOURCE);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-torchbin-fuzz-'));
  const file = path.join(dir, 'pytorch_model.bin');
  const base = readAll(SOURCE);
  assert.ok(base && base.size === 20);
  // Byte ranges of the archive: the pickle, the storages' data, and the rest (headers, directory).
  const fd = fs.openSync(SOURCE, 'r');
  const zip = ZipArchive.read(fd, SOURCE);
  fs.closeSync(fd);
  const pkl = zip.members.get('pytorch_model/data.pkl')!;
  const storage = [...zip.members.values()].filter((m) => m.name.includes('/data/')).map((m) => [m.dataOffset, m.dataOffset + m.size] as const);
  const inStorage = (i: number): boolean => storage.some(([a, b]) => i >= a && i < b);
  const rng = new Philox(20240601);
  let opened = 0, refused = 0, storageOnly = 0, checkedViews = 0;
  for (let iter = 0; iter < 3000; iter++) {
    const buf = Buffer.from(orig);
    const kind = iter % 4;
    const touched: number[] = [];
    const count = 1 + rng.int(6);
    for (let k = 0; k < count; k++) {
      // Half the mutations land in data.pkl (the unpickler's input), a quarter in storages, the rest anywhere.
      const [a, b] = storage[rng.int(storage.length)];
      const i = kind < 2 ? pkl.dataOffset + rng.int(pkl.size) : kind === 3 ? a + rng.int(Math.max(1, b - a)) : rng.int(buf.length);
      touched.push(i);
      if (kind === 0 || kind === 2) buf[i] ^= 1 << rng.int(8);
      else buf[i] = [0, 0xff, 0x7f, 0x80, rng.int(256)][rng.int(5)];
    }
    fs.writeFileSync(file, buf);
    const got = readAll(file);
    if (got === null) { refused++; continue; }
    opened++;
    // Changing bytes inside storages changes values, never the structure; a contiguous tensor's bytes are
    // then exactly the (mutated) file's bytes at its offset.
    if (touched.every(inStorage)) {
      assert.deepEqual([...got.keys()], [...base.keys()], `iteration ${iter}`);
      for (const [name, r] of got) {
        assert.equal(r.info, base.get(name)!.info, `iteration ${iter} ${name}`);
        const off = (JSON.parse(r.info) as { fileOffset: number }).fileOffset;
        if (off >= 0) assert.deepEqual(Buffer.from(r.raw), buf.subarray(off, off + r.raw.length), `iteration ${iter} ${name}`);
        else checkedViews++;
      }
      storageOnly++;
    }
  }
  // Both outcomes occur (the fuzzer is not just hitting one early check).
  assert.ok(opened > 100 && refused > 100 && storageOnly > 100 && checkedViews > 0, `opened ${opened}, refused ${refused}, storage-only ${storageOnly}`);
});

test('fuzz: every truncation of a checkpoint is refused with a named error', () => {
  const orig = fs.readFileSync(SOURCE);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-torchbin-trunc-'));
  const file = path.join(dir, 'pytorch_model.bin');
  for (let len = 0; len < orig.length; len += len < 64 ? 1 : 7) {
    fs.writeFileSync(file, orig.subarray(0, len));
    assert.equal(readAll(file), null, `length ${len}`);
  }
  // Appending garbage after the end record is refused too (the EOCD must end the file, comment included).
  fs.writeFileSync(file, Buffer.concat([orig, Buffer.from('trailing')]));
  assert.equal(readAll(file), null);
});

/** A stand-in for torch's storages, so random streams can reach the tensor rebuilding code. */
const fakeLoad = (pid: PValue): PValue => {
  if (pid === null || typeof pid !== 'object') throw new FormatError('bad persistent id');
  return { external: true };
};

test('fuzz: 20000 random pickle streams (raw bytes and opcode soup) end in a value or a FormatError', () => {
  const rng = new Philox(7);
  // Opcodes the machine knows, with argument generators (lengths sometimes lying).
  const ops: (() => number[])[] = [
    () => [0x80, 2 + rng.int(4)], () => [0x7d], () => [0x5d], () => [0x29], () => [0x28], () => [0x28], () => [0x30], () => [0x31], () => [0x32],
    () => [0x58, rng.int(4), 0, 0, 0, ...rng.bytes(rng.int(4))], () => [0x8c, 3, 0x61, 0x62, 0x63], () => [0x4b, rng.int(256)],
    () => [0x4a, ...rng.bytes(4)], () => [0x4d, ...rng.bytes(2)], () => [0x8a, rng.int(10), ...rng.bytes(rng.int(10))], () => [0x47, ...rng.bytes(8)],
    () => [0x4e], () => [0x88], () => [0x89], () => [0x74], () => [0x85], () => [0x86], () => [0x87], () => [0x6c], () => [0x64],
    () => [0x71, rng.int(4)], () => [0x94], () => [0x68, rng.int(4)], () => [0x6a, rng.int(4), 0, 0, 0], () => [0x52], () => [0x62],
    () => [0x73], () => [0x75], () => [0x61], () => [0x65], () => [0x51], () => [0x2e], () => [0x93],
    () => [0x63, ...Buffer.from('collections\nOrderedDict\n')], () => [0x63, ...Buffer.from('torch._utils\n_rebuild_tensor_v2\n')],
    () => [0x63, ...Buffer.from('torch._utils\n_rebuild_parameter\n')], () => [0x63, ...Buffer.from('torch\nFloatStorage\n')],
    () => [0x63, ...Buffer.from('os\nsystem\n')], () => [0x95, ...rng.bytes(8)], () => [rng.int(256)],
  ];
  let values = 0;
  for (let iter = 0; iter < 20000; iter++) {
    let data: Uint8Array;
    if (iter % 4 === 0) {
      data = rng.bytes(rng.int(64));
    } else {
      const parts: number[] = [0x80, 2];
      const len = 1 + rng.int(40);
      for (let k = 0; k < len; k++) parts.push(...ops[rng.int(ops.length)]());
      if (rng.int(2)) parts.push(0x2e);
      data = Uint8Array.from(parts);
    }
    try {
      unpickle(data, 'fuzz', fakeLoad);
      values++;
    } catch (e) {
      if (!(e instanceof FormatError)) throw new Error(`iteration ${iter}: ${(e as Error).stack}`);
      assert.ok(!/os\.system/.test(e.message) || /refusing to load fuzz: the pickle references os\.system/.test(e.message));
    }
  }
  assert.ok(values > 20, `only ${values} streams produced a value`);
});
