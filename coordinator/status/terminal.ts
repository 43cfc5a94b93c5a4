// What a person at the terminal sees while a job runs: a training bar on the last line of stderr (step, loss, lr,
// tokens/s, ETA) with log lines printing above it; without a terminal, a 'step' log line every log_every steps.
// Evaluations, checkpoints, recoveries (as warnings) and the end are log lines in both cases.
import { logger, type Logger } from '../../common/log.ts';
import { progress, type Progress } from '../../common/progress.ts';
import type { Terminal } from '../../common/terminal.ts';
import type { CheckpointEvent, EvalEvent, JobEndEvent, JobObserver, JobStartEvent, RecoveryEvent, StepEvent } from '../events.ts';
import { ETA_WINDOW } from './state.ts';

export function formatDuration(s: number): string {
  if (!Number.isFinite(s)) return '?';
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, '0')}m` : m ? `${m}m${String(r).padStart(2, '0')}s` : `${r}s`;
}

export class TerminalObserver implements JobObserver {
  private bar: Progress | null = null;
  private readonly recent: number[] = [];
  private readonly log: Logger;

  /** barOnly: just the bar (on a terminal), no log lines — while another observer writes them. */
  constructor(private readonly o: { tty?: boolean; logEvery?: number; terminal?: Terminal; log?: Logger; barOnly?: boolean } = {}) {
    this.log = o.log ?? logger('train');
  }

  onStart(e: JobStartEvent): void {
    if (!this.o.barOnly) this.log.info({ steps: e.totalSteps, from: e.startStep, stepsPerEpoch: e.stepsPerEpoch, stages: e.stages, replicas: e.replicas, backend: e.backend, train: e.trainExamples, validation: e.validationExamples }, 'training');
    const tty = this.o.tty ?? this.o.terminal?.isTTY ?? process.stderr.isTTY === true;
    if (tty) {
      this.bar = progress('train', this.log, { tty: true, terminal: this.o.terminal, minIntervalMs: 0 }); // one redraw per step
      this.bar.update(e.startStep, e.totalSteps, 'starting');
    }
  }

  onStep(e: StepEvent): void {
    this.recent.push(e.seconds);
    if (this.recent.length > ETA_WINDOW) this.recent.shift();
    const eta = (e.totalSteps - e.step) * (this.recent.reduce((a, b) => a + b, 0) / this.recent.length);
    const tps = e.seconds > 0 ? e.tokens / e.seconds : 0;
    if (this.bar) {
      this.bar.update(e.step, e.totalSteps, `loss ${e.loss.toFixed(4)} | lr ${e.lr.toExponential(2)} | ${tps.toFixed(0)} tok/s | eta ${formatDuration(eta)}`);
    } else if (!this.o.barOnly && e.step % (this.o.logEvery ?? 1) === 0 || e.step === e.totalSteps) {
      this.log.info({ step: e.step, total: e.totalSteps, loss: +e.loss.toFixed(5), lr: e.lr, gradNorm: +e.gradNorm.toFixed(4), epoch: +e.epoch.toFixed(3), tokensPerSec: Math.round(tps), etaSeconds: Math.round(eta) }, 'step');
    }
  }

  onEval(e: EvalEvent): void { if (!this.o.barOnly) this.log.info({ step: e.step, evalLoss: +e.loss.toFixed(5), perplexity: +e.perplexity.toFixed(3) }, 'eval'); }
  onCheckpoint(e: CheckpointEvent): void { if (!this.o.barOnly) this.log.info({ step: e.step, dir: e.dir, bytes: e.bytes, seconds: +e.seconds.toFixed(2) }, 'checkpoint written'); }
  onRecovery(e: RecoveryEvent): void { if (!this.o.barOnly) this.log.warn({ step: e.step, attempt: e.attempt, resumeFrom: e.resumeFrom || '(initial state)' }, `recovering: ${e.reason}`); }

  onEnd(e: JobEndEvent): void {
    this.bar?.stop();
    this.bar = null;
    if (this.o.barOnly) return;
    const f = { status: e.status, step: e.step, total: e.totalSteps, seconds: +e.seconds.toFixed(1), firstLoss: +e.firstLoss.toFixed(4), lastLoss: +e.lastLoss.toFixed(4), evalLoss: e.evalLoss === null ? undefined : +e.evalLoss.toFixed(4) };
    if (e.status === 'failed') this.log.error({ ...f, error: e.error }, 'job failed');
    else this.log.info(f, e.status === 'stopped' ? 'job stopped' : 'job finished');
  }
}
