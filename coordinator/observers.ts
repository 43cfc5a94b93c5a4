// How the job loop tells its observers (coordinator/events.ts): the terminal, the status page, train_log.jsonl,
// loss.svg, TensorBoard files (coordinator/status/) and the Prometheus metrics (coordinator/metrics-observer.ts).
import type { JobObserver } from './events.ts';
import { logger } from '../common/log.ts';

const log = logger('job');

type Handlers = Required<JobObserver>;

/** Calls `method` on every observer that has it; an observer that throws is logged and never fails the run. */
export function notify<K extends keyof Handlers>(observers: readonly JobObserver[], method: K, event: Parameters<Handlers[K]>[0]): void {
  for (const o of observers) {
    const fn = o[method] as ((e: unknown) => void) | undefined;
    if (!fn) continue;
    try { fn.call(o, event); } catch (e) { log.warn({ err: (e as Error).message, observer: method }, 'an observer failed; the run goes on'); }
  }
}
