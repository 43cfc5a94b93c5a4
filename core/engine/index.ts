// Picks a Backend by name. 'auto' prefers cuda when its addon is built and a GPU is present, else cpu.
import type { Backend } from './backend.ts';
import { createCpuBackend } from './cpu.ts';
import { BackendError } from '../../common/errors.ts';
import { memoryLimitFromEnv } from './oom.ts';
import { logger } from '../../common/log.ts';

export type BackendName = 'cpu' | 'cuda' | 'auto';

/**
 * Threads of the cpu backend from DQLORA_CPU_THREADS (the local launcher splits the cores between the worker
 * processes it starts); undefined = all cores.
 */
function cpuThreads(): number | undefined {
  const v = process.env.DQLORA_CPU_THREADS;
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new BackendError(`DQLORA_CPU_THREADS=${v} must be a positive integer`);
  return n;
}

/** Both backends honour DQLORA_MEM_LIMIT_BYTES (core/engine/oom.ts): a budget for live tensor bytes. */
export async function createBackend(name: BackendName = 'auto'): Promise<Backend> {
  const memoryLimitBytes = memoryLimitFromEnv();
  if (name === 'cpu') return createCpuBackend({ threads: cpuThreads(), memoryLimitBytes });
  let cudaErr: unknown;
  try {
    const mod = await import('./cuda/cuda.ts');
    return mod.createCudaBackend({ memoryLimitBytes });
  } catch (e) {
    cudaErr = e;
  }
  if (name === 'cuda') {
    throw new BackendError(`the cuda backend is not available: ${(cudaErr as Error).message}`, {
      hint: 'it needs nvcc at `npm ci` time (to build core/engine/cuda) and an NVIDIA GPU; use backend: cpu otherwise',
      cause: cudaErr,
    });
  }
  logger('engine').debug({ reason: (cudaErr as Error).message }, 'cuda backend not available, using cpu');
  return createCpuBackend({ threads: cpuThreads(), memoryLimitBytes });
}
