// The whole native surface of the CUDA addon (build/dqlora_cuda.node, sources in src/), in one typed file.
// Device pointers are opaque `DevicePtr` numbers (x86-64 device addresses fit in 53 bits); dtypes travel as
// the codes of DTYPE_CODE. Every function throws a JS Error with "file:line" on a CUDA/cuBLAS failure; none
// aborts the process. An out-of-memory failure (the pool's cudaMalloc, the pool's limit, any CUDA call returning
// cudaErrorMemoryAllocation) carries `code: 'DQLORA_OOM'` and `requestedBytes` (core/engine/oom.ts isOutOfMemory). Set DQLORA_CUDA_TRACE=1 to log every call (name, arguments, milliseconds) to stderr.

import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { DType } from '../backend.ts';

/** A device address (opaque; arithmetic only through `offsetPtr`). */
export type DevicePtr = number & { readonly __devicePtr: unique symbol };
/** The null device pointer, for optional arguments. */
export const NULL_PTR = 0 as DevicePtr;
export function offsetPtr(p: DevicePtr, bytes: number): DevicePtr {
  return (p + bytes) as DevicePtr;
}

/** dtype codes shared with src/common.h (enum DType). */
export const DTYPE_CODE = { f32: 0, bf16: 1, f16: 2, i32: 3, u8: 4 } as const satisfies Record<DType, number>;
export type DtypeCode = (typeof DTYPE_CODE)[DType];
export const DTYPE_BYTES: Record<DType, number> = { f32: 4, bf16: 2, f16: 2, i32: 4, u8: 1 };

export interface DeviceInfo {
  name: string;
  computeCapability: string;
  totalMemory: number;
  multiprocessors: number;
  /** Which libcublasLt was loaded, and its version. */
  cublasLt: string;
  runtimeVersion: number;
  driverVersion: number;
}

export interface PoolStats {
  /** Bytes in live blocks (what Backend.memoryInUse reports). */
  inUse: number;
  /** Bytes in freed blocks kept for reuse. */
  cached: number;
  peakInUse: number;
  /** inUse + cached: what the allocator holds from cudaMalloc. */
  reserved: number;
  peakReserved: number;
  liveBlocks: number;
  deviceFree?: number;
  deviceTotal?: number;
}

type Ptr = DevicePtr;
type Dt = DtypeCode;

export interface NativeAddon {
  /** Safe without a GPU or driver: count 0 and the runtime's reason. */
  deviceCount(): { count: number; error?: string };
  /** Selects the device, creates the stream, loads cuBLASLt. Idempotent. */
  init(device?: number): DeviceInfo;

  // memory (caching pool; all copies are ordered on the one stream)
  alloc(bytes: number): Ptr;
  free(p: Ptr): void;
  /** Synchronous host → device copy of the array's bytes. */
  upload(dst: Ptr, src: Float32Array | Int32Array | Uint8Array | Uint16Array): void;
  /** Synchronous device → host copy into the array. */
  download(src: Ptr, dst: Float32Array | Int32Array | Uint8Array | Uint16Array): void;
  /**
   * Asynchronous device → host copy into the array: returns at once (the JS thread may keep queueing kernels);
   * the promise resolves once dst holds src's bytes as of this call's place in the stream (a device-side
   * snapshot, so later kernels may overwrite or free src). Do not touch dst before it resolves.
   */
  downloadAsync(src: Ptr, dst: Float32Array | Int32Array | Uint8Array | Uint16Array): Promise<void>;
  memsetZero(p: Ptr, bytes: number): void;
  copy(dst: Ptr, src: Ptr, bytes: number): void;
  synchronize(): void;
  poolStats(): PoolStats;
  poolTrim(): void;
  /**
   * Caps the pool's live + cached bytes at `bytes` (0 = no cap; the device's memory still is one): beyond it an
   * allocation first gives the cached blocks back, then fails like a cudaMalloc out of memory.
   */
  poolSetLimit(bytes: number): void;
  poolResetPeak(): void;

  // elementwise / reductions
  convert(src: Ptr, srcDt: Dt, dst: Ptr, dstDt: Dt, n: number): void;
  /** Row-major D[M, N] = alpha·op(A)·op(B) + beta·D; A, B share abDt. */
  matmul(a: Ptr, b: Ptr, abDt: Dt, d: Ptr, dDt: Dt, M: number, N: number, K: number, transA: boolean, transB: boolean, alpha: number, beta: number): void;
  axpy(a: Ptr, aDt: Dt, b: Ptr, bDt: Dt, n: number, alpha: number): void;
  scale(a: Ptr, dt: Dt, n: number, s: number): void;
  sumSquares(a: Ptr, dt: Dt, n: number): number;
  /** x [N, C] → out f32 [C]. */
  sumRows(x: Ptr, dt: Dt, N: number, C: number, out: Ptr): void;
  addBias(y: Ptr, yDt: Dt, bias: Ptr, bDt: Dt, N: number, C: number): void;
  /** DoRA: y[n, c] = x[n, c] · v[c] (v f32). */
  scaleColumns(x: Ptr, y: Ptr, dt: Dt, v: Ptr, N: number, C: number): void;
  /** DoRA: out[c] = Σ_n a[n, c] · b[n, c] (f32 out, fixed summation order). */
  columnDot(a: Ptr, aDt: Dt, b: Ptr, bDt: Dt, N: number, C: number, out: Ptr): void;
  swiglu(gate: Ptr, up: Ptr, h: Ptr, dt: Dt, n: number): void;
  swigluBackward(dh: Ptr, gate: Ptr, up: Ptr, dgate: Ptr, dup: Ptr, dt: Dt, n: number): void;
  dropout(x: Ptr, y: Ptr, dt: Dt, N: number, C: number, threshold24: number, scale: number, k0: number, k1: number, stream: number, rowSample: Int32Array, rowPos: Int32Array): void;
  adamw(p: Ptr, g: Ptr, m: Ptr, v: Ptr, n: number, lr: number, beta1: number, beta2: number, eps: number, decay: number, stepSize: number, bc2Sqrt: number): void;

  // layers
  /** Returns the number of ids outside [0, V) (their rows are zero-filled). Synchronises. */
  embedding(ids: Ptr, table: Ptr, tableDt: Dt, out: Ptr, outDt: Dt, N: number, H: number, V: number): number;
  rmsnorm(x: Ptr, xDt: Dt, w: Ptr, wDt: Dt, y: Ptr, rstd: Ptr, N: number, H: number, eps: number): void;
  rmsnormBackward(dy: Ptr, x: Ptr, xDt: Dt, w: Ptr, wDt: Dt, rstd: Ptr, dx: Ptr, N: number, H: number): void;
  rope(x: Ptr, y: Ptr, dt: Dt, pos: Ptr, invFreq: Ptr, N: number, nh: number, D: number, rotaryDim: number, mscale: number, inverse: boolean): void;
  attentionForward(q: Ptr, k: Ptr, v: Ptr, mask: Ptr, out: Ptr, lse: Ptr, B: number, T: number, Hq: number, Hk: number, D: number, scale: number): void;
  attentionBackward(dout: Ptr, q: Ptr, k: Ptr, v: Ptr, mask: Ptr, out: Ptr, lse: Ptr, dq: Ptr, dk: Ptr, dv: Ptr, B: number, T: number, Hq: number, Hk: number, D: number, scale: number): void;
  /** Returns [lossSum, count, badTargets]. Synchronises. dlogits may equal logits (in place) or be NULL_PTR. */
  crossEntropy(logits: Ptr, dt: Dt, targets: Ptr, N: number, V: number, wantGrad: boolean, gradScale: number, dlogits: Ptr, dDt: Dt): [number, number, number];

  // NF4
  nf4Dequant(packed: Ptr, absmax: Ptr, absmaxU8: boolean, nestedAbsmax: Ptr, nestedMap: Ptr, offset: number, quantMap: Ptr, n: number, blocksize: number, nestedBlocksize: number, out: Ptr, outDt: Dt): void;
  nf4Quantize(w: Ptr, wDt: Dt, n: number, blocksize: number, packed: Ptr, absmax: Ptr): void;
  nf4DoubleQuant(absmax: Ptr, nblocks: number, offset: number, map256: Ptr, nestedBlocksize: number, codes: Ptr, nestedAbsmax: Ptr): void;
}

/** Where the build puts the addon. */
export const ADDON_PATH = join(dirname(fileURLToPath(import.meta.url)), 'build', 'dqlora_cuda.node');

let cached: NativeAddon | undefined;

/**
 * Loads the addon (once). Throws a plain Error when the file is missing or fails to load; cuda.ts turns that
 * into a BackendError with a hint. DQLORA_CUDA_ADDON overrides the path.
 */
export function loadNative(): NativeAddon {
  if (cached) return cached;
  const path = process.env.DQLORA_CUDA_ADDON ?? ADDON_PATH;
  if (!existsSync(path)) throw new Error(`the CUDA addon is not built (${path} does not exist)`);
  const raw = createRequire(import.meta.url)(path) as NativeAddon;
  cached = process.env.DQLORA_CUDA_TRACE === '1' ? traced(raw) : raw;
  return cached;
}

function describe(v: unknown): string {
  if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${(v as Uint8Array).length})`;
  if (typeof v === 'number' && v > 0xffffffff) return '0x' + v.toString(16);
  return JSON.stringify(v) ?? String(v);
}

/** Wraps every export so that each call is logged with its arguments and duration (DQLORA_CUDA_TRACE=1). */
function traced(raw: NativeAddon): NativeAddon {
  const out: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(raw as unknown as Record<string, (...a: unknown[]) => unknown>)) {
    out[name] = (...args: unknown[]) => {
      const t0 = performance.now();
      try {
        return fn(...args);
      } finally {
        process.stderr.write(`[dqlora cuda] ${name}(${args.map(describe).join(', ')}) ${(performance.now() - t0).toFixed(3)} ms\n`);
      }
    };
  }
  return out as unknown as NativeAddon;
}
