// Which registered worker serves stage s of replica r: the biggest stages (by the planner's bytes) go to the
// workers reporting the most free memory.
import { ConfigError } from '../../common/errors.ts';

export interface WorkerSlot { readonly id: string; readonly freeMemoryBytes: number }

/**
 * Assigns workers to (stage, replica) slots: within each replica, stages sorted by bytes (largest first)
 * get workers sorted by free memory (largest first). Workers are taken in registration order for ties, so
 * the same registrations give the same layout. Throws when a worker cannot hold its stage.
 */
export function assignWorkers<W extends WorkerSlot>(workers: readonly W[], stageBytes: readonly number[], replicas: number): W[][] {
  const S = stageBytes.length;
  if (workers.length < S * replicas) throw new ConfigError(`${S} stages × ${replicas} replicas need ${S * replicas} workers, ${workers.length} registered`);
  const pool = [...workers].sort((x, y) => y.freeMemoryBytes - x.freeMemoryBytes);
  const order = stageBytes.map((b, s) => ({ b, s })).sort((x, y) => y.b - x.b || x.s - y.s);
  const out: W[][] = Array.from({ length: replicas }, () => new Array<W>(S));
  let k = 0;
  for (const { b, s } of order) {
    for (let r = 0; r < replicas; r++) {
      const w = pool[k++];
      // Free memory 0 means "unknown" (a device that does not report it): no check.
      if (w.freeMemoryBytes > 0 && w.freeMemoryBytes < b) {
        throw new ConfigError(`worker ${w.id} reports ${(w.freeMemoryBytes / 2 ** 20).toFixed(0)} MiB free, stage ${s} needs about ${(b / 2 ** 20).toFixed(0)} MiB`, { hint: 'use more stages (distributed.stages) or workers with more memory' });
      }
      out[r][s] = w;
    }
  }
  return out;
}
