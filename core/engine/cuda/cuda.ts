// The `cuda` Backend: bf16 activations, f32 LoRA weights / gradients / optimizer state, fp32 accumulation.
// Thin TypeScript over the addon (native.ts): shapes are checked here, kernels run there, queued on one CUDA
// stream; only download / sumSquares / crossEntropy / embedding (id check) wait for the GPU.
//
// Memory: every tensor is one block of the addon's caching pool (freed blocks are reused, not returned to the
// driver), so a training step that frees what it allocates leaves memoryInUse() flat. reshape() aliases
// (free exactly one alias), rows() views (free is a no-op; the view dies with its parent).
//
// dtype policy: matmul of two tensors of one dtype runs in that dtype (bf16 → tensor cores, f32 → exact fp32),
// except f32 × f32 into a bf16 `out`, which runs on bf16 operands; a mixed bf16 × f32 product (activations × LoRA
// weights) rounds the f32 operand to bf16 first, as PyTorch autocast does, and returns f32 unless `out` says
// otherwise. Ops whose kernels are bf16-only (attention)
// convert f32 inputs on the fly.

import type { AdamWHyper, AllocationTracker, AttentionSaved, Backend, DType, DropoutKey, Nf4Weight, QuantizedTensor, Tensor } from '../backend.ts';
import { BackendError, OUT_OF_MEMORY_CODE, OutOfMemoryError, ShapeError, check } from '../../../common/errors.ts';
import { DYNAMIC_SIGNED_MAP, NESTED_BLOCKSIZE, NF4_TABLE, checkFiniteWeight, type QuantizeNf4Options } from '../nf4.ts';
import { DTYPE_BYTES, DTYPE_CODE, NULL_PTR, loadNative, offsetPtr, type DeviceInfo, type DevicePtr, type NativeAddon, type PoolStats } from './native.ts';

/** One device allocation; aliases and views share it. */
class Storage {
  freed = false;
  constructor(readonly ptr: DevicePtr, readonly bytes: number) {}
}

export class CudaTensor implements Tensor {
  readonly size: number;
  constructor(
    readonly storage: Storage,
    /** Byte offset into the storage (rows() views). */
    readonly offset: number,
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** rows() views: free() is a no-op. */
    readonly isView = false,
  ) {
    this.size = shapeSize(shape);
  }
  /** Device address of element 0; throws after free. */
  get ptr(): DevicePtr {
    if (this.storage.freed) {
      throw new BackendError(`cuda tensor [${this.shape.join(', ')}] ${this.dtype} used after free`, {
        hint: 'a tensor (or an alias/view of it) was passed to backend.free() and then used again',
      });
    }
    return offsetPtr(this.storage.ptr, this.offset);
  }
  get bytes(): number {
    return this.size * DTYPE_BYTES[this.dtype];
  }
}

/** An NF4 weight on the device: packed codes + (double-quantized) block scales; no full-precision copy. */
class CudaQuantized implements QuantizedTensor {
  constructor(
    readonly shape: readonly [number, number],
    readonly bytes: number,
    readonly parts: { packed: CudaTensor; absmax: CudaTensor; nestedAbsmax?: CudaTensor; nestedMap?: CudaTensor; quantMap: CudaTensor },
    readonly offset: number,
    readonly blocksize: number,
    readonly nestedBlocksize: number,
  ) {}
  freed = false;
}

function shapeSize(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new ShapeError(`bad tensor shape [${shape.join(', ')}]: dims must be non-negative integers`);
    n *= d;
  }
  return n;
}

const FLOAT_DTYPES = new Set<DType>(['f32', 'bf16']);

export interface CudaBackendOptions {
  /** CUDA device ordinal (default 0, or DQLORA_CUDA_DEVICE). */
  device?: number;
  /**
   * A budget for the pool's live bytes below the device's memory (createBackend passes DQLORA_MEM_LIMIT_BYTES): an
   * allocation beyond it fails as a full device would (after giving the cached blocks back), with OutOfMemoryError.
   */
  memoryLimitBytes?: number;
}

export class CudaBackend implements Backend {
  readonly name = 'cuda' as const;
  readonly actDtype: DType = 'bf16';
  private warnedDoubleFree = false;
  /** Storages allocated while a tracker runs (trackAllocations). */
  private tracked?: Set<Storage>;

  constructor(private readonly nat: NativeAddon, readonly info: DeviceInfo, readonly device = 0, private limit?: number) {}

  /** The pool's budget (CudaBackendOptions.memoryLimitBytes); undefined = the device's memory. */
  get memoryLimitBytes(): number | undefined { return this.limit; }
  /** Sets or lifts (undefined) the budget of the process-wide pool (benchmarks rehearse a smaller card with it). */
  setMemoryLimit(bytes: number | undefined): void {
    if (bytes !== undefined && !(Number.isSafeInteger(bytes) && bytes > 0)) throw new BackendError(`memoryLimitBytes must be a positive integer, got ${bytes}`);
    this.nat.poolSetLimit(bytes ?? 0);
    this.limit = bytes;
  }

  // ---- memory -------------------------------------------------------------------------------------
  private alloc(shape: readonly number[], dtype: DType): CudaTensor {
    if (dtype === 'f16') throw new BackendError('the cuda backend does not compute in f16', { hint: "use 'bf16' or 'act'" });
    const t = shapeSize(shape) * DTYPE_BYTES[dtype];
    let ptr: DevicePtr;
    try {
      ptr = this.nat.alloc(t);
    } catch (e) {
      // The pool has already waited for the stream, given its cached blocks back and tried again (src/runtime.cu).
      if ((e as { code?: unknown }).code !== OUT_OF_MEMORY_CODE) throw e;
      const st = this.nat.poolStats();
      throw new OutOfMemoryError(`cuda:${this.device}`, t, st.inUse, this.memoryLimitBytes, { detail: `[${shape.join(', ')}] ${dtype}; ${(e as Error).message.replace(/^dqlora cuda: /, '')}`, cause: e });
    }
    const storage = new Storage(ptr, t);
    this.tracked?.add(storage);
    return new CudaTensor(storage, 0, [...shape], dtype);
  }

  private resolve(dtype: DType | 'act' | undefined, data?: Float32Array | Int32Array | Uint8Array): DType {
    if (dtype === 'act') return this.actDtype;
    if (dtype) return dtype;
    if (data instanceof Int32Array) return 'i32';
    if (data instanceof Uint8Array) return 'u8';
    return 'f32';
  }

  upload(data: Float32Array | Int32Array | Uint8Array | Uint16Array, shape: readonly number[], dtype?: DType | 'act'): Tensor {
    const n = shapeSize(shape);
    check(data.length === n, () => `upload: data has ${data.length} elements, shape [${shape.join(', ')}] needs ${n}`);
    if (data instanceof Uint16Array) {
      // Raw bf16 bits: copied as they are into a bf16 tensor, widened on the device into an f32 one.
      check(dtype === 'bf16' || dtype === 'act', () => `upload: a Uint16Array is raw bf16 bits, for dtype 'bf16' or 'act' (got ${dtype ?? 'none'})`);
      const dt = this.resolve(dtype);
      const t = this.alloc(shape, dt);
      if (dt === 'bf16') { this.nat.upload(t.ptr, data); return t; }
      const tmp = this.alloc(shape, 'bf16');
      this.nat.upload(tmp.ptr, data);
      this.nat.convert(tmp.ptr, DTYPE_CODE.bf16, t.ptr, DTYPE_CODE[dt], n);
      this.free(tmp);
      return t;
    }
    const dt = this.resolve(dtype, data);
    const t = this.alloc(shape, dt);
    if (dt === 'bf16') {
      check(data instanceof Float32Array, 'upload: bf16 tensors are uploaded from a Float32Array');
      const tmp = this.alloc(shape, 'f32');
      this.nat.upload(tmp.ptr, data);
      this.nat.convert(tmp.ptr, DTYPE_CODE.f32, t.ptr, DTYPE_CODE.bf16, n);
      this.free(tmp);
    } else {
      const want = dt === 'f32' ? Float32Array : dt === 'i32' ? Int32Array : Uint8Array;
      check(data instanceof want, () => `upload: a ${dt} tensor needs a ${want.name}, got ${data.constructor.name}`);
      this.nat.upload(t.ptr, data);
    }
    return t;
  }

  zeros(shape: readonly number[], dtype?: DType | 'act'): Tensor {
    const t = this.alloc(shape, this.resolve(dtype));
    this.nat.memsetZero(t.ptr, t.bytes);
    return t;
  }

  download(t: Tensor): Float32Array | Int32Array | Uint8Array {
    const ct = this.t(t);
    if (ct.dtype === 'i32') { const o = new Int32Array(ct.size); this.nat.download(ct.ptr, o); return o; }
    if (ct.dtype === 'u8') { const o = new Uint8Array(ct.size); this.nat.download(ct.ptr, o); return o; }
    const o = new Float32Array(ct.size);
    if (ct.dtype === 'f32') { this.nat.download(ct.ptr, o); return o; }
    const tmp = this.alloc(ct.shape, 'f32');
    this.nat.convert(ct.ptr, DTYPE_CODE[ct.dtype], tmp.ptr, DTYPE_CODE.f32, ct.size);
    this.nat.download(tmp.ptr, o);
    this.free(tmp);
    return o;
  }

  /**
   * download without blocking the JS thread: the copy is queued behind the work already on the stream and runs
   * on a copy stream through pinned staging (src/download_async.cpp) while later kernels are queued.
   */
  async downloadAsync(t: Tensor): Promise<Float32Array | Int32Array | Uint8Array> {
    const ct = this.t(t);
    if (ct.dtype === 'i32') { const o = new Int32Array(ct.size); await this.nat.downloadAsync(ct.ptr, o); return o; }
    if (ct.dtype === 'u8') { const o = new Uint8Array(ct.size); await this.nat.downloadAsync(ct.ptr, o); return o; }
    const o = new Float32Array(ct.size);
    if (ct.dtype === 'f32') { await this.nat.downloadAsync(ct.ptr, o); return o; }
    const tmp = this.alloc(ct.shape, 'f32');
    this.nat.convert(ct.ptr, DTYPE_CODE[ct.dtype], tmp.ptr, DTYPE_CODE.f32, ct.size);
    // The addon snapshots tmp on the stream before returning, so tmp may go back to the pool at once.
    const done = this.nat.downloadAsync(tmp.ptr, o);
    this.free(tmp);
    await done;
    return o;
  }

  async downloadActAsync(t: Tensor, alloc?: (bytes: number) => ArrayBuffer): Promise<Float32Array | Uint16Array> {
    const ct = this.t(t);
    if (ct.dtype === 'bf16') {
      const o = alloc ? new Uint16Array(alloc(2 * ct.size)) : new Uint16Array(ct.size);
      await this.nat.downloadAsync(ct.ptr, o);
      return o;
    }
    check(ct.dtype === 'f32', () => `downloadActAsync: a ${ct.dtype} tensor is not an activation (f32 or bf16)`);
    if (!alloc) return await this.downloadAsync(t) as Float32Array;
    const o = new Float32Array(alloc(4 * ct.size));
    await this.nat.downloadAsync(ct.ptr, o);
    return o;
  }

  free(t: Tensor): void {
    const ct = this.t(t, false);
    if (ct.isView) return;
    if (ct.storage.freed) {
      // Freeing two aliases of one storage is a caller bug, but harmless here: report once, do nothing.
      if (!this.warnedDoubleFree) {
        this.warnedDoubleFree = true;
        process.emitWarning(`dqlora cuda: tensor [${ct.shape.join(', ')}] freed twice (or two aliases of one storage freed)`);
      }
      return;
    }
    ct.storage.freed = true;
    this.tracked?.delete(ct.storage);
    this.nat.free(ct.storage.ptr);
  }

  reshape(t: Tensor, shape: readonly number[]): Tensor {
    const ct = this.t(t);
    check(shapeSize(shape) === ct.size, () => `reshape: [${ct.shape.join(', ')}] has ${ct.size} elements, [${shape.join(', ')}] has ${shapeSize(shape)}`);
    return new CudaTensor(ct.storage, ct.offset, [...shape], ct.dtype, ct.isView);
  }

  rows(t: Tensor, start: number, end: number): Tensor {
    const ct = this.t(t);
    const n = ct.shape[0];
    check(ct.shape.length >= 1 && Number.isInteger(start) && Number.isInteger(end) && start >= 0 && start <= end && end <= n,
      () => `rows: [${start}, ${end}) is outside the ${n} rows of [${ct.shape.join(', ')}]`);
    const rowElems = ct.size / Math.max(1, n);
    return new CudaTensor(ct.storage, ct.offset + start * rowElems * DTYPE_BYTES[ct.dtype], [end - start, ...ct.shape.slice(1)], ct.dtype, true);
  }

  memoryInUse(): number {
    return this.nat.poolStats().inUse;
  }

  memoryBudget(): number {
    return Math.min(this.memoryLimitBytes ?? Infinity, this.info.totalMemory);
  }

  trackAllocations(): AllocationTracker {
    if (this.tracked) throw new BackendError('trackAllocations: a tracker is already running on this backend');
    const set = this.tracked = new Set<Storage>();
    return {
      freeLeftovers: () => {
        let bytes = 0;
        for (const st of set) {
          if (st.freed) continue;
          st.freed = true;   // stream-ordered: a kernel still queued on the block finishes before the pool hands it out
          this.nat.free(st.ptr);
          bytes += st.bytes;
        }
        set.clear();
        return bytes;
      },
      close: () => { if (this.tracked === set) this.tracked = undefined; set.clear(); },
    };
  }

  releaseCache(): void {
    this.nat.poolTrim();
  }

  /** Allocator statistics (live, cached, peaks, device free/total). */
  poolStats(): PoolStats {
    return this.nat.poolStats();
  }
  /** Resets the peak counters (for per-phase peak memory in benchmarks). */
  resetPeak(): void {
    this.nat.poolResetPeak();
  }
  /** Returns cached free blocks to the driver. */
  trim(): void {
    this.nat.poolTrim();
  }
  /** Waits for all queued GPU work (for timing). */
  synchronize(): void {
    this.nat.synchronize();
  }

  // ---- NF4 ----------------------------------------------------------------------------------------
  uploadNf4(w: Nf4Weight): QuantizedTensor {
    const n = w.shape[0] * w.shape[1];
    check(w.packed.length === Math.ceil(n / 2), () => `uploadNf4: packed has ${w.packed.length} bytes, shape [${w.shape.join(', ')}] needs ${Math.ceil(n / 2)}`);
    check(w.absmax.length === Math.ceil(n / w.blocksize), () => `uploadNf4: absmax has ${w.absmax.length} entries, expected ${Math.ceil(n / w.blocksize)}`);
    check(w.blocksize % 2 === 0 && w.blocksize >= 2, () => `uploadNf4: blocksize ${w.blocksize} must be even`);
    check((w.absmax instanceof Uint8Array) === (w.nested !== undefined), 'uploadNf4: absmax is uint8 exactly when the nested state is present');
    const packed = this.upload(w.packed, [w.packed.length], 'u8') as CudaTensor;
    const absmax = this.upload(w.absmax, [w.absmax.length]) as CudaTensor;
    const quantMap = this.upload(w.quantMap, [16], 'f32') as CudaTensor;
    let nestedAbsmax: CudaTensor | undefined, nestedMap: CudaTensor | undefined;
    if (w.nested) {
      check(w.nested.absmax.length === Math.ceil(w.absmax.length / w.nested.blocksize), 'uploadNf4: nested absmax length does not match');
      nestedAbsmax = this.upload(w.nested.absmax, [w.nested.absmax.length], 'f32') as CudaTensor;
      nestedMap = this.upload(w.nested.quantMap, [256], 'f32') as CudaTensor;
    }
    const bytes = packed.bytes + absmax.bytes + quantMap.bytes + (nestedAbsmax?.bytes ?? 0) + (nestedMap?.bytes ?? 0);
    return new CudaQuantized([w.shape[0], w.shape[1]], bytes, { packed, absmax, quantMap, nestedAbsmax, nestedMap },
      Math.fround(w.nested?.offset ?? 0), w.blocksize, w.nested?.blocksize ?? 0);
  }

  freeQuantized(q: QuantizedTensor): void {
    const cq = this.q(q);
    cq.freed = true;
    for (const p of Object.values(cq.parts)) if (p) this.free(p);
  }

  private dequantInto(q: CudaQuantized, out: CudaTensor): void {
    const p = q.parts;
    this.nat.nf4Dequant(p.packed.ptr, p.absmax.ptr, p.nestedAbsmax !== undefined, p.nestedAbsmax?.ptr ?? NULL_PTR,
      p.nestedMap?.ptr ?? NULL_PTR, q.offset, p.quantMap.ptr, q.shape[0] * q.shape[1], q.blocksize, q.nestedBlocksize,
      out.ptr, DTYPE_CODE[out.dtype]);
  }

  dequantize(q: QuantizedTensor): Tensor {
    const cq = this.q(q);
    const out = this.alloc(cq.shape, 'f32');
    this.dequantInto(cq, out);
    return out;
  }

  /**
   * ≈256 MB of bf16 logits per chunk: each chunk costs a host sync (crossEntropy returns numbers) and small GEMMs
   * run far below peak here.
   */
  logitsChunkRows(vocabSize: number): number { return Math.max(1, Math.floor((1 << 27) / vocabSize)); }

  /**
   * NF4 quantization on the GPU, bit-identical to quantizeNf4 of core/engine/nf4.ts (same codes, absmax,
   * offset and nested codes). w [out·in] row-major float32 → a host Nf4Weight.
   */
  quantizeNf4(w: Float32Array, shape: readonly [number, number], opts: QuantizeNf4Options = {}): Nf4Weight {
    const bs = opts.blocksize ?? 64;
    check(Number.isInteger(bs) && bs >= 32 && bs <= 4096 && (bs & (bs - 1)) === 0, () => `quantizeNf4: blocksize ${bs} must be a power of two in 32..4096`);
    const n = shape[0] * shape[1];
    check(n === w.length && n > 0, () => `quantizeNf4: shape [${shape.join(', ')}] does not match ${w.length} elements`);
    if (opts.nonFinite !== 'kernel') checkFiniteWeight(w, shape, opts.name); // as the cpu path: NaN is refused
    const nb = Math.ceil(n / bs);
    const x = this.upload(w, [n], 'f32') as CudaTensor;
    const packedD = this.alloc([Math.ceil(n / 2)], 'u8');
    const absmaxD = this.alloc([nb], 'f32');
    try {
      this.nat.nf4Quantize(x.ptr, DTYPE_CODE.f32, n, bs, packedD.ptr, absmaxD.ptr);
      const packed = this.download(packedD) as Uint8Array;
      const absmax = this.download(absmaxD) as Float32Array;
      const base = { shape: [shape[0], shape[1]] as const, packed, blocksize: bs, quantMap: NF4_TABLE.slice(), sourceDtype: opts.sourceDtype ?? 'float32' };
      if (opts.doubleQuant === false) return { ...base, absmax };
      // offset exactly as nf4.ts: sequential float64 sum, one rounding to float32.
      let sum = 0;
      for (let i = 0; i < nb; i++) sum += absmax[i];
      const offset = Math.fround(sum / nb);
      if (!Number.isFinite(offset)) throw new BackendError('quantizeNf4: the weight contains ±Infinity, so its block scales cannot be double-quantized');
      const map = this.upload(DYNAMIC_SIGNED_MAP, [256], 'f32') as CudaTensor;
      const codes = this.alloc([nb], 'u8');
      const nested = this.alloc([Math.ceil(nb / NESTED_BLOCKSIZE)], 'f32');
      try {
        this.nat.nf4DoubleQuant(absmaxD.ptr, nb, offset, map.ptr, NESTED_BLOCKSIZE, codes.ptr, nested.ptr);
        return {
          ...base,
          absmax: this.download(codes) as Uint8Array,
          nested: { absmax: this.download(nested) as Float32Array, quantMap: DYNAMIC_SIGNED_MAP.slice(), blocksize: NESTED_BLOCKSIZE, offset },
        };
      } finally {
        this.free(map); this.free(codes); this.free(nested);
      }
    } finally {
      this.free(x); this.free(packedD); this.free(absmaxD);
    }
  }

  // ---- linear algebra -----------------------------------------------------------------------------
  matmul(a: Tensor, b: Tensor, opts: { transA?: boolean; transB?: boolean; alpha?: number; out?: Tensor; accumulate?: boolean } = {}): Tensor {
    const ca = this.t(a), cb = this.t(b);
    const transA = opts.transA ?? false, transB = opts.transB ?? false;
    check(cb.shape.length === 2, () => `matmul: b must be 2-D, got [${cb.shape.join(', ')}]`);
    check(ca.shape.length >= 2, () => `matmul: a must be at least 2-D, got [${ca.shape.join(', ')}]`);
    // a's leading dims flatten into rows (x [B, T, H] is [B·T, H]); with transA a must be 2-D.
    check(!transA || ca.shape.length === 2, 'matmul: transA needs a 2-D a');
    const aCols = ca.shape[ca.shape.length - 1], aRows = ca.size / Math.max(1, aCols);
    const M = transA ? aCols : aRows, K = transA ? aRows : aCols;
    const Kb = transB ? cb.shape[1] : cb.shape[0], N = transB ? cb.shape[0] : cb.shape[1];
    check(K === Kb, () => `matmul: inner dims differ: a [${ca.shape.join(', ')}]${transA ? 'ᵀ' : ''} · b [${cb.shape.join(', ')}]${transB ? 'ᵀ' : ''}`);
    check(FLOAT_DTYPES.has(ca.dtype) && FLOAT_DTYPES.has(cb.dtype), () => `matmul: float tensors only (got ${ca.dtype}, ${cb.dtype})`);
    const outShape = transA || ca.shape.length === 2 ? [M, N] : [...ca.shape.slice(0, -1), N];
    let out: CudaTensor;
    if (opts.out) {
      out = this.t(opts.out);
      check(out.size === M * N && FLOAT_DTYPES.has(out.dtype), () => `matmul: out [${out.shape.join(', ')}] ${out.dtype} cannot hold [${M}, ${N}]`);
    } else {
      check(!opts.accumulate, 'matmul: accumulate needs an out tensor');
      out = this.alloc(outShape, ca.dtype === cb.dtype ? ca.dtype : 'f32');
    }
    const alpha = opts.alpha ?? 1, beta = opts.accumulate ? 1 : 0;
    // Mixed dtypes: round the f32 operand to bf16 (autocast semantics).
    const tmps: CudaTensor[] = [];
    const asBf16 = (x: CudaTensor): CudaTensor => {
      if (x.dtype === 'bf16') return x;
      const y = this.alloc(x.shape, 'bf16');
      this.nat.convert(x.ptr, DTYPE_CODE.f32, y.ptr, DTYPE_CODE.bf16, x.size);
      tmps.push(y);
      return y;
    };
    // f32 × f32 into a bf16 out (the LoRA branch added to a base output: u·Bᵀ, du·A) also runs on bf16 operands,
    // as autocast does: an f32 product would need an [M, N] f32 temporary plus a convert/accumulate pass, three
    // times the memory traffic of the bf16 GEMM writing (and accumulating into) the bf16 out directly.
    const ab = ca.dtype === cb.dtype && !(ca.dtype === 'f32' && out.dtype === 'bf16') ? ca.dtype : 'bf16';
    const A = ab === 'bf16' ? asBf16(ca) : ca, B = ab === 'bf16' ? asBf16(cb) : cb;
    this.nat.matmul(A.ptr, B.ptr, DTYPE_CODE[ab], out.ptr, DTYPE_CODE[out.dtype], M, N, K, transA, transB, alpha, beta);
    for (const t of tmps) this.free(t);
    return out;
  }

  /** Dequantizes w into a pooled bf16 (or x's dtype) scratch, runs fn, frees it: no full-precision copy stays. */
  private withDequant<R>(w: CudaQuantized, dtype: DType, fn: (wd: CudaTensor) => R): R {
    const wd = this.alloc(w.shape, dtype);
    try {
      this.dequantInto(w, wd);
      return fn(wd);
    } finally {
      this.free(wd);
    }
  }

  nf4Linear(x: Tensor, w: QuantizedTensor, bias?: Tensor): Tensor {
    const cx = this.t(x), cw = this.q(w);
    check(cx.shape[cx.shape.length - 1] === cw.shape[1], () => `nf4Linear: x [${cx.shape.join(', ')}] does not match W [${cw.shape.join(', ')}]`);
    const dt = cx.dtype === 'f32' ? 'f32' : 'bf16';
    const y = this.withDequant(cw, dt, (wd) => this.matmul(cx, wd, { transB: true })) as CudaTensor;
    if (bias) {
      const cb = this.t(bias);
      check(cb.size === cw.shape[0], () => `nf4Linear: bias has ${cb.size} entries, W has ${cw.shape[0]} outputs`);
      this.nat.addBias(y.ptr, DTYPE_CODE[y.dtype], cb.ptr, DTYPE_CODE[cb.dtype], y.size / cw.shape[0], cw.shape[0]);
    }
    return y;
  }

  nf4LinearBackward(dy: Tensor, w: QuantizedTensor): Tensor {
    const cdy = this.t(dy), cw = this.q(w);
    check(cdy.shape[cdy.shape.length - 1] === cw.shape[0], () => `nf4LinearBackward: dy [${cdy.shape.join(', ')}] does not match W [${cw.shape.join(', ')}]`);
    const dt = cdy.dtype === 'f32' ? 'f32' : 'bf16';
    return this.withDequant(cw, dt, (wd) => this.matmul(cdy, wd));
  }

  denseLinear(x: Tensor, w: Tensor, bias?: Tensor): Tensor {
    const cx = this.t(x), cw = this.t(w);
    check(cw.shape.length === 2 && cx.shape[cx.shape.length - 1] === cw.shape[1], () => `denseLinear: x [${cx.shape.join(', ')}] does not match W [${cw.shape.join(', ')}]`);
    const y = this.matmul(cx, cw, { transB: true }) as CudaTensor;
    if (bias) {
      const cb = this.t(bias);
      check(cb.size === cw.shape[0], () => `denseLinear: bias has ${cb.size} entries, W has ${cw.shape[0]} outputs`);
      this.nat.addBias(y.ptr, DTYPE_CODE[y.dtype], cb.ptr, DTYPE_CODE[cb.dtype], y.size / cw.shape[0], cw.shape[0]);
    }
    return y;
  }

  denseLinearBackward(dy: Tensor, w: Tensor): Tensor {
    const cdy = this.t(dy), cw = this.t(w);
    check(cw.shape.length === 2 && cdy.shape[cdy.shape.length - 1] === cw.shape[0], () => `denseLinearBackward: dy [${cdy.shape.join(', ')}] does not match W [${cw.shape.join(', ')}]`);
    return this.matmul(cdy, cw);
  }

  // ---- elementwise / reductions ------------------------------------------------------------------
  axpy(a: Tensor, b: Tensor, alpha = 1): Tensor {
    const ca = this.t(a), cb = this.t(b);
    check(ca.size === cb.size, () => `axpy: [${ca.shape.join(', ')}] and [${cb.shape.join(', ')}] differ in size`);
    this.nat.axpy(ca.ptr, this.fdt(ca), cb.ptr, this.fdt(cb), ca.size, alpha);
    return a;
  }

  scale(a: Tensor, s: number): Tensor {
    const ca = this.t(a);
    this.nat.scale(ca.ptr, this.fdt(ca), ca.size, s);
    return a;
  }

  sumSquares(t: Tensor): number {
    const ct = this.t(t);
    return this.nat.sumSquares(ct.ptr, this.fdt(ct), ct.size);
  }

  sumRows(x: Tensor): Tensor {
    const cx = this.t(x);
    const C = cx.shape[cx.shape.length - 1], N = cx.size / Math.max(1, C);
    const out = this.alloc([C], 'f32');
    this.nat.sumRows(cx.ptr, this.fdt(cx), N, C, out.ptr);
    return out;
  }

  scaleColumns(x: Tensor, v: Tensor): Tensor {
    const cx = this.t(x), cv = this.t(v);
    const C = cx.shape[cx.shape.length - 1], N = cx.size / Math.max(1, C);
    check(cv.dtype === 'f32' && cv.size === C, () => `scaleColumns: v must be f32 [${C}], got ${cv.dtype} [${cv.shape.join(', ')}]`);
    const y = this.alloc(cx.shape, cx.dtype);
    this.nat.scaleColumns(cx.ptr, y.ptr, this.fdt(cx), cv.ptr, N, C);
    return y;
  }

  columnDot(a: Tensor, b: Tensor): Tensor {
    const ca = this.t(a), cb = this.t(b);
    const C = ca.shape[ca.shape.length - 1], N = ca.size / Math.max(1, C);
    check(cb.size === ca.size && cb.shape[cb.shape.length - 1] === C, () => `columnDot: [${ca.shape.join(', ')}] and [${cb.shape.join(', ')}] differ`);
    const out = this.alloc([C], 'f32');
    this.nat.columnDot(ca.ptr, this.fdt(ca), cb.ptr, this.fdt(cb), N, C, out.ptr);
    return out;
  }

  // ---- layers -------------------------------------------------------------------------------------
  embedding(ids: Tensor, table: Tensor): Tensor {
    const ci = this.t(ids), ct = this.t(table);
    check(ci.dtype === 'i32', 'embedding: ids must be i32');
    check(ct.shape.length === 2, 'embedding: table must be [V, H]');
    const [V, H] = ct.shape;
    const out = this.alloc([ci.size, H], this.actDtype);
    const bad = this.nat.embedding(ci.ptr, ct.ptr, this.fdt(ct), out.ptr, DTYPE_CODE[out.dtype], ci.size, H, V);
    if (bad > 0) {
      this.free(out);
      throw new ShapeError(`embedding: ${bad} token id(s) outside [0, ${V})`, { hint: 'is the tokenizer from the same model as the checkpoint?' });
    }
    return out;
  }

  rmsnorm(x: Tensor, w: Tensor, eps: number): { y: Tensor; rstd: Tensor } {
    const cx = this.t(x), cw = this.t(w);
    const H = cx.shape[cx.shape.length - 1], N = cx.size / Math.max(1, H);
    check(cw.size === H, () => `rmsnorm: weight has ${cw.size} entries, x rows have ${H}`);
    const y = this.alloc(cx.shape, cx.dtype), rstd = this.alloc([N], 'f32');
    this.nat.rmsnorm(cx.ptr, this.fdt(cx), cw.ptr, this.fdt(cw), y.ptr, rstd.ptr, N, H, eps);
    return { y, rstd };
  }

  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor): Tensor {
    const cdy = this.t(dy), cx = this.t(x), cw = this.t(w), cr = this.t(rstd);
    const H = cx.shape[cx.shape.length - 1], N = cx.size / Math.max(1, H);
    check(cdy.size === cx.size && cr.size === N && cw.size === H, 'rmsnormBackward: shapes of dy, x, w, rstd do not fit');
    const [dyc, freeDy] = this.like(cdy, cx.dtype);
    const dx = this.alloc(cx.shape, cx.dtype);
    this.nat.rmsnormBackward(dyc.ptr, cx.ptr, this.fdt(cx), cw.ptr, this.fdt(cw), cr.ptr, dx.ptr, N, H);
    if (freeDy) this.free(dyc);
    return dx;
  }

  rope(x: Tensor, pos: Tensor, invFreq: Tensor, opts: { rotaryDim: number; mscale?: number; inverse?: boolean }): Tensor {
    const cx = this.t(x), cp = this.t(pos), cf = this.t(invFreq);
    check(cx.shape.length >= 3, () => `rope: x must be [N, nh, D] (or [B, T, nh, D]), got [${cx.shape.join(', ')}]`);
    const D = cx.shape[cx.shape.length - 1], nh = cx.shape[cx.shape.length - 2], N = cx.size / (D * nh);
    const rd = opts.rotaryDim;
    check(rd % 2 === 0 && rd > 0 && rd <= D, () => `rope: rotaryDim ${rd} must be even and ≤ ${D}`);
    check(cp.dtype === 'i32' && cp.size === N, () => `rope: pos must be i32 [${N}]`);
    check(cf.dtype === 'f32' && cf.size === rd / 2, () => `rope: invFreq must be f32 [${rd / 2}]`);
    const y = this.alloc(cx.shape, cx.dtype);
    this.nat.rope(cx.ptr, y.ptr, this.fdt(cx), cp.ptr, cf.ptr, N, nh, D, rd, opts.mscale ?? 1, opts.inverse ?? false);
    return y;
  }

  attention(q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, scale: number): AttentionSaved {
    const [cq, ck, cv, cm] = [this.t(q), this.t(k), this.t(v), this.t(keyMask)];
    const { B, T, Hq, Hk, D } = this.attnShape(cq, ck, cv, cm);
    const tmps: CudaTensor[] = [];
    const qb = this.bf16(cq, tmps), kb = this.bf16(ck, tmps), vb = this.bf16(cv, tmps);
    const out = this.alloc([B, T, Hq, D], 'bf16'), lse = this.alloc([B, Hq, T], 'f32');
    this.nat.attentionForward(qb.ptr, kb.ptr, vb.ptr, cm.ptr, out.ptr, lse.ptr, B, T, Hq, Hk, D, scale);
    for (const t of tmps) this.free(t);
    return { out, lse };
  }

  attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, saved: AttentionSaved, scale: number): { dq: Tensor; dk: Tensor; dv: Tensor } {
    const [cq, ck, cv, cm] = [this.t(q), this.t(k), this.t(v), this.t(keyMask)];
    const { B, T, Hq, Hk, D } = this.attnShape(cq, ck, cv, cm);
    const cdo = this.t(dout), co = this.t(saved.out), cl = this.t(saved.lse);
    check(cdo.size === cq.size && co.size === cq.size && cl.size === B * Hq * T, 'attentionBackward: dout / saved shapes do not match q');
    const tmps: CudaTensor[] = [];
    const [qb, kb, vb, dob, ob] = [cq, ck, cv, cdo, co].map((t) => this.bf16(t, tmps));
    const dq = this.alloc(cq.shape, 'bf16'), dk = this.alloc(ck.shape, 'bf16'), dv = this.alloc(cv.shape, 'bf16');
    this.nat.attentionBackward(dob.ptr, qb.ptr, kb.ptr, vb.ptr, cm.ptr, ob.ptr, cl.ptr, dq.ptr, dk.ptr, dv.ptr, B, T, Hq, Hk, D, scale);
    for (const t of tmps) this.free(t);
    return { dq, dk, dv };
  }

  swiglu(gate: Tensor, up: Tensor): Tensor {
    const cg = this.t(gate), cu = this.t(up);
    check(cg.size === cu.size && cg.dtype === cu.dtype, 'swiglu: gate and up must have one shape and dtype');
    const h = this.alloc(cg.shape, cg.dtype);
    this.nat.swiglu(cg.ptr, cu.ptr, h.ptr, this.fdt(cg), cg.size);
    return h;
  }

  swigluBackward(dh: Tensor, gate: Tensor, up: Tensor): { dgate: Tensor; dup: Tensor } {
    const cg = this.t(gate), cu = this.t(up), cdh = this.t(dh);
    check(cg.size === cu.size && cdh.size === cg.size && cg.dtype === cu.dtype, 'swigluBackward: dh, gate and up must have one shape and dtype');
    const [dhc, freeDh] = this.like(cdh, cg.dtype);
    const dgate = this.alloc(cg.shape, cg.dtype), dup = this.alloc(cg.shape, cg.dtype);
    this.nat.swigluBackward(dhc.ptr, cg.ptr, cu.ptr, dgate.ptr, dup.ptr, this.fdt(cg), cg.size);
    if (freeDh) this.free(dhc);
    return { dgate, dup };
  }

  dropout(x: Tensor, key: DropoutKey): Tensor {
    const cx = this.t(x);
    const C = cx.shape[cx.shape.length - 1], N = cx.size / Math.max(1, C);
    check(key.p >= 0 && key.p < 1, () => `dropout: p = ${key.p} must be in [0, 1)`);
    const y = this.alloc(cx.shape, cx.dtype);
    if (key.p === 0) {
      this.nat.copy(y.ptr, cx.ptr, cx.bytes);
      return y;
    }
    check(key.rowSample.length === N && key.rowPos.length === N, () => `dropout: rowSample/rowPos need ${N} entries`);
    // keep iff (word0 >> 8)·2^-24 ≥ p  ⇔  (word0 >> 8) ≥ ceil(p·2^24)  (p·2^24 is exact in float64)
    const threshold24 = Math.ceil(key.p * 16777216);
    this.nat.dropout(cx.ptr, y.ptr, this.fdt(cx), N, C, threshold24, Math.fround(1 / (1 - key.p)), key.k0 >>> 0, key.k1 >>> 0, key.stream >>> 0, key.rowSample, key.rowPos);
    return y;
  }

  crossEntropy(logits: Tensor, targets: Tensor, opts: { gradScale?: number; inPlace?: boolean } = {}): { lossSum: number; count: number; dlogits?: Tensor } {
    const cl = this.t(logits), ct = this.t(targets);
    check(ct.dtype === 'i32', 'crossEntropy: targets must be i32');
    const V = cl.shape[cl.shape.length - 1], N = cl.size / Math.max(1, V);
    check(ct.size === N, () => `crossEntropy: ${ct.size} targets for ${N} rows`);
    const want = opts.gradScale !== undefined;
    const dl = want ? (opts.inPlace ? cl : this.alloc(cl.shape, cl.dtype)) : undefined;
    const [lossSum, count, bad] = this.nat.crossEntropy(cl.ptr, this.fdt(cl), ct.ptr, N, V, want, opts.gradScale ?? 0,
      dl?.ptr ?? NULL_PTR, dl ? this.fdt(dl) : DTYPE_CODE.f32);
    if (bad > 0) {
      if (dl && dl !== cl) this.free(dl);
      throw new ShapeError(`crossEntropy: ${bad} target(s) outside [0, ${V}) and not −100`);
    }
    return dl ? { lossSum, count, dlogits: dl } : { lossSum, count };
  }

  // ---- optimizer ----------------------------------------------------------------------------------
  adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, h: AdamWHyper): void {
    const [cp, cg, cm, cv] = [this.t(param), this.t(grad), this.t(m), this.t(v)];
    check([cp, cg, cm, cv].every((t) => t.dtype === 'f32' && t.size === cp.size), 'adamw: param, grad, m, v must be f32 of one size');
    check(Number.isInteger(h.step) && h.step >= 1, () => `adamw: step ${h.step} must be a positive integer`);
    const bc1 = 1 - Math.pow(h.beta1, h.step), bc2 = 1 - Math.pow(h.beta2, h.step);
    this.nat.adamw(cp.ptr, cg.ptr, cm.ptr, cv.ptr, cp.size, h.lr, h.beta1, h.beta2, h.eps, 1 - h.lr * h.weightDecay, h.lr / bc1, Math.sqrt(bc2));
  }

  // ---- helpers ------------------------------------------------------------------------------------
  private t(x: Tensor, live = true): CudaTensor {
    if (!(x instanceof CudaTensor)) throw new BackendError('a tensor from another backend was passed to the cuda backend', { hint: 'upload it with this backend first' });
    if (live) void x.ptr; // throws after free
    return x;
  }
  private q(x: QuantizedTensor): CudaQuantized {
    if (!(x instanceof CudaQuantized)) throw new BackendError('a quantized tensor from another backend was passed to the cuda backend');
    if (x.freed) throw new BackendError(`quantized weight [${x.shape.join(', ')}] used after freeQuantized`);
    return x;
  }
  private fdt(t: CudaTensor): 0 | 1 {
    if (t.dtype === 'f32') return DTYPE_CODE.f32;
    if (t.dtype === 'bf16') return DTYPE_CODE.bf16;
    throw new BackendError(`expected a float tensor, got ${t.dtype} [${t.shape.join(', ')}]`);
  }
  /** t in dtype dt: t itself, or a converted copy (second element true: the caller frees it). */
  private like(t: CudaTensor, dt: DType): [CudaTensor, boolean] {
    if (t.dtype === dt) return [t, false];
    const y = this.alloc(t.shape, dt);
    this.nat.convert(t.ptr, this.fdt(t), y.ptr, DTYPE_CODE[dt], t.size);
    return [y, true];
  }
  private bf16(t: CudaTensor, tmps: CudaTensor[]): CudaTensor {
    const [y, tmp] = this.like(t, 'bf16');
    if (tmp) tmps.push(y);
    return y;
  }
  private attnShape(q: CudaTensor, k: CudaTensor, v: CudaTensor, m: CudaTensor): { B: number; T: number; Hq: number; Hk: number; D: number } {
    check(q.shape.length === 4 && k.shape.length === 4 && v.shape.length === 4, 'attention: q, k, v must be [B, T, H, D]');
    const [B, T, Hq, D] = q.shape;
    const Hk = k.shape[2];
    check(k.shape[0] === B && k.shape[1] === T && k.shape[3] === D && v.shape.every((d, i) => d === k.shape[i]),
      () => `attention: k [${k.shape.join(', ')}] / v [${v.shape.join(', ')}] do not fit q [${q.shape.join(', ')}]`);
    check(Hq % Hk === 0, () => `attention: ${Hq} query heads are not a multiple of ${Hk} kv heads`);
    check(m.dtype === 'i32' && m.size === B * T, () => `attention: keyMask must be i32 [${B}, ${T}]`);
    check([16, 32, 64, 128].includes(D), () => `attention: head dim ${D} is not supported by the cuda kernels (16, 32, 64, 128)`);
    return { B, T, Hq, Hk, D };
  }
}

/**
 * Creates the cuda backend. Throws BackendError with a one-line reason when the addon is not built, fails to
 * load, or no CUDA GPU is visible.
 */
export function createCudaBackend(opts: CudaBackendOptions = {}): CudaBackend {
  let nat: NativeAddon;
  try {
    nat = loadNative();
  } catch (e) {
    throw new BackendError(`cuda backend unavailable: ${String((e as Error).message).split('\n')[0]}`, {
      hint: 'build it with `node core/engine/cuda/build.mjs` on a machine with nvcc (npm ci does this), or use --device cpu',
      cause: e,
    });
  }
  const dc = nat.deviceCount();
  if (dc.count === 0) {
    throw new BackendError(`cuda backend unavailable: no CUDA GPU visible${dc.error ? ` (${dc.error})` : ''}`, { hint: 'use --device cpu' });
  }
  const device = opts.device ?? Number(process.env.DQLORA_CUDA_DEVICE ?? 0);
  if (!Number.isInteger(device) || device < 0 || device >= dc.count) {
    throw new BackendError(`cuda backend: device ${device} does not exist (${dc.count} visible)`);
  }
  const limit = opts.memoryLimitBytes;
  if (limit !== undefined && !(Number.isSafeInteger(limit) && limit > 0)) throw new BackendError(`memoryLimitBytes must be a positive integer, got ${limit}`);
  try {
    const info = nat.init(device);
    nat.poolSetLimit(limit ?? 0);
    return new CudaBackend(nat, info, device, limit);
  } catch (e) {
    throw new BackendError(`cuda backend unavailable: ${String((e as Error).message).split('\n')[0]}`, { cause: e });
  }
}
