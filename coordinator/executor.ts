// The step executor: what the job loop (coordinator/run.ts) drives. Two implementations — the stages in this
// process (coordinator/in-process.ts) and stages on worker processes (coordinator/distributed/workers.ts) — so a
// one-process run and a distributed run differ only here.
import type { Example } from '../core/train/batch.ts';
import type { StepInput, StepOutcome } from '../core/train/steps.ts';
import type { Checkpoint, OptimizerMoments } from '../common/checkpoint.ts';
import type { LoraTensors } from '../common/peft.ts';
import type { StageTiming } from './events.ts';

/** Per-step measurements of a distributed step (bench/distributed.ts and bench/multigpu.ts read them). */
export interface StepTiming {
  readonly step: number;
  readonly seconds: number;
  /** Mean over workers of idle / schedule wall time. */
  readonly bubble: number;
  readonly grpcBytes: number;
  readonly natsBytes: number;
  /** Slowest worker's all-reduce time in this step (s). */
  readonly allreduceSeconds: number;
  /** Slowest worker's time waiting on other stages (activation/gradient transfer + the bubble) (s). */
  readonly idleSeconds: number;
  /** Highest event-loop delay p99 of any worker during the step (s): compute must never block a worker's loop. */
  readonly eventLoopLagP99: number;
  /** Per stage replica: forward, backward, waiting and all-reduce seconds (empty in one process). */
  readonly stages: readonly StageTiming[];
}

export interface ExecutedStep extends StepOutcome {
  /** Per stage replica (empty in one process). */
  readonly stageTimings: readonly StageTiming[];
  readonly bubble: number;
  readonly grpcBytes: number;
  readonly natsBytes: number;
  /** Highest worker event-loop delay p99 in the step (s); 0 in one process. */
  readonly eventLoopLagP99: number;
}

export interface Snapshot {
  readonly modules: LoraTensors[];
  readonly moments: OptimizerMoments[];
  /** Bytes the snapshot took to collect (wire bytes from workers; 0 in one process). */
  readonly bytes: number;
}

export interface StepExecutor {
  readonly kind: 'in-process' | 'workers';
  readonly backend: string;
  /**
   * Brings every stage to the state of checkpoint `from`, or to the initial adapter when undefined (workers: waits
   * for enough of them and (re-)assigns the stages first). Called before the first step and after each recovery.
   */
  start(from: Checkpoint | undefined): Promise<void>;
  /** Runs one optimizer step to the end: forward, backward, (all-reduce), clip, AdamW on every stage. */
  step(input: StepInput): Promise<ExecutedStep>;
  /** Mean token loss over examples (no dropout, no gradients). */
  evaluate(examples: readonly Example[]): Promise<{ loss: number; perplexity: number; tokens: number }>;
  /** The adapter and, with `withMoments`, the AdamW moments of every stage. */
  snapshot(withMoments: boolean): Promise<Snapshot>;
  /** A failure the loop survives by rolling back to the last checkpoint and calling start() again. */
  recoverable(e: unknown): boolean;
  /** After a recoverable failure: stop what is still running (survivors drop the step in flight). */
  pause(reason: string): void;
  /** Answers with the model in this process (in-process only): base (lora false) or fine-tuned. */
  answer?(prompts: string[], lora: boolean): string[];
  /**
   * Ends the executor. `jobOver: false` (a stop signal, the run resumes later): remote workers are not told
   * Shutdown, so they exit "coordinator lost" (75) and rejoin the restarted coordinator instead of completing.
   */
  close(o?: { jobOver?: boolean }): Promise<void>;
}
