// PyTorch `.bin` checkpoints (torch.save, torch >= 1.6 zip serialization) read without Python and without
// running anything from the file: ChatGLM2-6B and other older HF models ship only these.
//
// Layout: a ZIP (common/torchbin/zip.ts) holding `<archive>/data.pkl` (the pickled state dict),
// `<archive>/data/<key>` (one member per storage: the raw little-endian elements), `<archive>/version` and,
// from torch 1.10, `<archive>/byteorder`. The pickle (common/torchbin/pickle.ts, a restricted machine with
// an allow-list of globals) yields name → tensor, each tensor a strided view (offset, size, stride in
// elements) of a storage named by a persistent id ('storage', torch.HalfStorage, key, location, numel).
//
// Opening reads the central directory and the pickle and validates every view against its storage member;
// tensor bytes are read on demand with positioned reads: one range for a contiguous view, the view's span
// plus a row-major gather for transposed/strided ones. The API mirrors SafetensorsFile, so ModelWeights
// serves a directory of `.bin` shards exactly as it serves safetensors.

import fs from 'node:fs';
import { FormatError, ShapeError, UnsupportedError } from './errors.ts';
import { bf16ToF32, f16ToF32 } from './halfprec.ts';
import type { StDtype, TensorInfo } from './safetensors.ts';
import { kindOf, PDict, PTensor, PTuple, PGlobal, STORAGE_CLASSES, unpickle, type PExternal, type PValue } from './torchbin/pickle.ts';
import { readAt, ZipArchive, type ZipMember } from './torchbin/zip.ts';

/** torch.*Storage class → dtype and element size. */
const STORAGE_DTYPE: Record<string, { dtype: StDtype; size: number }> = {
  HalfStorage: { dtype: 'F16', size: 2 }, BFloat16Storage: { dtype: 'BF16', size: 2 }, FloatStorage: { dtype: 'F32', size: 4 },
  DoubleStorage: { dtype: 'F64', size: 8 }, LongStorage: { dtype: 'I64', size: 8 }, IntStorage: { dtype: 'I32', size: 4 },
  ShortStorage: { dtype: 'I16', size: 2 }, CharStorage: { dtype: 'I8', size: 1 }, ByteStorage: { dtype: 'U8', size: 1 },
  BoolStorage: { dtype: 'BOOL', size: 1 },
};
/** data.pkl of a state dict is a few hundred bytes per tensor; anything near this is not a state dict. */
const MAX_PICKLE_BYTES = 256 << 20;
/** Largest expanded (stride-0) view readRaw materializes. */
const MAX_EXPANDED_BYTES = 256 << 20;
const CONVERT_HINT = 'or, if you trust the file, convert them to safetensors once in Python: '
  + 'AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)';

/** A storage resolved from a persistent id: its zip member and element type. */
interface Storage extends PExternal {
  key: string;
  dtype: StDtype;
  elemSize: number;
  numel: number;
  member: ZipMember;
}

/** One tensor: a view of a storage (all counts in elements). */
interface TorchTensor {
  storage: Storage;
  offset: number;
  shape: number[];
  stride: number[];
  numel: number;
  contiguous: boolean;
}

/** One open `.bin` checkpoint: central directory and pickle in memory, tensor bytes read on demand. */
export class TorchBinFile {
  readonly path: string;
  private zip: ZipArchive | null;
  private readonly tensors: Map<string, TorchTensor>;

  private constructor(p: string, zip: ZipArchive, tensors: Map<string, TorchTensor>) {
    this.path = p;
    this.zip = zip;
    this.tensors = tensors;
  }

  /**
   * Opens and validates a checkpoint: reads the zip directory and runs the restricted unpickler; no tensor
   * data is read. FormatError for anything malformed or not a plain state dict (the message says which
   * global was refused); UnsupportedError for the legacy (pre-1.6) format and big-endian checkpoints.
   */
  static open(p: string): TorchBinFile {
    let fd: number;
    try {
      fd = fs.openSync(p, 'r');
    } catch (e) {
      throw new FormatError(`cannot open PyTorch checkpoint ${p}: ${(e as Error).message}`, { cause: e });
    }
    try {
      const zip = openZip(fd, p);
      return new TorchBinFile(p, zip, readStateDict(zip));
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** Tensor names in the state dict's order. */
  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /**
   * dtype, shape, byteLength (of the row-major result readRaw returns). `fileOffset` is where the bytes lie in
   * the file when the view is contiguous and STORED, and -1 when they must be gathered or inflated.
   */
  info(name: string): TensorInfo {
    const t = this.tensor(name);
    const direct = t.contiguous && t.storage.member.method === 0;
    return {
      name, dtype: t.storage.dtype, shape: [...t.shape], byteLength: t.numel * t.storage.elemSize, file: this.path,
      fileOffset: direct ? t.storage.member.dataOffset + t.offset * t.storage.elemSize : -1,
    };
  }

  /** The tensor's elements in row-major order as little-endian bytes, in a fresh ArrayBuffer (byteOffset 0). */
  readRaw(name: string): Uint8Array {
    const t = this.tensor(name);
    const out = new Uint8Array(t.numel * t.storage.elemSize);
    this.readInto(name, t, out);
    return out;
  }

  /** Reads the tensor into `dst` (exactly byteLength bytes), e.g. a reused staging buffer. */
  readRawInto(name: string, dst: Uint8Array): void {
    const t = this.tensor(name);
    if (dst.byteLength !== t.numel * t.storage.elemSize) {
      throw new ShapeError(`${this.path}: tensor '${name}' has ${t.numel * t.storage.elemSize} bytes, destination has ${dst.byteLength}`);
    }
    this.readInto(name, t, dst);
  }

  /** The tensor as float32, converted from any dtype (F64 rounds, I64 beyond 2^24 loses precision). */
  readF32(name: string): Float32Array {
    const t = this.tensor(name);
    if (t.storage.dtype === 'F32') {
      const out = new Float32Array(t.numel);
      this.readInto(name, t, new Uint8Array(out.buffer));
      return out;
    }
    const raw = this.readRaw(name);
    switch (t.storage.dtype) {
      case 'F16': return f16ToF32(new Uint16Array(raw.buffer));
      case 'BF16': return bf16ToF32(new Uint16Array(raw.buffer));
      case 'F64': return Float32Array.from(new Float64Array(raw.buffer));
      case 'I64': return Float32Array.from(new BigInt64Array(raw.buffer), (v) => Number(v));
      case 'I32': return Float32Array.from(new Int32Array(raw.buffer));
      case 'I16': return Float32Array.from(new Int16Array(raw.buffer));
      case 'I8': return Float32Array.from(new Int8Array(raw.buffer));
      case 'U8': return Float32Array.from(raw);
      default: return Float32Array.from(raw, (b) => (b !== 0 ? 1 : 0)); // BOOL
    }
  }

  /** The tensor as int32, from an integer or BOOL tensor; I64 values must fit in int32. */
  readI32(name: string): Int32Array {
    const t = this.tensor(name);
    switch (t.storage.dtype) {
      case 'I32': {
        const out = new Int32Array(t.numel);
        this.readInto(name, t, new Uint8Array(out.buffer));
        return out;
      }
      case 'I64': {
        const src = new BigInt64Array(this.readRaw(name).buffer);
        const out = new Int32Array(t.numel);
        for (let i = 0; i < t.numel; i++) {
          const v = src[i];
          if (v > 2147483647n || v < -2147483648n) throw new FormatError(`${this.path}: tensor '${name}' (I64) element ${i} = ${v} does not fit in int32`);
          out[i] = Number(v);
        }
        return out;
      }
      case 'I16': return Int32Array.from(new Int16Array(this.readRaw(name).buffer));
      case 'I8': return Int32Array.from(new Int8Array(this.readRaw(name).buffer));
      case 'U8': return Int32Array.from(this.readRaw(name));
      case 'BOOL': return Int32Array.from(this.readRaw(name), (b) => (b !== 0 ? 1 : 0));
      default:
        throw new UnsupportedError(`${this.path}: tensor '${name}' is ${t.storage.dtype}; readI32 reads integer tensors only`, { hint: 'use readF32' });
    }
  }

  close(): void {
    if (this.zip !== null) {
      fs.closeSync(this.zip.fd);
      this.zip = null;
    }
  }

  private tensor(name: string): TorchTensor {
    const t = this.tensors.get(name);
    if (!t) throw new FormatError(`${this.path}: no tensor named '${name}'`, { hint: `the file has ${this.tensors.size} tensors; check the name (and the model architecture)` });
    return t;
  }

  private readInto(name: string, t: TorchTensor, dst: Uint8Array): void {
    if (this.zip === null) throw new FormatError(`${this.path}: read of '${name}' after close()`);
    if (t.numel === 0) return;
    const es = t.storage.elemSize;
    if (t.contiguous) {
      this.zip.read(t.storage.member, t.offset * es, (t.offset + t.numel) * es, dst);
      return;
    }
    // Strided view: read the span it touches (never more than its storage), then gather row-major.
    let last = t.offset;
    for (let d = 0; d < t.shape.length; d++) last += (t.shape[d] - 1) * t.stride[d];
    const span = this.zip.read(t.storage.member, t.offset * es, (last + 1) * es);
    gather(span, dst, es, t.shape, t.stride);
  }
}

/** Tile edge for gathering 2-D views: 64×64 elements keep both the source and destination lines in cache. */
const TILE = 64;

/**
 * Copies the strided view (offset 0 of `src`) into `dst` row-major. [shape] elements of `es` bytes.
 * Elements move as 1/2/4-byte words (8-byte elements as two 4-byte words), never through JS numbers,
 * so NaN payloads survive bit for bit. The last two dims are copied row by row when rows are contiguous,
 * else in TILE×TILE blocks (a transposed weight read element by element misses the cache on every read).
 */
function gather(src: Uint8Array, dst: Uint8Array, es: number, shape: readonly number[], stride: readonly number[]): void {
  const w = Math.min(es, 4);
  const k = es / w; // words per element
  const view = (a: Uint8Array): Uint8Array | Uint16Array | Uint32Array =>
    w === 1 ? a : w === 2 ? new Uint16Array(a.buffer, a.byteOffset, a.byteLength / 2) : new Uint32Array(a.buffer, a.byteOffset, a.byteLength / 4);
  // Views need aligned offsets: copy to a fresh buffer if the caller's is not.
  const aligned = dst.byteOffset % w === 0 ? dst : new Uint8Array(dst.byteLength);
  const s = view(src.byteOffset % w === 0 ? src : src.slice());
  const o = view(aligned);
  const nd = shape.length;
  // Treat the view as [outer..., R, C]; a 1-D view is [1, C].
  const R = nd >= 2 ? shape[nd - 2] : 1;
  const C = shape[nd - 1];
  const sr = (nd >= 2 ? stride[nd - 2] : 0) * k; // in words
  const sc = stride[nd - 1] * k;
  const outer = shape.slice(0, Math.max(0, nd - 2));
  const idx = new Array<number>(outer.length).fill(0);
  let base = 0; // element index of the current [R, C] block's first element
  let q0 = 0; // its first word in the output
  for (;;) {
    const b = base * k;
    if (sc === k) {
      for (let i = 0; i < R; i++) o.set(s.subarray(b + i * sr, b + i * sr + C * k), q0 + i * C * k);
    } else {
      for (let i0 = 0; i0 < R; i0 += TILE) {
        const i1 = Math.min(R, i0 + TILE);
        for (let j0 = 0; j0 < C; j0 += TILE) {
          const j1 = Math.min(C, j0 + TILE);
          for (let i = i0; i < i1; i++) {
            let p = b + i * sr + j0 * sc;
            let q = q0 + (i * C + j0) * k;
            if (k === 1) {
              for (let j = j0; j < j1; j++, p += sc) o[q++] = s[p];
            } else {
              for (let j = j0; j < j1; j++, p += sc) { o[q++] = s[p]; o[q++] = s[p + 1]; }
            }
          }
        }
      }
    }
    q0 += R * C * k;
    // Odometer over the outer dims, last fastest.
    let d = outer.length - 1;
    for (; d >= 0; d--) {
      idx[d]++;
      base += stride[d];
      if (idx[d] < outer[d]) break;
      base -= stride[d] * outer[d];
      idx[d] = 0;
    }
    if (d < 0) break;
  }
  if (aligned !== dst) dst.set(aligned);
}

/** Opens the zip, or explains why the file is not a checkpoint this reader handles. */
function openZip(fd: number, p: string): ZipArchive {
  const head = new Uint8Array(Math.min(fs.fstatSync(fd).size, 512));
  readAt(fd, head, 0, p);
  const isZip = head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && (head[2] === 3 || head[2] === 5);
  if (!isZip) {
    // torch < 1.6 wrote a pickle stream (PROTO 2, then LONG1 of the magic number 0x1950a86a20f9469cfc6c);
    // torch < 0.4 a tar archive. Neither is read; the user re-saves with any torch since 1.6.
    const legacyPickle = head.length >= 2 && head[0] === 0x80 && head[1] <= 5;
    const tar = head.length >= 262 && new TextDecoder().decode(head.subarray(257, 262)) === 'ustar';
    if (legacyPickle || tar) {
      throw new UnsupportedError(`${p}: legacy PyTorch checkpoint (${tar ? 'tar' : 'pre-1.6 pickle'} format); only the zip format of torch >= 1.6 is read`, {
        hint: `re-save it with a modern torch (torch.save(torch.load(f), f)), ${CONVERT_HINT}`,
      });
    }
    throw new UnsupportedError(`${p}: not a PyTorch zip checkpoint (it does not start with a zip header)`, { hint: `check the download, ${CONVERT_HINT}` });
  }
  return ZipArchive.read(fd, p);
}

/** Runs data.pkl through the restricted unpickler and validates every tensor view. */
function readStateDict(zip: ZipArchive): Map<string, TorchTensor> {
  const p = zip.file;
  // torch names the archive's top folder after the file (or 'archive'); it is whatever holds data.pkl.
  const pkls = [...zip.members.keys()].filter((m) => /^[^/]+\/data\.pkl$/.test(m));
  if (pkls.length !== 1) {
    throw new FormatError(`${p}: ${pkls.length === 0 ? 'no <archive>/data.pkl member' : `${pkls.length} data.pkl members`}: not a torch.save checkpoint`, {
      hint: 'TorchScript (torch.jit.save) archives are not state dicts; save model.state_dict() with torch.save',
    });
  }
  const prefix = pkls[0].slice(0, -'data.pkl'.length);
  const bo = zip.members.get(`${prefix}byteorder`);
  if (bo) {
    const order = new TextDecoder().decode(zip.read(bo, 0, Math.min(bo.size, 16)));
    if (order !== 'little') throw new UnsupportedError(`${p}: storages are ${JSON.stringify(order)}-endian; only little-endian checkpoints are read`, { hint: `re-save it on a little-endian machine, ${CONVERT_HINT}` });
  }
  const pm = zip.members.get(pkls[0]) as ZipMember;
  if (pm.size > MAX_PICKLE_BYTES) throw new FormatError(`${p}: data.pkl is ${pm.size} bytes (limit ${MAX_PICKLE_BYTES}); not a plain state dict`);
  const pickle = zip.read(pm, 0, pm.size);

  const storages = new Map<string, Storage>();
  const persistentLoad = (pid: PValue): PValue => {
    // ('storage', torch.<Type>Storage, key, location, numel)
    if (!(pid instanceof PTuple) || pid.items.length !== 5 || pid.items[0] !== 'storage') {
      throw new FormatError(`${p}: persistent id is ${kindOf(pid)}, not ('storage', type, key, location, numel)`);
    }
    const [, cls, key, , numel] = pid.items;
    if (!(cls instanceof PGlobal) || cls.module !== 'torch' || !STORAGE_CLASSES.has(cls.name)) {
      throw new FormatError(`${p}: storage type is ${kindOf(cls)}, not a torch.*Storage class`);
    }
    if (typeof key !== 'string' || key.length === 0 || key.length > 256) throw new FormatError(`${p}: storage key is ${kindOf(key)}`);
    if (typeof numel !== 'number' || !Number.isSafeInteger(numel) || numel < 0) throw new FormatError(`${p}: storage '${key}' has ${kindOf(numel)} elements`);
    const { dtype, size } = STORAGE_DTYPE[cls.name];
    const seen = storages.get(key);
    if (seen) {
      if (seen.dtype !== dtype || seen.numel !== numel) throw new FormatError(`${p}: storage '${key}' is described twice, differently`);
      return seen;
    }
    const member = zip.members.get(`${prefix}data/${key}`);
    if (!member) throw new FormatError(`${p}: storage '${key}' has no member ${prefix}data/${key}`, { hint: 'the file is truncated or corrupt' });
    if (member.size !== numel * size) {
      throw new FormatError(`${p}: storage '${key}' holds ${numel} ${dtype} elements (${numel * size} bytes) but its member has ${member.size} bytes`, { hint: 'the file is corrupt' });
    }
    const s: Storage = { external: true, key, dtype, elemSize: size, numel, member };
    storages.set(key, s);
    return s;
  };
  const root = unpickle(pickle, `${p} (data.pkl)`, persistentLoad);
  if (!(root instanceof PDict)) {
    throw new FormatError(`${p}: the pickle holds ${kindOf(root)}, not a state dict`, { hint: 'save model.state_dict() (a dict of tensors) with torch.save' });
  }
  const out = new Map<string, TorchTensor>();
  for (const [name, v] of root.map) {
    if (typeof name !== 'string') throw new FormatError(`${p}: state dict key ${kindOf(name)} is not a string`);
    if (!(v instanceof PTensor)) {
      throw new FormatError(`${p}: state dict entry '${name}' is ${kindOf(v)}, not a tensor`, { hint: 'only flat state dicts (name → tensor) are read; save model.state_dict()' });
    }
    out.set(name, checkView(p, name, v));
  }
  return out;
}

/** Validates a view against its storage: every element it touches lies inside the storage. */
function checkView(p: string, name: string, v: PTensor): TorchTensor {
  const storage = v.storage as Storage;
  let numel = 1;
  for (const d of v.shape) {
    numel *= d;
    if (numel > Number.MAX_SAFE_INTEGER) throw new FormatError(`${p}: tensor '${name}' shape [${v.shape.join(', ')}] has too many elements`);
  }
  if (numel > 0) {
    let last = v.offset;
    for (let d = 0; d < v.shape.length; d++) last += (v.shape[d] - 1) * v.stride[d];
    if (!Number.isSafeInteger(last) || last >= storage.numel) {
      throw new FormatError(`${p}: tensor '${name}' [${v.shape.join(', ')}] with stride (${v.stride.join(', ')}) at offset ${v.offset} reaches element ${last} of a ${storage.numel}-element storage`, {
        hint: 'the file is corrupt or hostile',
      });
    }
  }
  // A view never needs more elements than its storage holds, except an expanded one (stride 0); those are
  // materialized by readRaw, so a hostile [1e6, 1e6] expand of one element must not become a 4 TB allocation.
  if (numel > storage.numel && numel * storage.elemSize > MAX_EXPANDED_BYTES) {
    throw new FormatError(`${p}: tensor '${name}' [${v.shape.join(', ')}] with stride (${v.stride.join(', ')}) repeats its ${storage.numel}-element storage into ${numel} elements`, {
      hint: 'expanded views larger than 256 MiB are not materialized; save t.contiguous() instead',
    });
  }
  // Row-major contiguous, ignoring the strides of size-1 dims (torch gives them arbitrary values).
  let contiguous = true;
  let expect = 1;
  for (let d = v.shape.length - 1; d >= 0; d--) {
    if (v.shape[d] === 1) continue;
    if (v.stride[d] !== expect) { contiguous = false; break; }
    expect *= v.shape[d];
  }
  return { storage, offset: v.offset, shape: [...v.shape], stride: [...v.stride], numel, contiguous };
}
