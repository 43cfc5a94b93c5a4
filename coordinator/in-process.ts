// The step executor that keeps every stage in this process (distributed.workers: 0): the model is loaded here,
// split into distributed.stages stages by the one planner, and stepped by core/train's LocalPipeline.
import type { JobConfig } from './job.ts';
import type { ExecutedStep, Snapshot, StepExecutor } from './executor.ts';
import { answerPrompts, type Decoder } from './answer.ts';
import type { Backend } from '../core/engine/backend.ts';
import type { ModelConfig } from '../core/model/config.ts';
import type { LlamaStage, LoraConfig } from '../core/model/llama.ts';
import { loadStage } from '../core/model/loader.ts';
import { linearBytesPerParam, stageLoadOptions } from './features.ts';
import { planStages } from '../core/train/plan.ts';
import { LocalPipeline } from '../core/train/local.ts';
import { autoMicroBatchCandidates, type MicroBatchSplit } from '../core/train/micro-split.ts';
import type { Example } from '../core/train/batch.ts';
import type { StepInput } from '../core/train/steps.ts';
import type { Checkpoint } from '../common/checkpoint.ts';
import { logger } from '../common/log.ts';
import { progress } from '../common/progress.ts';

const log = logger('job');

/** What `micro_batch_size: auto` settled on (InProcessExecutor.autoMicroBatchSize). */
export interface AutoMicroBatch {
  readonly rows: number;
  /** False on the cpu backend without DQLORA_MEM_LIMIT_BYTES: batch_size is taken without probing. */
  readonly probed: boolean;
  readonly tried: readonly { readonly rows: number; readonly fits: boolean; readonly error?: string }[];
}

export class InProcessExecutor implements StepExecutor {
  readonly kind = 'in-process';
  private stepsDone = 0;
  private constructor(private readonly job: JobConfig, private readonly be: Backend, private readonly pipeline: LocalPipeline, private readonly tok: Decoder, private readonly padId: number, private microBatchSize: number) {}

  get backend(): string { return this.be.name; }

  /** Loads and quantizes the model into `stages` local stages. */
  static open(job: JobConfig, o: { be: Backend; cfg: ModelConfig; lora: LoraConfig; stages: number; tok: Decoder; padId: number; microBatchSize: number; progress?: boolean; onSplit?: (s: MicroBatchSplit) => void }): InProcessExecutor {
    const loading = progress('load + quantize', log, { tty: o.progress });
    const stages: LlamaStage[] = planStages(o.cfg, o.stages, linearBytesPerParam(job)).specs.map((spec, i) => loadStage(o.be, job.model, spec, {
      lora: o.lora, seed: job.training.seed, ...stageLoadOptions(job),
      onProgress: (d, t, name) => loading.update(d, t, `stage ${i}: ${name}`),
    }));
    loading.stop();
    log.info({ stages: stages.map((s) => s.spec), memoryBytes: o.be.memoryInUse() }, 'model loaded');
    const t = job.training;
    const pipeline = new LocalPipeline(o.be, stages, { seed: t.seed, maxGradNorm: t.max_grad_norm, beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weightDecay: t.weight_decay });
    pipeline.onSplit = o.onSplit;
    return new InProcessExecutor(job, o.be, pipeline, o.tok, o.padId, o.microBatchSize);
  }

  /**
   * `training.micro_batch_size: auto`: the largest candidate of `batchSize` (micro-split.ts) whose forward + backward
   * on sequences of T tokens fits the backend's memory budget. A backend without one (cpu without
   * DQLORA_MEM_LIMIT_BYTES) is not probed: host memory is the limit there, and batchSize is taken.
   */
  autoMicroBatchSize(batchSize: number, T: number): AutoMicroBatch {
    const candidates = autoMicroBatchCandidates(batchSize);
    const budget = this.be.memoryBudget();
    const r = budget === undefined ? { rows: batchSize, tried: [], probed: false } : { ...this.pipeline.probeMicroBatchRows(candidates, T, this.padId), probed: true };
    this.microBatchSize = r.rows;
    log.info({ microBatchSize: r.rows, batchSize, tokens: T, probed: r.probed, tried: r.tried, budgetBytes: budget, memoryBytes: this.be.memoryInUse() }, 'micro_batch_size: auto');
    return r;
  }

  async start(from: Checkpoint | undefined): Promise<void> {
    // The stages were created with the initial adapter; a recovery never happens in one process.
    if (from) this.pipeline.restore(from);
  }

  async step(input: StepInput): Promise<ExecutedStep> {
    this.stepsDone = input.step;
    const out = this.pipeline.step(input);
    this.stepsDone = input.step + 1;
    return { ...out, stageTimings: [], bubble: 0, grpcBytes: 0, natsBytes: 0, eventLoopLagP99: 0 };
  }

  async evaluate(examples: readonly Example[]): Promise<{ loss: number; perplexity: number; tokens: number }> {
    return this.pipeline.evaluate(examples, this.microBatchSize, this.padId, this.stepsDone);
  }

  /** `bytes`: the host bytes of the adapter and moments copied out (what a checkpoint holds). */
  async snapshot(): Promise<Snapshot> {
    const snap = this.pipeline.snapshot();
    let bytes = 0;
    for (const x of [...snap.modules, ...snap.moments]) for (const v of Object.values(x)) if (ArrayBuffer.isView(v)) bytes += v.byteLength;
    return { ...snap, bytes };
  }

  recoverable(): boolean { return false; }
  pause(): void { /* nothing runs concurrently in one process */ }

  answer(prompts: string[], lora: boolean): string[] {
    return answerPrompts(this.pipeline.stages, this.tok, prompts, { maxNewTokens: this.job.compare.max_new_tokens, lora });
  }

  async close(): Promise<void> { /* the stages go with the process */ }
}
