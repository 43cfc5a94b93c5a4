// Recognising a device out-of-memory failure, so a trainer can split the micro-batch and run the step again instead
// of failing (core/train/local.ts), and the job loop can name it when it cannot (a worker's error arrives as text).
import { ConfigError, OUT_OF_MEMORY_CODE, OutOfMemoryError } from '../../common/errors.ts';

/**
 * The failure's text as the backends write it: OutOfMemoryError ("out of device memory on …"), the cuda addon's
 * pool ("cudaMalloc of N bytes failed: out of memory"), a CUDA call that returned cudaErrorMemoryAllocation, cuBLAS
 * failing to allocate. Matched only where the typed error cannot travel (a worker's report, a compute thread).
 */
const OOM_TEXT = /out of device memory|cudaMalloc of \d+ bytes failed|cudaErrorMemoryAllocation|CUBLAS_STATUS_ALLOC_FAILED/;

/** True for an OutOfMemoryError, an addon error with code DQLORA_OOM, or (text only) an error that quotes one. */
export function isOutOfMemory(e: unknown): boolean {
  if (e instanceof OutOfMemoryError) return true;
  if (typeof e === 'object' && e !== null && (e as { code?: unknown }).code === OUT_OF_MEMORY_CODE) return true;
  const m = e instanceof Error ? e.message : typeof e === 'string' ? e : '';
  return OOM_TEXT.test(m);
}

/**
 * DQLORA_MEM_LIMIT_BYTES: a budget for the bytes of live tensors, honoured by both backends (an allocation beyond it
 * throws OutOfMemoryError, exactly as a full device does). For tests of the out-of-memory path without a GPU, and to
 * rehearse a smaller card on a bigger one. Unset or empty = no budget (cuda: the device's memory).
 */
export function memoryLimitFromEnv(env: NodeJS.ProcessEnv = process.env): number | undefined {
  const v = env.DQLORA_MEM_LIMIT_BYTES?.trim();
  if (v === undefined || v === '') return undefined;
  const n = parseByteSize(v);
  if (n === undefined) throw new ConfigError(`DQLORA_MEM_LIMIT_BYTES=${v} is not a byte count`, { hint: 'a positive integer, or a number with a suffix K, M, G, T (powers of 1024), e.g. 512M; unset it for no limit' });
  return n;
}

/** "1048576", "512M", "1.5G" → bytes (powers of 1024); undefined when malformed or not positive. */
export function parseByteSize(s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(s.trim());
  if (!m) return undefined;
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Math.floor(Number(m[1]) * mult);
  return Number.isSafeInteger(n) && n > 0 ? n : undefined;
}

