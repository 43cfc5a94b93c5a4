// Which samples form optimizer step s, and what the step's scalars are: the plan the job loop hands to a step
// executor (in-process or remote workers), and what it records afterwards. Both executors get the same inputs
// for the same step, whatever the layout, so their results agree.
import { makeMicroBatch, planSteps, stepsPerEpoch, type Example, type MicroBatch, type PackingOptions } from './batch.ts';
import { lrMultiplier, warmupSteps, type ScheduleName } from './schedule.ts';
import { lossScale } from './step.ts';
import { ConfigError } from '../../common/errors.ts';
import type { TrainerState } from '../../common/checkpoint.ts';

export interface StepSettings {
  readonly epochs: number;
  readonly maxSteps?: number;
  readonly microBatchSize: number;
  readonly gradAccum: number;
  readonly replicas: number;
  readonly lr: number;
  readonly schedule: ScheduleName;
  readonly warmupSteps: number;
  readonly seed: number;
  readonly padId: number;
  /** Sample packing (data.packing): the same examples per micro-batch, several to a row. */
  readonly packing?: PackingOptions;
}

/** Everything an executor needs to run optimizer step `step` (0-based). */
export interface StepInput {
  readonly step: number;
  readonly epoch: number;
  /** micro[replica][k]: the k-th micro-batch of that replica (a replica may get none in an epoch's last step). */
  readonly micro: readonly MicroBatch[][];
  /** Label tokens of the whole step across replicas: the loss normaliser. */
  readonly labelTokens: number;
  /** = lossScale(labelTokens). */
  readonly gradScale: number;
  /** Scheduled learning rate of this update. */
  readonly lr: number;
  /** Real (non-padding) tokens of the step. */
  readonly tokens: number;
}

/** What an executor reports back from a step (after the update has been applied everywhere). */
export interface StepOutcome {
  /** Σ of the token losses of the step (all replicas); loss = lossSum · gradScale. */
  readonly lossSum: number;
  /** Global LoRA gradient norm before clipping. */
  readonly gradNorm: number;
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

export class StepPlanner {
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
  readonly warmup: number;
  private cached?: { epoch: number; plan: number[][][][] };

  constructor(readonly train: readonly Example[], readonly settings: StepSettings) {
    if (train.length === 0) throw new ConfigError('the training set is empty', { hint: 'check data.train (and the dedup / validation split settings)' });
    this.stepsPerEpoch = stepsPerEpoch(train.length, settings);
    this.totalSteps = settings.maxSteps ?? Math.ceil(settings.epochs * this.stepsPerEpoch);
    this.warmup = warmupSteps(settings.warmupSteps, this.totalSteps);
  }

  /**
   * The same steps (each step's samples are consecutive slices of the epoch order of microBatchSize · gradAccum ·
   * replicas, so they do not depend on how a step is cut) in micro-batches of `microBatchSize`, with the gradient
   * accumulation that keeps the step's batch: what `micro_batch_size: auto` re-plans with once it has probed.
   */
  withMicroBatchSize(microBatchSize: number): StepPlanner {
    const S = this.settings, batch = S.microBatchSize * S.gradAccum;
    if (!Number.isInteger(microBatchSize) || microBatchSize < 1 || batch % microBatchSize !== 0) {
      throw new ConfigError(`micro-batch size ${microBatchSize} does not divide the step's batch of ${batch} per replica`);
    }
    return new StepPlanner(this.train, { ...S, microBatchSize, gradAccum: batch / microBatchSize });
  }

  private planFor(epoch: number): number[][][][] {
    if (this.cached?.epoch !== epoch) this.cached = { epoch, plan: planSteps(this.train.length, { ...this.settings, epoch }) };
    return this.cached.plan;
  }

  /** The inputs of optimizer step `s` (0-based). */
  input(s: number): StepInput {
    const S = this.settings;
    const epoch = Math.floor(s / this.stepsPerEpoch);
    const plan = this.planFor(epoch)[s % this.stepsPerEpoch];
    const micro = plan.map((rep) => rep.map((ix) => makeMicroBatch(ix.map((i) => this.train[i]), { padId: S.padId, sampleIds: ix, packing: S.packing })));
    let labelTokens = 0, tokens = 0;
    for (const mb of micro.flat()) {
      labelTokens += mb.labelCount;
      for (let i = 0; i < mb.keyMask.length; i++) tokens += mb.keyMask[i];
    }
    const lr = S.lr * lrMultiplier(S.schedule, s, this.totalSteps, this.warmup);
    return { step: s, epoch, micro, labelTokens, gradScale: lossScale(labelTokens), lr, tokens };
  }

  /** Appends a finished step to `state` (step counter, history) and returns its summary. */
  record(state: TrainerState, input: StepInput, out: StepOutcome): StepResult {
    const loss = out.lossSum * input.gradScale;
    const r: StepResult = { step: input.step + 1, loss, lr: input.lr, gradNorm: out.gradNorm, tokens: input.tokens, labelTokens: input.labelTokens, epoch: (input.step + 1) / this.stepsPerEpoch };
    state.step = input.step + 1;
    state.history.push({ step: r.step, loss, lr: r.lr, gradNorm: r.gradNorm, tokens: r.tokens });
    return r;
  }
}

/**
 * Evaluation micro-batches: consecutive chunks of `microBatchSize` examples, dealt round-robin over `replicas`
 * (sample ids = positions in `examples`).
 */
export function evalBatches(examples: readonly Example[], microBatchSize: number, padId: number, replicas = 1): MicroBatch[][] {
  const out: MicroBatch[][] = Array.from({ length: replicas }, () => []);
  for (let i = 0, j = 0; i < examples.length; i += microBatchSize, j++) {
    const ix = Array.from({ length: Math.min(microBatchSize, examples.length - i) }, (_, k) => i + k);
    out[j % replicas].push(makeMicroBatch(ix.map((k) => examples[k]), { padId, sampleIds: ix }));
  }
  return out;
}
