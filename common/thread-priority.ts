// Lowers the scheduling priority (raises the nice value) of the calling thread only — on Linux, nice is per thread,
// and threads started afterwards by this one (e.g. the native kernels' pool) inherit it. A worker's compute thread
// calls it so that, on a machine with fewer cores than busy threads, the kernel scheduler runs the worker's event
// loop (gRPC transfers, the NATS all-reduce, heartbeats) as soon as it wakes instead of after the compute's time
// slice: the loop's latency stays low while the compute keeps every core it is not sharing. No-op elsewhere.
import { readlinkSync } from 'node:fs';
import os from 'node:os';

/** The nice value set on a worker's compute thread: DQLORA_COMPUTE_NICE (0 = leave it), default 5. */
export function computeNice(env: NodeJS.ProcessEnv = process.env): number {
  const raw = env.DQLORA_COMPUTE_NICE;
  if (raw === undefined || raw === '') return 5;
  const n = Number(raw);
  return Number.isInteger(n) && n >= 0 && n <= 19 ? n : 5;
}

/**
 * Adds `nice` to the calling thread's nice value (never lowers it: that needs privileges). Returns the thread's
 * nice value afterwards, or undefined where per-thread priorities are not available (not Linux, no /proc).
 */
export function niceThisThread(nice: number): number | undefined {
  if (process.platform !== 'linux' || nice <= 0) return undefined;
  try {
    const tid = Number(readlinkSync('/proc/thread-self').split('/').pop()); // "<pid>/task/<tid>"
    if (!Number.isInteger(tid) || tid <= 0) return undefined;
    const now = os.getPriority(tid);
    const want = Math.min(19, Math.max(now, nice));
    if (want !== now) os.setPriority(tid, want);
    return os.getPriority(tid);
  } catch {
    return undefined;
  }
}
