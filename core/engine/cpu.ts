// The cpu backend: float32 everywhere ('act' = 'f32'), deterministic (same inputs ⇒ same bits, whatever the
// thread count). The compute of every op (GEMMs, NF4 linear, attention, cross-entropy, dropout, and the elementwise /
// normalisation ops, adamw, embedding) goes to the optional C++ addon (core/engine/cpu-native, see cpu/native.ts)
// when it is built; everything has a TypeScript kernel too, used when the addon is missing or DQLORA_CPU_NATIVE=0,
// and the tests compare the two. free() keeps large float32 buffers for reuse by the next tensor of the same length
// (a training step repeats its shapes), so outputs skip V8's zero-fill and the page faults of fresh memory.
// Each op's forward sits directly above its backward; shape legend in backend.ts.

import { cpuThreads } from '../../common/container.ts';
import type {
  AdamWHyper, AllocationTracker, AttentionSaved, Backend, DropoutKey, DType, Nf4Weight, QuantizedTensor, Tensor,
} from './backend.ts';
import { BackendError, OutOfMemoryError, ShapeError, check } from '../../common/errors.ts';
import { philox4x32, u32ToUnit } from '../../common/rng.ts';
import { bf16ToF32 } from '../../common/halfprec.ts';
import { CpuTensor, Storage, asCpu, shapeSize, storageDtype, type CpuData } from './cpu/tensor.ts';
import { Scratch, gemmTs } from './cpu/gemm-ts.ts';
import { CpuQuantized, dequantRows } from './cpu/nf4-tiles.ts';
import { attentionBackwardTs, attentionForwardTs } from './cpu/attention-ts.ts';
import { attentionCachedTs } from './cpu/attention-cached.ts';
import { loadCpuNative, type CpuNative } from './cpu/native.ts';
import { quantizeNf4 } from './nf4.ts';

export { CpuTensor, cpuData } from './cpu/tensor.ts';
export { CpuQuantized } from './cpu/nf4-tiles.ts';

export interface CpuBackendOptions {
  /** Use the native addon when it is built (default true; DQLORA_CPU_NATIVE=0 overrides to false). */
  native?: boolean;
  /** Worker threads for native kernels (default: all cores). TS kernels are single-threaded. */
  threads?: number;
  /**
   * Bytes of freed float32 buffers kept for reuse (default 256 MiB; 0 disables). A training step allocates the same
   * shapes every time; reusing their buffers skips the zero-fill and the page faults of fresh memory.
   */
  reuseBytes?: number;
  /**
   * A budget for the bytes of live tensors (default: DQLORA_MEM_LIMIT_BYTES through createBackend, else none): an
   * allocation beyond it throws OutOfMemoryError, what a full GPU does, so the out-of-memory path (micro-batch split,
   * `micro_batch_size: auto`) runs, and is tested, on the cpu backend.
   */
  memoryLimitBytes?: number;
}

/** Smallest buffer worth keeping for reuse (smaller typed arrays are cheap V8 heap objects). */
const REUSE_MIN_ELEMENTS = 4096;

/** Rows of W dequantized per tile in the TS NF4 path: about 64 KiB of float32 scratch. */
const NF4_TILE_FLOATS = 16384;

export class CpuBackend implements Backend {
  readonly name = 'cpu' as const;
  readonly actDtype: DType = 'f32';
  /** The TypeScript quantizer (core/engine/nf4.ts) is the reference every other must match bit for bit. */
  readonly quantizeNf4 = quantizeNf4;

  /**
   * ≈16 MB of f32 logits per chunk, but at least 512 rows: the head GEMM runs well below peak on fewer rows
   * (≈110 vs ≈175 GFLOP/s at 131 vs 512 rows of V = 32000, bench/cpu-ops.ts).
   */
  logitsChunkRows(vocabSize: number): number { return Math.max(512, Math.floor((1 << 22) / vocabSize)); }
  /** The addon in use, or null for the TypeScript kernels. */
  readonly native: CpuNative | null;
  readonly threads: number;
  private bytesLive = 0;
  private bytesPeak = 0;
  /** Storages and NF4 weights allocated while a tracker runs (trackAllocations). */
  private tracked?: Set<{ freed: boolean; readonly bytes: number }>;
  private limit: number | undefined;
  private readonly scratch = new Scratch();
  private readonly philoxOut = new Uint32Array(4);
  /** Freed float32 buffers by exact length, for reuse (a step repeats the same shapes). */
  private readonly reuse = new Map<number, Float32Array[]>();
  private reuseHeld = 0;
  private readonly reuseCap: number;

  constructor(opts: CpuBackendOptions = {}) {
    this.native = opts.native === false ? null : loadCpuNative();
    // The CPUs this process may use: affinity mask and the container's cgroup CPU quota (common/container.ts).
    const cores = cpuThreads();
    this.threads = Math.max(1, Math.min(cores, opts.threads ?? cores));
    this.reuseCap = Math.max(0, opts.reuseBytes ?? 256 * 2 ** 20);
    this.setMemoryLimit(opts.memoryLimitBytes);
  }

  /** The live-tensor budget (CpuBackendOptions.memoryLimitBytes); undefined = none. */
  get memoryLimitBytes(): number | undefined { return this.limit; }
  /** Sets or lifts (undefined) the budget: tests use it to refuse allocations from an exact point of a step on. */
  setMemoryLimit(bytes: number | undefined): void {
    if (bytes !== undefined && !(Number.isSafeInteger(bytes) && bytes >= 0)) throw new BackendError(`memoryLimitBytes must be a non-negative integer, got ${bytes}`);
    this.limit = bytes;
  }

  // ---- memory -------------------------------------------------------------------------------------

  /** A zero-filled tensor. */
  private alloc(shape: readonly number[], dtype: DType | 'act' | undefined): CpuTensor {
    return this.make(shape, dtype, true);
  }

  /** A float32 tensor whose contents are unspecified (possibly a reused buffer): only for outputs the kernel writes completely. */
  private output(shape: readonly number[]): CpuTensor {
    return this.make(shape, 'f32', false);
  }

  /** output() when the native kernel computes the op, else a zero-filled alloc() (TS kernels may accumulate). */
  private out(shape: readonly number[]): CpuTensor {
    return this.make(shape, 'f32', this.native === null);
  }

  private make(shape: readonly number[], dtype: DType | 'act' | undefined, zero: boolean): CpuTensor {
    const dt = storageDtype(dtype);
    const n = shapeSize(shape);
    this.reserve(n * (dt === 'u8' ? 1 : 4));
    let data: CpuData | undefined;
    if (dt === 'f32' && n >= REUSE_MIN_ELEMENTS) {
      const list = this.reuse.get(n);
      const got = list?.pop();
      if (got) {
        this.reuseHeld -= got.byteLength;
        if (zero) got.fill(0);
        data = got;
      }
    }
    try {
      data ??= dt === 'f32' ? new Float32Array(n) : dt === 'i32' ? new Int32Array(n) : new Uint8Array(n);
    } catch (e) {
      // V8 could not get the memory ("Array buffer allocation failed"): the host is out of memory, as a GPU can be.
      if (e instanceof RangeError) throw new OutOfMemoryError('cpu', n * (dt === 'u8' ? 1 : 4), this.bytesLive, undefined, { detail: e.message, cause: e });
      throw e;
    }
    const st = new Storage(data.byteLength);
    this.bytesLive += st.bytes;
    if (this.bytesLive > this.bytesPeak) this.bytesPeak = this.bytesLive;
    this.tracked?.add(st);
    return new CpuTensor(data, shape, dt, st);
  }

  /** Refuses an allocation of `bytes` beyond memoryLimitBytes (nothing is allocated). */
  private reserve(bytes: number): void {
    const lim = this.limit;
    if (lim !== undefined && this.bytesLive + bytes > lim) throw new OutOfMemoryError('cpu', bytes, this.bytesLive, lim);
  }

  upload(data: Float32Array | Int32Array | Uint8Array | Uint16Array, shape: readonly number[], dtype?: DType | 'act'): Tensor {
    const want = dtype ?? (data instanceof Float32Array ? 'f32' : data instanceof Int32Array ? 'i32' : 'u8');
    const n = shapeSize(shape);
    check(data.length === n, () => `upload: ${data.length} elements for shape [${shape.join(', ')}] (${n})`);
    if (data instanceof Uint16Array) {
      check(dtype === 'bf16' || dtype === 'act', () => `upload: a Uint16Array is raw bf16 bits, for dtype 'bf16' or 'act' (got ${dtype ?? 'none'})`);
      data = bf16ToF32(data); // float tensors are float32 here: bf16 widens exactly
    }
    const t = this.make(shape, want, false);
    t.data.set(data);
    return t;
  }

  zeros(shape: readonly number[], dtype?: DType | 'act'): Tensor {
    return this.alloc(shape, dtype ?? 'f32');
  }

  download(t: Tensor): Float32Array | Int32Array | Uint8Array {
    return asCpu(t, 'download').data.slice();
  }

  /** Float tensors are float32 on this backend: the same as downloadAsync (into `alloc`'s memory when given). */
  downloadActAsync(t: Tensor, alloc?: (bytes: number) => ArrayBuffer): Promise<Float32Array | Uint16Array> {
    if (!alloc) return this.downloadAsync(t) as Promise<Float32Array>;
    try {
      const d = asCpu(t, 'downloadActAsync').data;
      check(d instanceof Float32Array, 'downloadActAsync: an activation is a float tensor');
      const o = new Float32Array(alloc(d.byteLength));
      o.set(d);
      return Promise.resolve(o);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** The data is already on the host: a resolved download (errors reject, as on cuda). */
  downloadAsync(t: Tensor): Promise<Float32Array | Int32Array | Uint8Array> {
    try {
      return Promise.resolve(this.download(t));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  free(t: Tensor): void {
    const c = asCpu(t, 'free');
    if (c.isView || c.storage.freed) return;
    const d = c.data;
    c.storage.freed = true; // every tensor of this storage now throws on use, so handing the buffer out again is safe
    if (d instanceof Float32Array && d.length >= REUSE_MIN_ELEMENTS && d.byteOffset === 0 && d.byteLength === d.buffer.byteLength
      && this.reuseHeld + d.byteLength <= this.reuseCap) {
      let list = this.reuse.get(d.length);
      if (!list) this.reuse.set(d.length, list = []);
      list.push(d);
      this.reuseHeld += d.byteLength;
    }
    this.bytesLive -= c.storage.bytes;
    this.tracked?.delete(c.storage);
  }

  reshape(t: Tensor, shape: readonly number[]): Tensor {
    const c = asCpu(t, 'reshape');
    check(shapeSize(shape) === c.size, () => `reshape: [${c.shape.join(', ')}] (${c.size}) cannot become [${shape.join(', ')}]`);
    return new CpuTensor(c.data, shape, c.dtype, c.storage, c.isView);
  }

  rows(t: Tensor, start: number, end: number): Tensor {
    const c = asCpu(t, 'rows');
    const n0 = c.shape[0];
    check(c.shape.length >= 1 && Number.isInteger(start) && Number.isInteger(end) && 0 <= start && start <= end && end <= n0,
      () => `rows(${start}, ${end}) outside [0, ${n0}] of tensor [${c.shape.join(', ')}]`);
    const rowSize = n0 === 0 ? 0 : c.size / n0;
    return new CpuTensor(c.data.subarray(start * rowSize, end * rowSize), [end - start, ...c.shape.slice(1)], c.dtype, c.storage, true);
  }

  memoryInUse(): number {
    return this.bytesLive;
  }

  memoryBudget(): number | undefined {
    return this.memoryLimitBytes;
  }

  /** High-water mark of memoryInUse() since the backend was made or resetPeakMemory() (tests size budgets by it). */
  get peakMemoryInUse(): number { return this.bytesPeak; }
  resetPeakMemory(): void { this.bytesPeak = this.bytesLive; }

  trackAllocations(): AllocationTracker {
    if (this.tracked) throw new BackendError('trackAllocations: a tracker is already running on this backend');
    const set = this.tracked = new Set<{ freed: boolean; readonly bytes: number }>();
    return {
      freeLeftovers: () => {
        let bytes = 0;
        for (const st of set) {
          if (st.freed) continue;
          // The buffer itself goes to the garbage collector; every tensor of the storage now throws on use.
          st.freed = true;
          this.bytesLive -= st.bytes;
          bytes += st.bytes;
        }
        set.clear();
        return bytes;
      },
      close: () => { if (this.tracked === set) this.tracked = undefined; set.clear(); },
    };
  }

  releaseCache(): void {
    this.reuse.clear();
    this.reuseHeld = 0;
  }

  // ---- NF4 ----------------------------------------------------------------------------------------

  uploadNf4(w: Nf4Weight): QuantizedTensor {
    const q = new CpuQuantized(w);
    this.reserve(q.bytes);
    this.bytesLive += q.bytes;
    if (this.bytesLive > this.bytesPeak) this.bytesPeak = this.bytesLive;
    this.tracked?.add(q);
    return q;
  }

  freeQuantized(q: QuantizedTensor): void {
    const c = this.quant(q, 'freeQuantized');
    c.freed = true;
    this.bytesLive -= c.bytes;
    this.tracked?.delete(c);
  }

  dequantize(q: QuantizedTensor): Tensor {
    const c = this.quant(q, 'dequantize');
    const t = this.alloc([c.shape[0], c.shape[1]], 'f32');
    dequantRows(c, 0, c.shape[0], t.data as Float32Array);
    return t;
  }

  private quant(q: QuantizedTensor, what: string): CpuQuantized {
    if (!(q instanceof CpuQuantized)) throw new BackendError(`${what}: not a cpu quantized weight`);
    if (q.freed) throw new BackendError(`${what}: NF4 weight [${q.shape.join(', ')}] used after freeQuantized`);
    return q;
  }

  // ---- linear algebra -------------------------------------------------------------------------------

  matmul(a: Tensor, b: Tensor, opts: { transA?: boolean; transB?: boolean; alpha?: number; out?: Tensor; accumulate?: boolean } = {}): Tensor {
    const A = f32(a, 'matmul a'), Bm = f32(b, 'matmul b');
    const transA = opts.transA ?? false, transB = opts.transB ?? false, alpha = opts.alpha ?? 1;
    // Leading dims fold into rows: a [..., K] is [M, K] (or [K, M] with transA).
    const [ar, ac] = as2d(A), [br, bc] = as2d(Bm);
    const M = transA ? ac : ar, K = transA ? ar : ac;
    const Kb = transB ? bc : br, Nn = transB ? br : bc;
    check(K === Kb, () => `matmul: inner dims differ: a [${A.shape.join(', ')}]${transA ? 'ᵀ' : ''} · b [${Bm.shape.join(', ')}]${transB ? 'ᵀ' : ''}`);
    const outShape = !transA && A.shape.length > 2 ? [...A.shape.slice(0, -1), Nn] : [M, Nn];
    let out: CpuTensor;
    if (opts.out) {
      out = f32(opts.out, 'matmul out');
      check(out.size === M * Nn, () => `matmul: out [${out.shape.join(', ')}] does not hold [${M}, ${Nn}]`);
    } else {
      check(!opts.accumulate, 'matmul: accumulate needs an out tensor');
      out = this.output(outShape); // both GEMMs overwrite C when beta = 0
    }
    const beta = opts.accumulate ? 1 : 0;
    const ad = A.data as Float32Array, bd = Bm.data as Float32Array, cd = out.data as Float32Array;
    if (this.native) this.native.sgemm(transA, transB, M, Nn, K, alpha, ad, ac, bd, bc, beta, cd, Nn, this.threads);
    else gemmTs(transA, transB, M, Nn, K, alpha, ad, 0, ac, bd, 0, bc, beta, cd, 0, Nn, this.scratch);
    return out;
  }

  nf4Linear(x: Tensor, w: QuantizedTensor, bias?: Tensor): Tensor {
    const X = f32(x, 'nf4Linear x'), W = this.quant(w, 'nf4Linear');
    const [outDim, inDim] = W.shape;
    const [N, C] = as2d(X);
    check(C === inDim, () => `nf4Linear: x [${X.shape.join(', ')}] has ${C} features, weight is [${outDim}, ${inDim}]`);
    const y = this.out(X.shape.length > 2 ? [...X.shape.slice(0, -1), outDim] : [N, outDim]);
    const xd = X.data as Float32Array, yd = y.data as Float32Array;
    if (this.native) {
      this.native.nf4Gemm(true, N, outDim, inDim, xd, W.packed, W.absmax, W.table, W.blocksize, 0, yd, this.threads);
    } else {
      // y[:, r0:r1] = x · tileᵀ with tile = deq(W[r0:r1, :]).
      const rowsPer = Math.max(4, Math.floor(NF4_TILE_FLOATS / inDim));
      const tile = this.scratch.get('nf4tile', rowsPer * inDim);
      for (let r0 = 0; r0 < outDim; r0 += rowsPer) {
        const r1 = Math.min(outDim, r0 + rowsPer);
        dequantRows(W, r0, r1, tile);
        gemmTs(false, true, N, r1 - r0, inDim, 1, xd, 0, inDim, tile, 0, inDim, 0, yd, r0, outDim, this.scratch);
      }
    }
    if (bias) {
      const bd = f32(bias, 'nf4Linear bias').data as Float32Array;
      check(bd.length === outDim, () => `nf4Linear: bias has ${bd.length} elements, expected ${outDim}`);
      for (let n = 0; n < N; n++) for (let o = 0, r = n * outDim; o < outDim; o++) yd[r + o] += bd[o];
    }
    return y;
  }

  nf4LinearBackward(dy: Tensor, w: QuantizedTensor): Tensor {
    const G = f32(dy, 'nf4LinearBackward dy'), W = this.quant(w, 'nf4LinearBackward');
    const [outDim, inDim] = W.shape;
    const [N, C] = as2d(G);
    check(C === outDim, () => `nf4LinearBackward: dy [${G.shape.join(', ')}] has ${C} features, weight is [${outDim}, ${inDim}]`);
    const dx = this.out(G.shape.length > 2 ? [...G.shape.slice(0, -1), inDim] : [N, inDim]);
    const gd = G.data as Float32Array, dd = dx.data as Float32Array;
    if (this.native) {
      this.native.nf4Gemm(false, N, outDim, inDim, gd, W.packed, W.absmax, W.table, W.blocksize, 0, dd, this.threads);
    } else {
      // dx = Σ over row tiles of dy[:, r0:r1] · tile, tiles in ascending order (fixed summation order).
      const rowsPer = Math.max(4, Math.floor(NF4_TILE_FLOATS / inDim));
      const tile = this.scratch.get('nf4tile', rowsPer * inDim);
      for (let r0 = 0; r0 < outDim; r0 += rowsPer) {
        const r1 = Math.min(outDim, r0 + rowsPer);
        dequantRows(W, r0, r1, tile);
        gemmTs(false, false, N, inDim, r1 - r0, 1, gd, r0, outDim, tile, 0, inDim, r0 === 0 ? 0 : 1, dd, 0, inDim, this.scratch);
      }
    }
    return dx;
  }

  denseLinear(x: Tensor, w: Tensor, bias?: Tensor): Tensor {
    const X = f32(x, 'denseLinear x'), W = f32(w, 'denseLinear w');
    check(W.shape.length === 2, () => `denseLinear: weight must be [out, in], got [${W.shape.join(', ')}]`);
    const [outDim, inDim] = W.shape;
    const [N, C] = as2d(X);
    check(C === inDim, () => `denseLinear: x [${X.shape.join(', ')}] has ${C} features, weight is [${outDim}, ${inDim}]`);
    const y = this.matmul(X, W, { transB: true });
    if (bias) {
      const bd = f32(bias, 'denseLinear bias').data as Float32Array, yd = (y as CpuTensor).data as Float32Array;
      check(bd.length === outDim, () => `denseLinear: bias has ${bd.length} elements, expected ${outDim}`);
      for (let n = 0; n < N; n++) for (let o = 0, r = n * outDim; o < outDim; o++) yd[r + o] += bd[o];
    }
    return y;
  }

  denseLinearBackward(dy: Tensor, w: Tensor): Tensor {
    const G = f32(dy, 'denseLinearBackward dy'), W = f32(w, 'denseLinearBackward w');
    check(W.shape.length === 2 && as2d(G)[1] === W.shape[0], () => `denseLinearBackward: dy [${G.shape.join(', ')}] does not match weight [${W.shape.join(', ')}]`);
    return this.matmul(G, W);
  }

  // ---- elementwise / reductions ----------------------------------------------------------------------

  axpy(a: Tensor, b: Tensor, alpha = 1): Tensor {
    const A = f32(a, 'axpy a'), Bt = f32(b, 'axpy b');
    check(A.size === Bt.size, () => `axpy: a [${A.shape.join(', ')}] and b [${Bt.shape.join(', ')}] differ in size`);
    const ad = A.data as Float32Array, bd = Bt.data as Float32Array;
    const al = Math.fround(alpha);
    if (this.native) { this.native.axpy(ad, bd, al, ad.length, this.threads); return a; }
    for (let i = 0; i < ad.length; i++) ad[i] = ad[i] + Math.fround(al * bd[i]);
    return a;
  }

  scale(a: Tensor, s: number): Tensor {
    const ad = f32(a, 'scale').data as Float32Array;
    const sf = Math.fround(s);
    if (this.native) { this.native.scale(ad, sf, ad.length, this.threads); return a; }
    for (let i = 0; i < ad.length; i++) ad[i] = ad[i] * sf;
    return a;
  }

  sumSquares(t: Tensor): number {
    const d = f32(t, 'sumSquares').data as Float32Array;
    if (this.native) return this.native.sumSquares(d, d.length, this.threads);
    let s = 0;
    for (let i = 0; i < d.length; i++) s += d[i] * d[i];
    return s;
  }

  sumRows(x: Tensor): Tensor {
    const X = f32(x, 'sumRows');
    const [N, C] = as2d(X);
    const xd = X.data as Float32Array;
    if (this.native) {
      const out = this.output([C]);
      this.native.sumRows(xd, N, C, out.data as Float32Array, this.threads);
      return out;
    }
    const acc = new Float64Array(C);
    for (let n = 0; n < N; n++) for (let j = 0, r = n * C; j < C; j++) acc[j] += xd[r + j];
    const out = this.alloc([C], 'f32');
    (out.data as Float32Array).set(acc);
    return out;
  }

  scaleColumns(x: Tensor, v: Tensor): Tensor {
    const X = f32(x, 'scaleColumns x'), Vt = f32(v, 'scaleColumns v');
    const [N, C] = as2d(X);
    check(Vt.size === C, () => `scaleColumns: v has ${Vt.size} entries, x has ${C} columns`);
    const y = this.output(X.shape);
    const xd = X.data as Float32Array, vd = Vt.data as Float32Array, yd = y.data as Float32Array;
    for (let n = 0; n < N; n++) for (let c = 0, r = n * C; c < C; c++) yd[r + c] = xd[r + c] * vd[c];
    return y;
  }

  columnDot(a: Tensor, b: Tensor): Tensor {
    const A = f32(a, 'columnDot a'), Bt = f32(b, 'columnDot b');
    const [N, C] = as2d(A);
    check(Bt.size === A.size && as2d(Bt)[1] === C, () => `columnDot: a [${A.shape.join(', ')}] and b [${Bt.shape.join(', ')}] differ`);
    const out = this.alloc([C], 'f32');
    const ad = A.data as Float32Array, bd = Bt.data as Float32Array, od = out.data as Float32Array;
    const acc = new Float64Array(C);   // float64 sums, rounded once (like sumRows)
    for (let n = 0; n < N; n++) for (let c = 0, r = n * C; c < C; c++) acc[c] += ad[r + c] * bd[r + c];
    for (let c = 0; c < C; c++) od[c] = acc[c];
    return out;
  }

  // ---- layers ---------------------------------------------------------------------------------------

  /** table [V, H], ids [N] → [N, H]. */
  embedding(ids: Tensor, table: Tensor): Tensor {
    const I = i32(ids, 'embedding ids'), Tb = f32(table, 'embedding table');
    const [V, H] = as2d(Tb);
    const id = I.data as Int32Array, td = Tb.data as Float32Array;
    const out = this.output([...I.shape, H]); // every row is written (or the op throws)
    const od = out.data as Float32Array;
    // The native kernel checks every id before writing; on a bad one the TS loop below finds it and throws.
    if (this.native && this.native.embedding(id, td, id.length, V, H, od, this.threads) < 0) return out;
    for (let n = 0; n < id.length; n++) {
      const v = id[n];
      if (!(v >= 0 && v < V)) {
        this.free(out);
        throw new ShapeError(`embedding: token id ${v} at position ${n} is outside the vocabulary [0, ${V})`, { hint: 'the tokenizer and the model disagree on the vocabulary size, or the batch was not padded with a valid id' });
      }
      od.set(td.subarray(v * H, v * H + H), n * H);
    }
    return out;
  }

  /** x [N, H], w [H] → y [N, H], rstd [N]. HF order: y = f32(w · f32(x · rstd)), rstd = f32(1/sqrt(f32(mean x²) + eps)). */
  rmsnorm(x: Tensor, w: Tensor, eps: number): { y: Tensor; rstd: Tensor } {
    const X = f32(x, 'rmsnorm x'), Wt = f32(w, 'rmsnorm w');
    const [N, H] = as2d(X);
    check(Wt.size === H, () => `rmsnorm: weight has ${Wt.size} elements, x has ${H} features`);
    const y = this.output(X.shape), rstd = this.output([N]);
    const xd = X.data as Float32Array, wd = Wt.data as Float32Array, yd = y.data as Float32Array, rd = rstd.data as Float32Array;
    if (this.native) { this.native.rmsnormForward(xd, wd, N, H, eps, yd, rd, this.threads); return { y, rstd }; }
    const f = Math.fround;
    for (let n = 0; n < N; n++) {
      const o = n * H;
      let ss = 0;
      for (let j = 0; j < H; j++) ss += xd[o + j] * xd[o + j];
      const r = f(1 / Math.sqrt(f(f(ss / H) + eps)));
      rd[n] = r;
      for (let j = 0; j < H; j++) yd[o + j] = wd[j] * f(xd[o + j] * r);
    }
    return { y, rstd };
  }

  /** dx = rstd · (g − x · rstd² · mean(g · x)), g = dy · w. */
  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor): Tensor {
    const G = f32(dy, 'rmsnormBackward dy'), X = f32(x, 'rmsnormBackward x'), Wt = f32(w, 'rmsnormBackward w'), R = f32(rstd, 'rmsnormBackward rstd');
    const [N, H] = as2d(X);
    check(G.size === X.size && Wt.size === H && R.size === N, 'rmsnormBackward: dy/x/w/rstd shapes do not fit');
    const dx = this.output(X.shape);
    const gd = G.data as Float32Array, xd = X.data as Float32Array, wd = Wt.data as Float32Array, rd = R.data as Float32Array, od = dx.data as Float32Array;
    if (this.native) { this.native.rmsnormBackward(gd, xd, wd, rd, N, H, od, this.threads); return dx; }
    for (let n = 0; n < N; n++) {
      const o = n * H, r = rd[n];
      let gx = 0;
      for (let j = 0; j < H; j++) gx += gd[o + j] * wd[j] * xd[o + j];
      const c = r * r * gx / H;
      for (let j = 0; j < H; j++) od[o + j] = r * (gd[o + j] * wd[j] - xd[o + j] * c);
    }
    return dx;
  }

  /**
   * x [N, nh, D], pos [N], invFreq [rotaryDim/2]. For i < half = rotaryDim/2, angle = f32(pos · invFreq[i]),
   * c = f32(cos) · mscale, s = f32(sin) · mscale: y[i] = x[i]·c − x[i+half]·s, y[i+half] = x[i+half]·c + x[i]·s;
   * inverse uses −s (the transpose, i.e. the backward). Dims ≥ rotaryDim pass through unchanged.
   */
  rope(x: Tensor, pos: Tensor, invFreq: Tensor, opts: { rotaryDim: number; mscale?: number; inverse?: boolean }): Tensor {
    const X = f32(x, 'rope x'), P = i32(pos, 'rope pos'), F = f32(invFreq, 'rope invFreq');
    check(X.shape.length === 3, () => `rope: x must be [N, nh, D], got [${X.shape.join(', ')}]`);
    const [N, nh, D] = X.shape;
    const rd = opts.rotaryDim, half = rd / 2;
    check(Number.isInteger(half) && rd > 0 && rd <= D && F.size === half && P.size === N,
      () => `rope: rotaryDim ${rd}, invFreq [${F.size}], pos [${P.size}] do not fit x [${X.shape.join(', ')}]`);
    const ms = Math.fround(opts.mscale ?? 1), sign = opts.inverse ? -1 : 1;
    const xd = X.data as Float32Array, pd = P.data as Int32Array, fd = F.data as Float32Array;
    const y = this.output(X.shape);
    const yd = y.data as Float32Array;
    if (this.native) { this.native.rope(xd, pd, fd, N, nh, D, rd, ms, opts.inverse === true, yd, this.threads); return y; }
    const cs = this.scratch.get('ropeCos', half), sn = this.scratch.get('ropeSin', half);
    const f = Math.fround;
    for (let n = 0; n < N; n++) {
      for (let i = 0; i < half; i++) {
        const ang = f(pd[n] * fd[i]);
        cs[i] = f(Math.cos(ang)) * ms;
        sn[i] = sign * f(f(Math.sin(ang)) * ms);
      }
      for (let h = 0; h < nh; h++) {
        const o = (n * nh + h) * D;
        for (let i = 0; i < half; i++) {
          const x1 = xd[o + i], x2 = xd[o + i + half];
          yd[o + i] = f(x1 * cs[i]) - f(x2 * sn[i]);
          yd[o + i + half] = f(x2 * cs[i]) + f(x1 * sn[i]);
        }
        for (let i = rd; i < D; i++) yd[o + i] = xd[o + i];
      }
    }
    return y;
  }

  attention(q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, scale: number): AttentionSaved {
    const Q = f32(q, 'attention q'), Kt = f32(k, 'attention k'), Vt = f32(v, 'attention v'), Mk = i32(keyMask, 'attention keyMask');
    const dims = attnDims(Q, Kt, Vt, Mk);
    const { B, T, Hq, Hk, D } = dims;
    const out = this.out(Q.shape), lse = this.out([B, Hq, T]);
    const od = out.data as Float32Array, ld = lse.data as Float32Array;
    if (this.native) {
      this.native.attentionForward(Q.data as Float32Array, Kt.data as Float32Array, Vt.data as Float32Array, Mk.data as Int32Array,
        B, T, Hq, Hk, D, scale, od, ld, this.threads);
    } else {
      attentionForwardTs(Q.data as Float32Array, Kt.data as Float32Array, Vt.data as Float32Array, Mk.data as Int32Array, dims, scale,
        od, ld, new Float64Array(T), new Float64Array(D));
    }
    return { out, lse };
  }

  /** Generation over a KV cache (see backend.ts); forward only. q [B, Tq, Hq, D], k/v [B, Tk, Hk, D]. */
  attentionCached(q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, queryPos: Tensor, scale: number): Tensor {
    const Q = f32(q, 'attentionCached q'), Kt = f32(k, 'attentionCached k'), Vt = f32(v, 'attentionCached v');
    const Mk = i32(keyMask, 'attentionCached keyMask'), P = i32(queryPos, 'attentionCached queryPos');
    check(Q.shape.length === 4 && Kt.shape.length === 4 && Vt.shape.length === 4, 'attentionCached: q, k, v must be 4-D');
    const [B, Tq, Hq, D] = Q.shape, [Bk, Tk, Hk, Dk] = Kt.shape;
    check(Bk === B && Dk === D && Hq % Hk === 0 && Vt.size === Kt.size, () => `attentionCached: q [${Q.shape}] does not fit k [${Kt.shape}] / v [${Vt.shape}]`);
    check(Mk.size === B * Tk && P.size === B * Tq, () => `attentionCached: keyMask has ${Mk.size} entries (want ${B * Tk}), queryPos ${P.size} (want ${B * Tq})`);
    const out = this.alloc(Q.shape, 'f32');
    attentionCachedTs(Q.data as Float32Array, Kt.data as Float32Array, Vt.data as Float32Array, Mk.data as Int32Array, P.data as Int32Array,
      { B, Tq, Tk, Hq, Hk, D }, scale, out.data as Float32Array);
    return out;
  }

  attentionBackward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, keyMask: Tensor, saved: AttentionSaved, scale: number): { dq: Tensor; dk: Tensor; dv: Tensor } {
    const G = f32(dout, 'attentionBackward dout'), Q = f32(q, 'attentionBackward q'), Kt = f32(k, 'attentionBackward k');
    const Vt = f32(v, 'attentionBackward v'), Mk = i32(keyMask, 'attentionBackward keyMask');
    const O = f32(saved.out, 'attentionBackward saved.out'), L = f32(saved.lse, 'attentionBackward saved.lse');
    const dims = attnDims(Q, Kt, Vt, Mk);
    const { B, T, Hq, Hk, D } = dims;
    check(G.size === Q.size && O.size === Q.size && L.size === B * Hq * T, 'attentionBackward: dout / saved state do not match q');
    const dq = this.out(Q.shape), dk = this.out(Kt.shape), dv = this.out(Vt.shape);
    const a = [G, Q, Kt, Vt].map((t) => t.data as Float32Array);
    if (this.native) {
      this.native.attentionBackward(a[0], a[1], a[2], a[3], Mk.data as Int32Array, O.data as Float32Array, L.data as Float32Array,
        B, T, Hq, Hk, D, scale, dq.data as Float32Array, dk.data as Float32Array, dv.data as Float32Array, this.threads);
    } else {
      attentionBackwardTs(a[0], a[1], a[2], a[3], Mk.data as Int32Array, O.data as Float32Array, L.data as Float32Array, dims, scale,
        dq.data as Float32Array, dk.data as Float32Array, dv.data as Float32Array, new Float64Array(D));
    }
    return { dq, dk, dv };
  }

  /** h = silu(g) · u, silu(g) = g / (1 + e^−g). */
  swiglu(gate: Tensor, up: Tensor): Tensor {
    const Gt = f32(gate, 'swiglu gate'), U = f32(up, 'swiglu up');
    check(Gt.size === U.size, 'swiglu: gate and up differ in size');
    const h = this.output(Gt.shape);
    const gd = Gt.data as Float32Array, ud = U.data as Float32Array, hd = h.data as Float32Array;
    if (this.native) { this.native.swigluForward(gd, ud, hd, gd.length, this.threads); return h; }
    for (let i = 0; i < gd.length; i++) {
      const g = gd[i];
      hd[i] = Math.fround(g / (1 + Math.exp(-g))) * ud[i];
    }
    return h;
  }

  /** dgate = dh · u · σ(g) · (1 + g · (1 − σ(g))), dup = dh · silu(g). */
  swigluBackward(dh: Tensor, gate: Tensor, up: Tensor): { dgate: Tensor; dup: Tensor } {
    const D = f32(dh, 'swigluBackward dh'), Gt = f32(gate, 'swigluBackward gate'), U = f32(up, 'swigluBackward up');
    check(D.size === Gt.size && Gt.size === U.size, 'swigluBackward: dh, gate and up differ in size');
    const dgate = this.output(Gt.shape), dup = this.output(Gt.shape);
    const dd = D.data as Float32Array, gd = Gt.data as Float32Array, ud = U.data as Float32Array;
    const dg = dgate.data as Float32Array, du = dup.data as Float32Array;
    if (this.native) { this.native.swigluBackward(dd, gd, ud, dg, du, gd.length, this.threads); return { dgate, dup }; }
    for (let i = 0; i < gd.length; i++) {
      const g = gd[i], s = 1 / (1 + Math.exp(-g));
      du[i] = dd[i] * Math.fround(g * s);
      dg[i] = dd[i] * ud[i] * s * (1 + g * (1 - s));
    }
    return { dgate, dup };
  }

  /**
   * Dropout mask (identical bits on every backend): element (n, j) of x [N, C] is kept iff
   *   u32ToUnit(philox4x32(c0 = j, c1 = rowPos[n], c2 = rowSample[n], c3 = stream, k0, k1).word0) >= p
   * and kept values are multiplied by f32(1 / (1 − p)). Only word 0 of each Philox block is used (simple to
   * define; the waste does not matter). p = 0 returns a copy of x. The backward is the same call on dy.
   */
  dropout(x: Tensor, key: DropoutKey): Tensor {
    const X = f32(x, 'dropout x');
    const [N, C] = as2d(X);
    check(key.rowPos.length >= N && key.rowSample.length >= N, () => `dropout: key has ${key.rowPos.length}/${key.rowSample.length} rows, x has ${N}`);
    check(key.p >= 0 && key.p < 1, () => `dropout: p = ${key.p} must be in [0, 1)`);
    const y = this.output(X.shape);
    const xd = X.data as Float32Array, yd = y.data as Float32Array;
    if (key.p === 0) { yd.set(xd); return y; }
    const sc = Math.fround(1 / (1 - key.p));
    if (this.native) {
      this.native.dropout(xd, yd, N, C, key.p, sc, key.k0 >>> 0, key.k1 >>> 0, key.stream >>> 0, key.rowSample, key.rowPos, this.threads);
      return y;
    }
    const w = this.philoxOut, p = key.p, k0 = key.k0 >>> 0, k1 = key.k1 >>> 0, st = key.stream >>> 0;
    for (let n = 0; n < N; n++) {
      const c1 = key.rowPos[n] >>> 0, c2 = key.rowSample[n] >>> 0;
      for (let j = 0, o = n * C; j < C; j++) {
        philox4x32(j, c1, c2, st, k0, k1, w);
        yd[o + j] = u32ToUnit(w[0]) >= p ? xd[o + j] * sc : 0;
      }
    }
    return y;
  }

  /**
   * logits [N, V], targets [N]. Per row: loss = log Σ exp(x − max) + max − x[target], in float64 on the TS path
   * (float32 with a vectorised exp natively). dlogits = (softmax − onehot) · gradScale, 0 on ignored rows.
   */
  crossEntropy(logits: Tensor, targets: Tensor, opts: { gradScale?: number; inPlace?: boolean } = {}): { lossSum: number; count: number; dlogits?: Tensor } {
    const X = f32(logits, 'crossEntropy logits'), Tg = i32(targets, 'crossEntropy targets');
    const [N, V] = as2d(X);
    check(Tg.size === N, () => `crossEntropy: ${Tg.size} targets for ${N} rows of logits`);
    const td = Tg.data as Int32Array, xd = X.data as Float32Array;
    let count = 0;
    for (let n = 0; n < N; n++) {
      const t = td[n];
      if (t === -100) continue;
      if (!(t >= 0 && t < V)) throw new ShapeError(`crossEntropy: target ${t} at row ${n} is outside the vocabulary [0, ${V}) and is not the ignore index -100`, { hint: 'labels must be token ids or -100' });
      count++;
    }
    const wantGrad = opts.gradScale !== undefined;
    let dl: CpuTensor | undefined;
    if (wantGrad) dl = opts.inPlace ? X : this.output(X.shape); // every row written (ignored rows with zeros)
    const dd = dl ? dl.data as Float32Array : null;
    const rowLoss = this.scratch.get('ceRowLoss', N);
    const gs = opts.gradScale ?? 0;
    if (this.native) {
      this.native.crossEntropy(xd, td, N, V, rowLoss, dd, gs, this.threads);
    } else {
      for (let n = 0; n < N; n++) {
        const o = n * V, t = td[n];
        if (t === -100) {
          rowLoss[n] = 0;
          if (dd) dd.fill(0, o, o + V);
          continue;
        }
        let m = -Infinity;
        for (let j = 0; j < V; j++) if (xd[o + j] > m) m = xd[o + j];
        let s = 0;
        for (let j = 0; j < V; j++) s += Math.exp(xd[o + j] - m);
        const xt = xd[o + t];
        rowLoss[n] = Math.log(s) + m - xt;
        if (dd) {
          const inv = gs / s;
          for (let j = 0; j < V; j++) dd[o + j] = Math.exp(xd[o + j] - m) * inv;
          dd[o + t] -= gs;
        }
      }
    }
    let lossSum = 0;
    for (let n = 0; n < N; n++) lossSum += rowLoss[n];
    return dl ? { lossSum, count, dlogits: dl } : { lossSum, count };
  }

  // ---- optimizer -----------------------------------------------------------------------------------

  /**
   * torch.optim.AdamW (single-tensor path, torch ≥ 2.0), every op rounded to float32 in torch's order:
   *   p = p · f32(1 − lr·wd);  m = m + f32(1−β1) · (g − m)  (lerp_);  v = v·β2 + f32(1−β2) · g · g  (mul_, addcmul_)
   *   denom = sqrt(v) / f32(sqrt(1 − β2^t)) + eps;  p = p + f32(−lr / (1 − β1^t)) · m / denom  (addcdiv_)
   * Scalars are computed in float64 (Python floats) and then cast to float32, as torch does for a float tensor.
   */
  adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, h: AdamWHyper): void {
    const P = f32(param, 'adamw param'), G = f32(grad, 'adamw grad'), Mt = f32(m, 'adamw m'), Vt = f32(v, 'adamw v');
    check(P.size === G.size && P.size === Mt.size && P.size === Vt.size, 'adamw: param, grad, m, v differ in size');
    check(Number.isInteger(h.step) && h.step >= 1, () => `adamw: step ${h.step} must be an integer ≥ 1`);
    const f = Math.fround;
    const decay = f(1 - h.lr * h.weightDecay), w1 = f(1 - h.beta1), b2 = f(h.beta2), w2 = f(1 - h.beta2);
    const bc1 = 1 - Math.pow(h.beta1, h.step), bc2s = f(Math.sqrt(1 - Math.pow(h.beta2, h.step)));
    const stepSize = f(-(h.lr / bc1)), eps = f(h.eps);
    const pd = P.data as Float32Array, gd = G.data as Float32Array, md = Mt.data as Float32Array, vd = Vt.data as Float32Array;
    if (this.native) {
      this.native.adamw(pd, gd, md, vd, pd.length, decay, w1, b2, w2, bc2s, stepSize, eps, h.weightDecay !== 0, this.threads);
      return;
    }
    for (let i = 0; i < pd.length; i++) {
      const g = gd[i];
      const p = h.weightDecay !== 0 ? f(pd[i] * decay) : pd[i];
      const mi = f(md[i] + f(w1 * f(g - md[i])));
      const vi = f(f(vd[i] * b2) + f(f(w2 * g) * g));
      const denom = f(f(f(Math.sqrt(vi)) / bc2s) + eps);
      md[i] = mi; vd[i] = vi;
      pd[i] = f(p + f(f(stepSize * mi) / denom));
    }
  }
}

export function createCpuBackend(opts: CpuBackendOptions = {}): CpuBackend {
  return new CpuBackend(opts);
}

// ---- helpers ------------------------------------------------------------------------------------------

function f32(t: Tensor, what: string): CpuTensor {
  const c = asCpu(t, what);
  if (c.dtype !== 'f32') throw new ShapeError(`${what}: expected a float tensor, got ${c.dtype} [${c.shape.join(', ')}]`);
  c.data; // throws if freed
  return c;
}

function i32(t: Tensor, what: string): CpuTensor {
  const c = asCpu(t, what);
  if (c.dtype !== 'i32') throw new ShapeError(`${what}: expected an i32 tensor, got ${c.dtype} [${c.shape.join(', ')}]`);
  c.data;
  return c;
}

/** [rows, cols] of a tensor read as a matrix whose last dim is the columns. */
function as2d(t: CpuTensor): [number, number] {
  if (t.shape.length === 0) return [1, 1];
  const cols = t.shape[t.shape.length - 1];
  return [cols === 0 ? 0 : t.size / cols, cols];
}

function attnDims(q: CpuTensor, k: CpuTensor, v: CpuTensor, mask: CpuTensor): { B: number; T: number; Hq: number; Hk: number; D: number } {
  check(q.shape.length === 4 && k.shape.length === 4 && v.shape.length === 4,
    () => `attention: q/k/v must be [B, T, H, D], got [${q.shape.join(', ')}], [${k.shape.join(', ')}], [${v.shape.join(', ')}]`);
  const [B, T, Hq, D] = q.shape, Hk = k.shape[2];
  check(k.shape[0] === B && k.shape[1] === T && k.shape[3] === D && v.shape.every((d, i) => d === k.shape[i]),
    () => `attention: k [${k.shape.join(', ')}] / v [${v.shape.join(', ')}] do not match q [${q.shape.join(', ')}]`);
  check(Hk > 0 && Hq % Hk === 0, () => `attention: ${Hq} query heads are not a multiple of ${Hk} kv heads`);
  check(mask.size === B * T, () => `attention: keyMask has ${mask.size} elements, expected B·T = ${B * T}`);
  return { B, T, Hq, Hk, D };
}
