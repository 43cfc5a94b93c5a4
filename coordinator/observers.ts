// The job loop's standard observers: the terminal (progress bar or a log line per log_every steps) and the
// Prometheus metrics. Others (status page, train_log.jsonl, ...) plug in the same way (coordinator/events.ts).
import cliProgress from 'cli-progress';
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

/** A progress bar on stderr (when `progress`), else a structured log line every `logEvery` steps, plus eval/checkpoint/recovery lines. */
export function consoleObserver(o: { progress?: boolean; logEvery: number }): JobObserver & { stop(): void } {
  let bar: cliProgress.SingleBar | undefined;
  let total = 0;
  return {
    onStart(e) {
      total = e.totalSteps;
      if (!o.progress) return;
      bar = new cliProgress.SingleBar({
        format: 'train |{bar}| step {value}/{total} | loss {loss} | lr {lr} | {tps} tok/s | eta {eta_formatted}',
        stream: process.stderr, hideCursor: true, etaBuffer: 20,
      }, cliProgress.Presets.shades_classic);
      bar.start(e.totalSteps, e.startStep, { loss: '-', lr: '-', tps: '-' });
    },
    onStep(r) {
      if (bar) { bar.update(r.step, { loss: r.loss.toFixed(4), lr: r.lr.toExponential(2), tps: r.tokensPerSecond.toFixed(0) }); return; }
      if (r.step % o.logEvery !== 0) return;
      log.info({
        step: r.step, total, loss: +r.loss.toFixed(5), lr: r.lr, gradNorm: +r.gradNorm.toFixed(4), epoch: +r.epoch.toFixed(3), tokensPerSec: Math.round(r.tokensPerSecond),
        ...(r.stageTimings.length ? { bubble: +r.bubble.toFixed(3), ms: Math.round(r.seconds * 1000) } : {}),
      }, 'step');
    },
    onEval(e) { log.info({ step: e.step, evalLoss: +e.loss.toFixed(5), perplexity: +e.perplexity.toFixed(3) }, 'eval'); },
    onCheckpoint(e) { log.info({ dir: e.dir, step: e.step }, 'checkpoint written'); },
    onRecovery(e) { log.warn({ step: e.step, attempt: e.attempt, reason: e.reason, resumeFrom: e.resumeFrom || 'initial state' }, 'recovering'); },
    onEnd() { this.stop(); },
    /** Ends the progress bar (before the run prints its results). */
    stop() { bar?.stop(); bar = undefined; },
  };
}

// The metrics observer (job state, recoveries, every dqlora_* gauge) is coordinator/metrics-observer.ts.
