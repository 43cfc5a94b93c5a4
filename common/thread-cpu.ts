// CPU time of the calling thread (not the process), for benchmarks that split work over worker threads: Node 20
// has process.cpuUsage() for the whole process only. Linux's /proc/thread-self/schedstat gives the thread's time on
// a CPU in ns; elsewhere this falls back to the process's (then per-thread numbers are not per thread).
import { readFileSync } from 'node:fs';

/** ms of CPU this thread has run, since it started. */
export function threadCpuMs(): number {
  try {
    return Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0]) / 1e6;
  } catch {
    const u = process.cpuUsage();
    return (u.user + u.system) / 1000;
  }
}
