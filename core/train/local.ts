// A pipeline of stages in this process: the in-process step executor. The replicas of a step run one after the
// other and their gradients accumulate in the same LoRA params, which is exactly what the all-reduce gives.
// A step that runs out of device memory is undone and run again with smaller micro-batches (micro-split.ts).
import type { Backend } from '../engine/backend.ts';
import { isOutOfMemory } from '../engine/oom.ts';
import type { LoraParams } from '../engine/lora.ts';
import type { LlamaStage, StageBatch } from '../model/llama.ts';
import { stageLoraTensors } from '../model/adapter.ts';
import type { Example, MicroBatch } from './batch.ts';
import { applyUpdate, clipCoefficient, dropoutKey, gradNormSq, lossScale, restoreLoraParams, type OptimizerSettings, type StepDropoutKey } from './step.ts';
import { evalBatches, type StepInput, type StepOutcome } from './steps.ts';
import { capMicroBatchRows, halveRows, probeMicroBatch, type MicroBatchSplit, type ProbeResult } from './micro-split.ts';
import { ConfigError, OutOfMemoryError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import type { Checkpoint, OptimizerMoments } from '../../common/checkpoint.ts';
import type { LoraTensors } from '../../common/peft.ts';

const log = logger('train');

export interface LocalTrainSettings extends OptimizerSettings {
  readonly seed: number;
  readonly maxGradNorm: number;
}

export class LocalPipeline {
  readonly params: LoraParams[];
  /** Rows per micro-batch the steps run with: undefined = the planned micro-batches as they are. Only ever lowered, by an out-of-memory split. */
  private rowsCap?: number;
  /** Told of every out-of-memory split (after the warn log line); the job loop prints it and tells its observers. */
  onSplit?: (s: MicroBatchSplit) => void;

  constructor(readonly be: Backend, readonly stages: LlamaStage[], readonly settings: LocalTrainSettings) {
    this.params = stages.flatMap((s) => s.loraParams());
    if (this.params.length === 0) throw new ConfigError('no LoRA module matched lora.target_modules', { hint: 'valid names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear' });
  }

  /** The rows-per-micro-batch cap in force (undefined: none yet, the planned micro-batches run as they are). */
  get microBatchRows(): number | undefined { return this.rowsCap; }

  /** Forward + backward of every micro-batch, global norm, clip, AdamW; split and run again on out of memory. */
  step(input: StepInput): StepOutcome {
    const dropout = dropoutKey(this.settings.seed, input.step);
    const planned = input.micro.flat();
    let lossSum: number;
    for (;;) {
      const pieces = capMicroBatchRows(planned, this.rowsCap);
      const r = this.undoOnOom(() => pieces.reduce((acc, mb, id) => acc + this.forwardBackward(id, mb, dropout, input.gradScale), 0));
      if ('value' in r) { lossSum = r.value; break; }
      this.split(r.oom, 'train', input.step + 1, pieces, (cap) => capMicroBatchRows(planned, cap).length);
    }
    const gradNorm = Math.sqrt(gradNormSq(this.be, this.params));
    applyUpdate(this.be, this.params, { step: input.step, lr: input.lr, clipCoef: clipCoefficient(gradNorm, this.settings.maxGradNorm) }, this.settings);
    return { lossSum, gradNorm };
  }

  /**
   * Runs `work` (forward/backward through the stages) with the backend recording its allocations. On out of device
   * memory, undoes it — the stages' in-flight micro-batches, every tensor it allocated and has not freed, the LoRA
   * gradients accumulated so far (a step is atomic), the allocator's cache — and returns the error instead.
   */
  private undoOnOom<T>(work: () => T): { value: T } | { oom: unknown } {
    const tracker = this.be.trackAllocations();
    try {
      return { value: work() };
    } catch (e) {
      if (!isOutOfMemory(e)) throw e;
      for (const s of this.stages) s.reset();
      tracker.freeLeftovers();
      for (const p of this.params) p.zeroGrad();
      this.be.releaseCache();
      return { oom: e };
    } finally {
      tracker.close();
    }
  }

  /**
   * After an out-of-memory failure of micro-batches `ran` (`step`: 1-based, or the steps done for an evaluation):
   * halves the rows cap and says so, or gives up when a single row did not fit.
   */
  private split(oom: unknown, phase: 'train' | 'eval', step: number, ran: readonly MicroBatch[], countAt: (cap: number) => number): void {
    const fromRows = Math.max(1, ...ran.map((mb) => mb.B));
    const error = (oom instanceof Error ? oom.message : String(oom)).split('\n')[0];
    if (fromRows <= 1) {
      const T = Math.max(0, ...ran.map((mb) => mb.T));
      throw new OutOfMemoryError(this.be.name, (oom as { requestedBytes?: number }).requestedBytes ?? 0, this.be.memoryInUse(), this.be.memoryBudget(), {
        detail: `${phase === 'train' ? `step ${step}` : 'evaluation'} does not fit even with micro-batches of one sequence of ${T} tokens (${error})`,
        hint: 'lower data.max_length, keep training.gradient_checkpointing on, split the model over pipeline stages (distributed.stages), or use a device with more memory',
        cause: oom,
      });
    }
    const toRows = halveRows(fromRows);
    this.rowsCap = toRows;
    const s: MicroBatchSplit = { step, phase, fromRows, toRows, fromMicroBatches: ran.length, toMicroBatches: countAt(toRows), error };
    log.warn({ step, phase, fromRows, toRows, microBatches: `${s.fromMicroBatches} → ${s.toMicroBatches}`, error },
      `out of device memory: micro-batch size ${fromRows} → ${toRows} for the rest of the run (the ${phase === 'train' ? 'step runs again' : 'evaluation runs again'} with the same examples and loss normaliser)`);
    this.onSplit?.(s);
  }

  /**
   * `training.micro_batch_size: auto`: the largest of `candidates` (largest first) whose forward + backward on a
   * micro-batch of that many rows of T tokens fits, tried for real; the gradients it made are cleared and everything
   * it allocated is freed. Throws when not even the smallest fits.
   */
  probeMicroBatchRows(candidates: readonly number[], T: number, padId: number): ProbeResult {
    const vocab = this.stages[0].cfg.vocabSize;
    const tried: { rows: number; fits: boolean; error?: string }[] = [];
    let last: unknown;
    for (const rows of candidates) {
      const mb = probeMicroBatch(rows, T, vocab, padId);
      const r = this.undoOnOom(() => this.forwardBackward(0, mb, dropoutKey(this.settings.seed, 0), lossScale(mb.labelCount)));
      for (const p of this.params) p.zeroGrad();
      if ('value' in r) {
        tried.push({ rows, fits: true });
        this.be.releaseCache();
        return { rows, tried };
      }
      last = r.oom;
      tried.push({ rows, fits: false, error: (r.oom instanceof Error ? r.oom.message : String(r.oom)).split('\n')[0] });
    }
    throw new OutOfMemoryError(this.be.name, (last as { requestedBytes?: number } | undefined)?.requestedBytes ?? 0, this.be.memoryInUse(), this.be.memoryBudget(), {
      cause: last,
      detail: `training.micro_batch_size: auto: not even ${candidates.at(-1)} sequence(s) of ${T} tokens fit (${tried.at(-1)?.error ?? ''})`,
      hint: 'lower data.max_length, keep training.gradient_checkpointing on, or use a device with more memory',
    });
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

  /**
   * Mean token loss and perplexity over `examples` (no dropout, no gradients), in micro-batches of `microBatchSize`
   * or fewer (the rows cap); out of memory halves the cap and evaluates again.
   */
  evaluate(examples: readonly Example[], microBatchSize: number, padId: number, stepsDone = 0): { loss: number; perplexity: number; tokens: number } {
    for (;;) {
      const size = Math.min(microBatchSize, this.rowsCap ?? microBatchSize);
      const r = this.undoOnOom(() => evaluateLoss(this.stages, examples, size, padId));
      if ('value' in r) return r.value;
      const ran = evalBatches(examples, size, padId)[0];
      this.split(r.oom, 'eval', stepsDone, ran, (cap) => evalBatches(examples, Math.min(microBatchSize, cap), padId)[0].length);
    }
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
