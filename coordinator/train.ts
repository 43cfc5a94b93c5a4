// The training loop of one process: where a reader sees an optimizer step end to end.
//   plan the step's micro-batches → forward through the stages → loss (normalised by the step's label tokens)
//   → backward → global gradient norm and clipping → AdamW → (eval, checkpoint) → one log line.
// The stages may be several (a local pipeline with the same boundaries the distributed run uses); the plan's
// replicas are run one after the other and their gradients summed, which is what an all-reduce gives.
import type { Backend } from '../core/engine/backend.ts';
import type { LoraParams } from '../core/engine/lora.ts';
import type { LlamaStage, StageBatch } from '../core/model/llama.ts';
import { stageLoraTensors, type LoraTensors } from '../core/model/adapter.ts';
import { makeMicroBatch, planSteps, stepsPerEpoch, type MicroBatch } from '../core/train/batch.ts';
import type { Example } from './data/tokenize.ts';
import { lrMultiplier, warmupSteps, type ScheduleName } from '../core/train/schedule.ts';
import { mixKey } from '../common/rng.ts';
import { CheckpointError, ConfigError } from '../common/errors.ts';
import type { Checkpoint, OptimizerMoments, TrainerState } from '../common/checkpoint.ts';

export interface TrainSettings {
  readonly epochs: number;
  readonly maxSteps?: number;
  readonly microBatchSize: number;
  readonly gradAccum: number;
  readonly replicas: number;
  readonly lr: number;
  readonly schedule: ScheduleName;
  readonly warmupSteps: number;
  readonly weightDecay: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly maxGradNorm: number;
  readonly seed: number;
  readonly padId: number;
}

export interface StepResult {
  readonly step: number;       // 1-based: optimizer steps done after this one
  readonly loss: number;       // mean token loss of the step
  readonly lr: number;
  readonly gradNorm: number;   // before clipping
  readonly tokens: number;     // real (non-padding) tokens processed
  readonly labelTokens: number;
  readonly epoch: number;      // fractional epoch reached
}

export class Trainer {
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
  readonly warmup: number;
  state: TrainerState;
  private readonly plans = new Map<number, number[][][][]>();
  private readonly params: LoraParams[];

  constructor(
    readonly be: Backend,
    readonly stages: LlamaStage[],
    readonly train: Example[],
    readonly settings: TrainSettings,
    fingerprints: { configHash: string; dataHash: string },
  ) {
    if (train.length === 0) throw new ConfigError('the training set is empty', { hint: 'check data.train (and the dedup / validation split settings)' });
    this.stepsPerEpoch = stepsPerEpoch(train.length, settings);
    this.totalSteps = settings.maxSteps ?? Math.ceil(settings.epochs * this.stepsPerEpoch);
    this.warmup = warmupSteps(settings.warmupSteps, this.totalSteps);
    this.params = stages.flatMap((s) => s.loraParams());
    if (this.params.length === 0) throw new ConfigError('no LoRA module matched lora.target_modules', { hint: 'valid names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear' });
    this.state = { step: 0, totalSteps: this.totalSteps, stepsPerEpoch: this.stepsPerEpoch, ...fingerprints, history: [], evalHistory: [] };
  }

  get done(): boolean { return this.state.step >= this.totalSteps; }

  private planFor(epoch: number): number[][][][] {
    let p = this.plans.get(epoch);
    if (!p) {
      this.plans.clear(); // one epoch at a time is enough
      p = planSteps(this.train.length, { ...this.settings, epoch });
      this.plans.set(epoch, p);
    }
    return p;
  }

  /** Runs optimizer step `state.step` and returns what happened. */
  step(): StepResult {
    const S = this.settings, s = this.state.step;
    const epoch = Math.floor(s / this.stepsPerEpoch);
    const plan = this.planFor(epoch)[s % this.stepsPerEpoch];
    // 1. the step's micro-batches (all replicas); the loss normaliser counts the label tokens of all of them
    const micro: MicroBatch[] = plan.flat().map((ix) => makeMicroBatch(ix.map((i) => this.train[i]), { padId: S.padId, sampleIds: ix }));
    const labelTokens = micro.reduce((a, m) => a + m.labelCount, 0);
    const gradScale = labelTokens > 0 ? 1 / labelTokens : 0;
    const dropout = { k0: mixKey(S.seed, 0x44524f50), k1: mixKey(s) };
    // 2. forward + backward of every micro-batch (gradients accumulate in the LoRA params)
    let lossSum = 0, tokens = 0;
    micro.forEach((mb, id) => {
      lossSum += this.forwardBackward(id, mb, dropout, gradScale);
      for (let i = 0; i < mb.keyMask.length; i++) tokens += mb.keyMask[i];
    });
    // 3. global gradient norm, clipping (torch clip_grad_norm_: coef = max / (norm + 1e-6), clamped to 1)
    const gradNorm = this.gradNorm();
    if (S.maxGradNorm > 0) {
      const coef = Math.min(1, S.maxGradNorm / (gradNorm + 1e-6));
      if (coef < 1) for (const p of this.params) { this.be.scale(p.dA, coef); this.be.scale(p.dB, coef); }
    }
    // 4. AdamW with the scheduled learning rate, then clear the gradients
    const lr = S.lr * lrMultiplier(S.schedule, s, this.totalSteps, this.warmup);
    this.applyAdamW(lr, s + 1);
    this.state.step = s + 1;
    const loss = lossSum * gradScale;
    const r: StepResult = { step: s + 1, loss, lr, gradNorm, tokens, labelTokens, epoch: (s + 1) / this.stepsPerEpoch };
    this.state.history.push({ step: r.step, loss, lr, gradNorm, tokens });
    return r;
  }

  /** Forward and backward of one micro-batch through the local stages; returns its summed token loss. */
  private forwardBackward(id: number, mb: MicroBatch, dropout: { k0: number; k1: number }, gradScale: number): number {
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

  gradNorm(): number {
    let sq = 0;
    for (const p of this.params) sq += this.be.sumSquares(p.dA) + this.be.sumSquares(p.dB);
    return Math.sqrt(sq);
  }

  applyAdamW(lr: number, step: number): void {
    const S = this.settings;
    const h = { lr, beta1: S.beta1, beta2: S.beta2, eps: S.eps, weightDecay: S.weightDecay, step };
    for (const p of this.params) {
      this.be.adamw(p.A, p.dA, p.mA, p.vA, h);
      this.be.adamw(p.B, p.dB, p.mB, p.vB, h);
      p.zeroGrad();
    }
  }

  /** Mean token loss and perplexity over `examples` (no dropout, no gradients). */
  evaluate(examples: Example[], microBatchSize = this.settings.microBatchSize): { loss: number; perplexity: number; tokens: number } {
    return evaluateLoss(this.stages, examples, microBatchSize, this.settings.padId);
  }

  /** Host copies of the adapter and the optimizer moments (for checkpoints and the final adapter). */
  snapshot(): { modules: LoraTensors[]; moments: OptimizerMoments[] } {
    const modules = this.stages.flatMap((s) => stageLoraTensors(this.be, s));
    const moments = this.params.map((p) => {
      const h = p.hostState(true);
      return { path: p.name, mA: h.mA!, vA: h.vA!, mB: h.mB!, vB: h.vB! };
    });
    return { modules, moments };
  }

  /** Restores adapter weights, optimizer moments and the step counter from a checkpoint. */
  restore(ck: Checkpoint): void {
    if (ck.state.configHash !== this.state.configHash) throw new CheckpointError(`checkpoint ${ck.dir} was written by a job with other training settings`, { hint: 'start a fresh run (training.resume: false or another output_dir), or restore the original job.yaml' });
    if (ck.state.dataHash !== this.state.dataHash) throw new CheckpointError(`checkpoint ${ck.dir} was written for other training data`, { hint: 'the dataset changed since the checkpoint; start a fresh run' });
    const byPath = new Map(ck.modules.map((m) => [m.path, m]));
    const momentsByPath = new Map(ck.moments.map((m) => [m.path, m]));
    for (const p of this.params) {
      const m = byPath.get(p.name), mo = momentsByPath.get(p.name);
      if (!m || !mo) throw new CheckpointError(`checkpoint ${ck.dir} has no state for '${p.name}'`);
      if (m.r !== p.hyper.r) throw new CheckpointError(`checkpoint ${ck.dir}: '${p.name}' has rank ${m.r}, the job says ${p.hyper.r}`);
      p.setHostState({ A: m.A, B: m.B, mA: mo.mA, vA: mo.vA, mB: mo.mB, vB: mo.vB });
    }
    this.state = { ...ck.state, history: [...ck.state.history], evalHistory: [...ck.state.evalHistory] };
  }
}

/** Mean token loss over examples through a local pipeline of stages (eval mode). */
export function evaluateLoss(stages: LlamaStage[], examples: Example[], microBatchSize: number, padId: number): { loss: number; perplexity: number; tokens: number } {
  let lossSum = 0, count = 0;
  for (let i = 0; i < examples.length; i += microBatchSize) {
    const ix = Array.from({ length: Math.min(microBatchSize, examples.length - i) }, (_, k) => i + k);
    const mb = makeMicroBatch(ix.map((j) => examples[j]), { padId, sampleIds: ix });
    let hidden;
    for (const stage of stages) {
      const r = stage.forward(-1 - i, mb, hidden, { train: false });
      hidden = r.hidden;
      if (r.lossSum !== undefined) { lossSum += r.lossSum; count += r.count!; }
    }
  }
  const loss = count > 0 ? lossSum / count : NaN;
  return { loss, perplexity: Math.exp(loss), tokens: count };
}
