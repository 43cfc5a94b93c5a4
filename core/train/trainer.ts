// The whole training loop of one process as one synchronous object: a StepPlanner (which samples, which lr)
// driving a LocalPipeline (forward, backward, clip, AdamW). Tests and benchmarks use it directly; the job loop
// (coordinator/run.ts) runs the same two pieces with checkpoints, evaluation, observers and recovery around them.
import type { Backend } from '../engine/backend.ts';
import type { LlamaStage } from '../model/llama.ts';
import type { Example } from './batch.ts';
import { LocalPipeline } from './local.ts';
import { StepPlanner, type StepResult, type StepSettings } from './steps.ts';
import { checkFingerprints, type OptimizerSettings } from './step.ts';
import type { Checkpoint, OptimizerMoments, TrainerState } from '../../common/checkpoint.ts';
import type { LoraTensors } from '../../common/peft.ts';

export interface TrainSettings extends StepSettings, OptimizerSettings {
  readonly maxGradNorm: number;
}

export class Trainer {
  readonly planner: StepPlanner;
  readonly pipeline: LocalPipeline;
  state: TrainerState;

  constructor(readonly be: Backend, readonly stages: LlamaStage[], readonly train: Example[], readonly settings: TrainSettings, fingerprints: { configHash: string; dataHash: string }) {
    this.planner = new StepPlanner(train, settings);
    this.pipeline = new LocalPipeline(be, stages, settings);
    this.state = { step: 0, totalSteps: this.totalSteps, stepsPerEpoch: this.stepsPerEpoch, ...fingerprints, history: [], evalHistory: [] };
  }

  get stepsPerEpoch(): number { return this.planner.stepsPerEpoch; }
  get totalSteps(): number { return this.planner.totalSteps; }
  get warmup(): number { return this.planner.warmup; }
  get done(): boolean { return this.state.step >= this.totalSteps; }

  /** Runs optimizer step `state.step` and returns what happened. */
  step(): StepResult {
    const input = this.planner.input(this.state.step);
    return this.planner.record(this.state, input, this.pipeline.step(input));
  }

  evaluate(examples: Example[], microBatchSize = this.settings.microBatchSize): { loss: number; perplexity: number; tokens: number } {
    return this.pipeline.evaluate(examples, microBatchSize, this.settings.padId);
  }

  snapshot(): { modules: LoraTensors[]; moments: OptimizerMoments[] } { return this.pipeline.snapshot(); }

  /** Restores adapter weights, optimizer moments and the step counter from a checkpoint. */
  restore(ck: Checkpoint): void {
    checkFingerprints(ck.dir, ck.state, this.state);
    this.pipeline.restore(ck);
    this.state = { ...ck.state, history: [...ck.state.history], evalHistory: [...ck.state.evalHistory] };
  }
}
