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
import type { Example } from '../core/train/batch.ts';
import type { StepInput } from '../core/train/steps.ts';
import type { Checkpoint } from '../common/checkpoint.ts';
import { logger } from '../common/log.ts';
import { progress } from '../common/progress.ts';

const log = logger('job');

export class InProcessExecutor implements StepExecutor {
  readonly kind = 'in-process';
  private constructor(private readonly job: JobConfig, private readonly be: Backend, private readonly pipeline: LocalPipeline, private readonly tok: Decoder, private readonly padId: number) {}

  get backend(): string { return this.be.name; }

  /** Loads and quantizes the model into `stages` local stages. */
  static open(job: JobConfig, o: { be: Backend; cfg: ModelConfig; lora: LoraConfig; stages: number; tok: Decoder; padId: number; progress?: boolean }): InProcessExecutor {
    const loading = progress('load + quantize', log, { tty: o.progress });
    const stages: LlamaStage[] = planStages(o.cfg, o.stages, linearBytesPerParam(job)).specs.map((spec, i) => loadStage(o.be, job.model, spec, {
      lora: o.lora, seed: job.training.seed, ...stageLoadOptions(job),
      onProgress: (d, t, name) => loading.update(d, t, `stage ${i}: ${name}`),
    }));
    loading.stop();
    log.info({ stages: stages.map((s) => s.spec), memoryBytes: o.be.memoryInUse() }, 'model loaded');
    const t = job.training;
    const pipeline = new LocalPipeline(o.be, stages, { seed: t.seed, maxGradNorm: t.max_grad_norm, beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weightDecay: t.weight_decay });
    return new InProcessExecutor(job, o.be, pipeline, o.tok, o.padId);
  }

  async start(from: Checkpoint | undefined): Promise<void> {
    // The stages were created with the initial adapter; a recovery never happens in one process.
    if (from) this.pipeline.restore(from);
  }

  async step(input: StepInput): Promise<ExecutedStep> {
    return { ...this.pipeline.step(input), stageTimings: [], bubble: 0, grpcBytes: 0, natsBytes: 0, eventLoopLagP99: 0 };
  }

  async evaluate(examples: readonly Example[]): Promise<{ loss: number; perplexity: number; tokens: number }> {
    return this.pipeline.evaluate(examples, this.job.training.micro_batch_size, this.padId);
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
