// What the job loop tells the outside world while it runs: one observer interface for everything that watches a
// run (log lines, the progress bar, Prometheus metrics, the /status page, train_log.jsonl, TensorBoard files).
// The loop calls every registered observer in order; an observer never changes the run, and an observer that
// throws is logged and dropped, never allowed to fail the job.
import type { StepResult } from '../core/train/steps.ts';

/** Fixed facts of a run, known once the data is tokenized and the layout planned. */
export interface JobStartEvent {
  readonly name: string;
  readonly outputDir: string;
  readonly totalSteps: number;
  /** Optimizer steps already done (a resumed run starts above 0). */
  readonly startStep: number;
  readonly stepsPerEpoch: number;
  readonly stages: number;
  readonly replicas: number;
  /** 'in-process' (one process) or 'workers' (local or remote worker processes). */
  readonly executor: 'in-process' | 'workers';
  readonly backend: string;
  readonly trainExamples: number;
  readonly validationExamples: number;
  /** The checkpoint resumed from, if any. */
  readonly resumedFrom?: string;
}

/** One stage replica's share of a step, as its executor measured it (seconds). */
export interface StageTiming {
  readonly stage: number;
  readonly replica: number;
  readonly forwardSeconds: number;
  readonly backwardSeconds: number;
  /** Waiting on other stages (transfers + the pipeline bubble). */
  readonly idleSeconds: number;
  readonly allreduceSeconds: number;
  /** Wall time of the stage's whole micro-batch schedule. */
  readonly pipelineSeconds: number;
  /** Per-phase intervals of the step's timeline, relative to the stage's step start (seconds), when recorded. */
  readonly spans?: readonly TimelineSpan[];
}

export interface TimelineSpan {
  readonly kind: 'forward' | 'backward' | 'wait' | 'allreduce' | 'optimizer';
  readonly micro: number;   // micro-batch index, −1 for whole-step phases (all-reduce, optimizer)
  readonly start: number;
  readonly end: number;
}

/** A finished optimizer step (core/train/steps.ts StepResult: step, loss, lr, grad norm, tokens, epoch) and its timing. */
export interface StepEvent extends StepResult {
  readonly totalSteps: number;
  readonly seconds: number;     // wall time of the step
  /** Tokens per second over this invocation's steps so far. */
  readonly tokensPerSecond: number;
  /** Mean over stage replicas of idle / schedule time (0 in one process with one stage). */
  readonly bubble: number;
  readonly stageTimings: readonly StageTiming[];
}

export interface EvalEvent { readonly step: number; readonly loss: number; readonly perplexity: number; readonly tokens: number }

export interface CheckpointEvent { readonly step: number; readonly dir: string; readonly bytes: number; readonly seconds: number }

export interface RecoveryEvent {
  readonly step: number;
  readonly attempt: number;
  readonly reason: string;
  /** The checkpoint the job rolls back to ('' = the initial state). */
  readonly resumeFrom: string;
}

/**
 * The micro-batch size the steps run with: once at the start (as requested, or what `micro_batch_size: auto`
 * picked), then after each out-of-memory split (core/train/micro-split.ts).
 */
export interface MicroBatchEvent {
  /** Optimizer steps done when it was decided (the split step itself runs again with the new size). */
  readonly step: number;
  readonly reason: 'requested' | 'auto' | 'out-of-memory';
  /** Sequences (rows) per micro-batch from now on. */
  readonly rows: number;
  /** out-of-memory: the size that did not fit. */
  readonly previousRows?: number;
  /** Sequences per optimizer step and replica (micro_batch_size × grad_accum, or batch_size): never changed by a split. */
  readonly batchSize: number;
  /** auto: each candidate tried, largest first. */
  readonly tried?: readonly { readonly rows: number; readonly fits: boolean; readonly error?: string }[];
  /** out-of-memory: the error's first line. */
  readonly message?: string;
}

export interface Answer { readonly prompt: string; readonly base: string; readonly tuned: string }

export interface JobEndEvent {
  readonly status: 'succeeded' | 'stopped' | 'failed';
  readonly step: number;
  readonly totalSteps: number;
  readonly firstLoss: number;
  readonly lastLoss: number;
  readonly evalLoss: number | null;
  readonly seconds: number;
  readonly tokensPerSecond: number;
  /** The adapter written (output_dir/adapter on success, the checkpoint's adapter when stopped). */
  readonly adapterDir?: string;
  readonly answers: readonly Answer[];
  /** The failure's message (status 'failed'). */
  readonly error?: string;
}

/** Every method is optional; the loop awaits none of them (observers must not block a step). */
export interface JobObserver {
  onStart?(e: JobStartEvent): void;
  onStep?(e: StepEvent): void;
  onEval?(e: EvalEvent): void;
  onCheckpoint?(e: CheckpointEvent): void;
  onRecovery?(e: RecoveryEvent): void;
  onMicroBatch?(e: MicroBatchEvent): void;
  /** Worker table changes (distributed runs): id, stage, replica, state. */
  onWorkers?(workers: readonly { id: string; stage: number; replica: number; state: string; address?: string }[]): void;
  onEnd?(e: JobEndEvent): void;
}
