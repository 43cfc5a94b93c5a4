// The live state of a run, as the status page, `/status` and `coordinator status` show it. Fed only through the
// JobObserver interface: the StatusObserver keeps what the events said and answers snapshots; it never looks into
// the trainer. The step history is kept columnar (one array per series) because that is what the page's charts
// take, and a 10k-step run is then ~5 numbers × 10k, small enough to keep whole.
import type {
  Answer, CheckpointEvent, EvalEvent, JobEndEvent, JobObserver, JobStartEvent, MicroBatchEvent, RecoveryEvent, StageTiming, StepEvent,
} from '../events.ts';

export type RunState = 'waiting' | 'training' | 'succeeded' | 'stopped' | 'failed';

export interface WorkerRow { readonly id: string; readonly stage: number; readonly replica: number; readonly state: string; readonly address?: string }

/** What `GET /status` returns (JSON). Numbers are null until the run has produced them. */
export interface StatusSnapshot {
  readonly state: RunState;
  readonly job: JobStartEvent | null;
  readonly step: number;
  readonly totalSteps: number;
  readonly epoch: number | null;
  readonly loss: number | null;
  readonly evalLoss: number | null;
  readonly perplexity: number | null;
  readonly lr: number | null;
  readonly gradNorm: number | null;
  /** Of the last step. */
  readonly tokensPerSecond: number | null;
  /** Over this invocation's steps. */
  readonly meanTokensPerSecond: number | null;
  readonly bubble: number | null;
  /** Seconds since onStart. */
  readonly elapsedSeconds: number;
  /** Remaining steps × the mean wall time of the last ETA_WINDOW steps; null before the first step or when done. */
  readonly etaSeconds: number | null;
  readonly startedAt: string | null;
  readonly updatedAt: string | null;
  readonly workers: readonly WorkerRow[];
  /** The last step's per stage-replica timings (with its timeline spans when the executor recorded them). */
  readonly lastStep: { readonly step: number; readonly seconds: number; readonly stageTimings: readonly StageTiming[] } | null;
  readonly lastCheckpoint: CheckpointEvent | null;
  readonly recoveries: readonly RecoveryEvent[];
  /** Sequences per micro-batch in use (requested, auto's pick, or after out-of-memory splits) and how many splits. */
  readonly microBatch: (MicroBatchEvent & { readonly splits: number }) | null;
  readonly evals: readonly EvalEvent[];
  /** Before/after answers (at the end of a successful run). */
  readonly answers: readonly Answer[];
  readonly end: Omit<JobEndEvent, 'answers'> | null;
  /** Bumped when a recovery rolled the step history back: a client that pulls /history incrementally starts over. */
  readonly historyVersion: number;
}

/** `GET /history?since=N`: the step series from step N+1 on (columnar, equal lengths). */
export interface StepHistory {
  readonly step: number[];
  readonly loss: number[];
  readonly lr: number[];
  readonly gradNorm: number[];
  readonly tokensPerSecond: number[];
}

export const ETA_WINDOW = 20;

export class StatusObserver implements JobObserver {
  private job: JobStartEvent | null = null;
  private state: RunState = 'waiting';
  private t0: number | null = null;
  private updated: number | null = null;
  private last: StepEvent | null = null;
  private readonly hist: StepHistory = { step: [], loss: [], lr: [], gradNorm: [], tokensPerSecond: [] };
  private readonly recentSeconds: number[] = [];
  private readonly evals: EvalEvent[] = [];
  private workers: WorkerRow[] = [];
  private checkpoint: CheckpointEvent | null = null;
  private readonly recoveries: RecoveryEvent[] = [];
  private microBatch: (MicroBatchEvent & { splits: number }) | null = null;
  private end: JobEndEvent | null = null;
  private tokens = 0;
  private stepSeconds = 0;
  private historyVersion = 0;
  private readonly listeners = new Set<() => void>();

  /** `now` in milliseconds (tests pass a fake clock). */
  constructor(private readonly now: () => number = Date.now) {}

  onStart(e: JobStartEvent): void {
    this.job = e;
    this.state = 'training';
    this.t0 = this.now();
    this.touch();
  }

  onStep(e: StepEvent): void {
    // A recovery rolls the run back: steps after the checkpoint are done again, so the history restarts there.
    const h = this.hist;
    if (h.step.length && h.step[h.step.length - 1] >= e.step) this.historyVersion++;
    while (h.step.length && h.step[h.step.length - 1] >= e.step) for (const k of Object.keys(h) as (keyof StepHistory)[]) h[k].pop();
    h.step.push(e.step); h.loss.push(e.loss); h.lr.push(e.lr); h.gradNorm.push(e.gradNorm); h.tokensPerSecond.push(e.seconds > 0 ? e.tokens / e.seconds : 0);
    this.recentSeconds.push(e.seconds);
    if (this.recentSeconds.length > ETA_WINDOW) this.recentSeconds.shift();
    this.tokens += e.tokens; this.stepSeconds += e.seconds;
    this.last = e;
    this.touch();
  }

  onEval(e: EvalEvent): void {
    while (this.evals.length && this.evals[this.evals.length - 1].step >= e.step) this.evals.pop();
    this.evals.push(e);
    this.touch();
  }

  onCheckpoint(e: CheckpointEvent): void { this.checkpoint = e; this.touch(); }
  onRecovery(e: RecoveryEvent): void { this.recoveries.push(e); this.touch(); }
  onMicroBatch(e: MicroBatchEvent): void {
    this.microBatch = { ...e, splits: (this.microBatch?.splits ?? 0) + (e.reason === 'out-of-memory' ? 1 : 0) };
    this.touch();
  }
  onWorkers(workers: readonly WorkerRow[]): void { this.workers = workers.map((w) => ({ ...w })); this.touch(); }

  onEnd(e: JobEndEvent): void {
    this.end = e;
    this.state = e.status;
    this.touch();
  }

  private touch(): void {
    this.updated = this.now();
    for (const f of this.listeners) f();
  }

  /** Calls `f` after every change (the HTTP thread's mirror); returns the unsubscribe function. */
  subscribe(f: () => void): () => void {
    this.listeners.add(f);
    return () => { this.listeners.delete(f); };
  }

  snapshot(): StatusSnapshot {
    const last = this.last, end = this.end;
    const step = end?.step ?? last?.step ?? this.job?.startStep ?? 0;
    const totalSteps = end?.totalSteps ?? last?.totalSteps ?? this.job?.totalSteps ?? 0;
    const lastEval = this.evals.at(-1) ?? null;
    const mean = this.recentSeconds.length ? this.recentSeconds.reduce((a, b) => a + b, 0) / this.recentSeconds.length : null;
    const { answers: _answers, ...endRest } = end ?? { answers: [] };
    return {
      state: this.state,
      job: this.job,
      step, totalSteps,
      epoch: last?.epoch ?? null,
      loss: last?.loss ?? null,
      evalLoss: lastEval?.loss ?? null,
      perplexity: lastEval?.perplexity ?? null,
      lr: last?.lr ?? null,
      gradNorm: last?.gradNorm ?? null,
      tokensPerSecond: last && last.seconds > 0 ? last.tokens / last.seconds : null,
      meanTokensPerSecond: this.stepSeconds > 0 ? this.tokens / this.stepSeconds : null,
      bubble: last?.bubble ?? null,
      elapsedSeconds: this.t0 === null ? 0 : ((end ? this.updated! : this.now()) - this.t0) / 1000,
      etaSeconds: mean === null || end || this.state !== 'training' ? null : Math.max(0, totalSteps - step) * mean,
      startedAt: this.t0 === null ? null : new Date(this.t0).toISOString(),
      updatedAt: this.updated === null ? null : new Date(this.updated).toISOString(),
      workers: this.workers,
      lastStep: last ? { step: last.step, seconds: last.seconds, stageTimings: last.stageTimings } : null,
      lastCheckpoint: this.checkpoint,
      recoveries: this.recoveries,
      microBatch: this.microBatch,
      evals: this.evals,
      answers: end?.answers ?? [],
      end: end ? endRest as Omit<JobEndEvent, 'answers'> : null,
      historyVersion: this.historyVersion,
    };
  }

  /** The step series after step `since` (0 = all). */
  history(since = 0): StepHistory {
    const h = this.hist;
    let i = 0;
    while (i < h.step.length && h.step[i] <= since) i++;
    return { step: h.step.slice(i), loss: h.loss.slice(i), lr: h.lr.slice(i), gradNorm: h.gradNorm.slice(i), tokensPerSecond: h.tokensPerSecond.slice(i) };
  }
}
