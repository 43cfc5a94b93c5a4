// A pipeline of stages in this process: the in-process step executor. The replicas of a step run one after the
// other and their gradients accumulate in the same LoRA params, which is exactly what the all-reduce gives.
import type { Backend } from '../engine/backend.ts';
import type { LoraParams } from '../engine/lora.ts';
import type { LlamaStage, StageBatch } from '../model/llama.ts';
import { stageLoraTensors } from '../model/adapter.ts';
import type { Example, MicroBatch } from './batch.ts';
import { applyUpdate, clipCoefficient, dropoutKey, gradNormSq, restoreLoraParams, type OptimizerSettings, type StepDropoutKey } from './step.ts';
import { evalBatches, type StepInput, type StepOutcome } from './steps.ts';
import { ConfigError } from '../../common/errors.ts';
import type { Checkpoint, OptimizerMoments } from '../../common/checkpoint.ts';
import type { LoraTensors } from '../../common/peft.ts';

export interface LocalTrainSettings extends OptimizerSettings {
  readonly seed: number;
  readonly maxGradNorm: number;
}

export class LocalPipeline {
  readonly params: LoraParams[];

  constructor(readonly be: Backend, readonly stages: LlamaStage[], readonly settings: LocalTrainSettings) {
    this.params = stages.flatMap((s) => s.loraParams());
    if (this.params.length === 0) throw new ConfigError('no LoRA module matched lora.target_modules', { hint: 'valid names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear' });
  }

  /** Forward + backward of every micro-batch, global norm, clip, AdamW. */
  step(input: StepInput): StepOutcome {
    const dropout = dropoutKey(this.settings.seed, input.step);
    let lossSum = 0;
    input.micro.flat().forEach((mb, id) => { lossSum += this.forwardBackward(id, mb, dropout, input.gradScale); });
    const gradNorm = Math.sqrt(gradNormSq(this.be, this.params));
    applyUpdate(this.be, this.params, { step: input.step, lr: input.lr, clipCoef: clipCoefficient(gradNorm, this.settings.maxGradNorm) }, this.settings);
    return { lossSum, gradNorm };
  }

  /** Forward and backward of one micro-batch through the stages; returns its summed token loss. */
  private forwardBackward(id: number, mb: MicroBatch, dropout: StepDropoutKey, gradScale: number): number {
    const batch: StageBatch = mb;
    let hidden;
    let lossSum = 0;
    for (const stage of this.stages) {
      const r = stage.forward(id, batch, hidden, { train: true, dropout, gradScale });
      hidden = r.hidden;
      if (r.lossSum !== undefined) lossSum = r.lossSum;
    }
    let d;
    for (let i = this.stages.length - 1; i >= 0; i--) d = this.stages[i].backward(id, d);
    return lossSum;
  }

  /** Mean token loss and perplexity over `examples` (no dropout, no gradients). */
  evaluate(examples: readonly Example[], microBatchSize: number, padId: number): { loss: number; perplexity: number; tokens: number } {
    return evaluateLoss(this.stages, examples, microBatchSize, padId);
  }

  /** Host copies of the adapter and the optimizer moments (for checkpoints and the final adapter). */
  snapshot(): { modules: LoraTensors[]; moments: OptimizerMoments[] } {
    const modules = this.stages.flatMap((s) => stageLoraTensors(this.be, s));
    const moments = this.params.map((p) => {
      const h = p.hostState(true);
      return { path: p.name, mA: h.mA!, vA: h.vA!, mB: h.mB!, vB: h.vB!, ...(h.magnitude ? { mMag: h.mMag!, vMag: h.vMag! } : {}) };
    });
    return { modules, moments };
  }

  restore(ck: Checkpoint): void { restoreLoraParams(this.params, ck); }
}

/** Mean token loss over examples through a local pipeline of stages (eval mode). */
export function evaluateLoss(stages: LlamaStage[], examples: readonly Example[], microBatchSize: number, padId: number): { loss: number; perplexity: number; tokens: number } {
  let lossSum = 0, count = 0;
  evalBatches(examples, microBatchSize, padId)[0].forEach((mb, k) => {
    let hidden;
    for (const stage of stages) {
      const r = stage.forward(-1 - k * microBatchSize, mb, hidden, { train: false });
      hidden = r.hidden;
      if (r.lossSum !== undefined) { lossSum += r.lossSum; count += r.count!; }
    }
  });
  const loss = count > 0 ? lossSum / count : NaN;
  return { loss, perplexity: Math.exp(loss), tokens: count };
}
