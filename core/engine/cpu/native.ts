// The whole surface of the optional C++ addon (core/engine/cpu-native), declared in one place. The addon is
// built at `npm ci` by core/engine/cpu-native/build.mjs; when it is missing (no compiler, odd platform) or
// DQLORA_CPU_NATIVE=0, the cpu backend uses its TypeScript kernels instead. Every float array is float32,
// taken from its byteOffset (subarray views are fine); all functions are synchronous and deterministic:
// each output element is summed by one thread in a fixed order, whatever the thread count.

import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { logger } from '../../../common/log.ts';

export interface CpuNative {
  /** Instruction set the kernels were dispatched to at load: 'avx512' | 'avx2' | 'scalar'. */
  isa(): string;
  /** C = alpha · op(A) · op(B) + beta · C; A' [M, K], B' [K, N], C [M, N] row-major with leading dims. */
  sgemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number,
    a: Float32Array, lda: number, b: Float32Array, ldb: number, beta: number, c: Float32Array, ldc: number, threads: number): void;
  /**
   * NF4 GEMM, W [out, in] packed. transW: C [M, out] = x [M, in] · Wᵀ; else C [M, in] = x [M, out] · W.
   * C = product + beta · C.
   */
  nf4Gemm(transW: boolean, M: number, out: number, inDim: number, x: Float32Array, packed: Uint8Array,
    absmax: Float32Array, table: Float32Array, blocksize: number, beta: number, c: Float32Array, threads: number): void;
  /** See Backend.attention; out [B, T, Hq, D], lse [B, Hq, T] (−inf on rows without a valid key). */
  attentionForward(q: Float32Array, k: Float32Array, v: Float32Array, keyMask: Int32Array,
    B: number, T: number, Hq: number, Hk: number, D: number, scale: number, out: Float32Array, lse: Float32Array, threads: number): void;
  attentionBackward(dout: Float32Array, q: Float32Array, k: Float32Array, v: Float32Array, keyMask: Int32Array,
    out: Float32Array, lse: Float32Array, B: number, T: number, Hq: number, Hk: number, D: number, scale: number,
    dq: Float32Array, dk: Float32Array, dv: Float32Array, threads: number): void;
  /**
   * Row-wise cross-entropy; targets already validated (−100 = ignore). Writes the per-row loss (0 when ignored)
   * into rowLoss [N]. When dlogits is given (may alias logits) writes (softmax − onehot) · gradScale, 0 on ignored rows.
   */
  crossEntropy(logits: Float32Array, targets: Int32Array, N: number, V: number, rowLoss: Float32Array,
    dlogits: Float32Array | null, gradScale: number, threads: number): void;
  /** Dropout with the mask of Backend.dropout (see cpu.ts): y = x · keep / (1 − p). */
  dropout(x: Float32Array, y: Float32Array, N: number, C: number, p: number, scale: number, k0: number, k1: number,
    stream: number, rowSample: Int32Array, rowPos: Int32Array, threads: number): void;
  // ---- elementwise / normalisation (cpu-native/src/elementwise.h); each is the TS kernel of the same name in cpu.ts ----
  /** h [n] = silu(gate) · up (fast vectorised exp, ≈2 ulp). */
  swigluForward(gate: Float32Array, up: Float32Array, h: Float32Array, n: number, threads: number): void;
  swigluBackward(dh: Float32Array, gate: Float32Array, up: Float32Array, dgate: Float32Array, dup: Float32Array, n: number, threads: number): void;
  /** a [n] += alpha · b (same bits as the TS kernel). */
  axpy(a: Float32Array, b: Float32Array, alpha: number, n: number, threads: number): void;
  /** a [n] ·= s. */
  scale(a: Float32Array, s: number, n: number, threads: number): void;
  /** Σ x² in float64 (fixed chunks, partials added in order). */
  sumSquares(x: Float32Array, n: number, threads: number): number;
  /** out [C] = Σ over rows of x [N, C], float64 sums in row order (same bits as the TS kernel). */
  sumRows(x: Float32Array, N: number, C: number, out: Float32Array, threads: number): void;
  /** x [N, H], w [H] → y [N, H], rstd [N]. */
  rmsnormForward(x: Float32Array, w: Float32Array, N: number, H: number, eps: number, y: Float32Array, rstd: Float32Array, threads: number): void;
  rmsnormBackward(dy: Float32Array, x: Float32Array, w: Float32Array, rstd: Float32Array, N: number, H: number, dx: Float32Array, threads: number): void;
  /** x [N, nh, D], pos [N], invFreq [rotaryDim/2] → y [N, nh, D] (same bits as the TS kernel for the same cos/sin). */
  rope(x: Float32Array, pos: Int32Array, invFreq: Float32Array, N: number, nh: number, D: number, rotaryDim: number,
    mscale: number, inverse: boolean, y: Float32Array, threads: number): void;
  /** One AdamW step in place; the scalars are the float32 values the TS kernel computes (same bits). */
  adamw(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, n: number, decay: number, w1: number, b2: number,
    w2: number, bc2s: number, stepSize: number, eps: number, weightDecayOn: boolean, threads: number): void;
  /** out [N, H] = table [V, H] rows of ids [N]; returns the index of the first id outside [0, V) (nothing written), else −1. */
  embedding(ids: Int32Array, table: Float32Array, N: number, V: number, H: number, out: Float32Array, threads: number): number;
  /** GFLOP/s of a register-resident FMA loop on `threads` threads for about `ms` milliseconds (a peak estimate). */
  peakGflops(ms: number, threads: number): number;
}

const log = logger('cpu-native');

/** Every function of CpuNative: an addon lacking one of them is stale and not used. */
const NATIVE_FUNCTIONS = [
  'isa', 'sgemm', 'nf4Gemm', 'attentionForward', 'attentionBackward', 'crossEntropy', 'dropout', 'swigluForward',
  'swigluBackward', 'axpy', 'scale', 'sumSquares', 'sumRows', 'rmsnormForward', 'rmsnormBackward', 'rope', 'adamw',
  'embedding', 'peakGflops',
] as const satisfies readonly (keyof CpuNative)[];
let cached: CpuNative | null | undefined;

/** Path of the built addon. */
export const CPU_NATIVE_PATH = fileURLToPath(new URL('../cpu-native/build/dqlora_cpu.node', import.meta.url));

/** The addon, or null when it is not built, fails to load, or DQLORA_CPU_NATIVE=0. Loaded once. */
export function loadCpuNative(): CpuNative | null {
  if (process.env.DQLORA_CPU_NATIVE === '0') return null;
  if (cached !== undefined) return cached;
  cached = null;
  if (!existsSync(CPU_NATIVE_PATH)) {
    log.debug({ path: CPU_NATIVE_PATH }, 'cpu native addon not built; using TypeScript kernels');
    return null;
  }
  try {
    const require = createRequire(import.meta.url);
    const mod = require(CPU_NATIVE_PATH) as CpuNative;
    const missing = NATIVE_FUNCTIONS.filter((f) => typeof (mod as unknown as Record<string, unknown>)[f] !== 'function');
    if (missing.length > 0) {
      // A binary built from older sources (npm ci not re-run after a pull): all or nothing, never a half-native backend.
      log.warn({ path: CPU_NATIVE_PATH, missing }, 'cpu native addon is out of date; using TypeScript kernels (rebuild: node core/engine/cpu-native/build.mjs --force)');
      return null;
    }
    cached = mod;
    log.debug({ isa: cached.isa() }, 'cpu native addon loaded');
  } catch (err) {
    log.warn({ err, path: CPU_NATIVE_PATH }, 'cpu native addon failed to load; using TypeScript kernels (rebuild: node core/engine/cpu-native/build.mjs)');
    cached = null;
  }
  return cached;
}
