// OOM-safe micro-batches: what the step executor does when a micro-batch does not fit in device memory, and how
// `training.micro_batch_size: auto` picks the size. The rules, in one place:
//
//   - A step is atomic. An out-of-memory failure anywhere in it (forward, backward, micro-batch k > 0) discards the
//     whole attempt: the in-flight micro-batches, every tensor it had allocated, and the LoRA gradients it had
//     accumulated so far. Nothing of a failed attempt reaches the optimizer.
//   - The step then runs again with at most half as many rows per micro-batch: each planned micro-batch is cut into
//     consecutive pieces (splitMicroBatch), so the step's examples, its padded length T and its loss normaliser
//     (1 / label tokens of the whole step, applied per token) do not change — only the gradient accumulation grows.
//     The pieces' LoRA gradients add up to the whole's (float summation order aside), dropout masks and NEFTune noise
//     are keyed by (seed, step, sample, position), not by the micro-batch, so the result is the same.
//   - The smaller size is kept for the rest of the run (never grown back: simple and deterministic), and reported.
//   - `auto`: the largest candidate (the step's batch, then halving through its divisors) whose real forward +
//     backward on a batch of the longest length fits.
import { makeMicroBatch, splitMicroBatch, type Example, type MicroBatch } from './batch.ts';
import { ConfigError, DqloraError } from '../../common/errors.ts';

/**
 * Thrown by an executor that cannot undo an out-of-memory step in place (distributed workers: their all-reduce and
 * pipeline state end with the aborted step): it has lowered its rows cap and reported the split; the job loop
 * re-assigns the stages, rolls back to the last checkpoint and runs on with the smaller micro-batches. Not a failure:
 * it spends no recovery.
 */
export class MicroBatchSplitRetry extends DqloraError {
  constructor(readonly split: MicroBatchSplit) {
    super(`out of device memory with micro-batches of ${split.fromRows} sequence(s): running again with ${split.toRows}`);
  }
}

/** An out-of-memory split: micro-batches of `fromRows` rows did not fit; the work runs again with `toRows`. */
export interface MicroBatchSplit {
  /** The optimizer step (1-based, as the logs count) that ran out of memory and ran again; for an evaluation, the steps done so far. */
  readonly step: number;
  readonly phase: 'train' | 'eval';
  readonly fromRows: number;
  readonly toRows: number;
  /** Micro-batches the step ran in before and after the split (one process: all of the step's). */
  readonly fromMicroBatches: number;
  readonly toMicroBatches: number;
  /** The out-of-memory error's first line. */
  readonly error: string;
}

/** The planned micro-batches cut so that none has more than `maxRows` rows (undefined: as planned). */
export function capMicroBatchRows(micro: readonly MicroBatch[], maxRows: number | undefined): MicroBatch[] {
  if (maxRows === undefined) return [...micro];
  if (!Number.isInteger(maxRows) || maxRows < 1) throw new ConfigError(`rows per micro-batch must be a positive integer, got ${maxRows}`);
  return micro.flatMap((mb) => (mb.B > maxRows ? splitMicroBatch(mb, Math.ceil(mb.B / maxRows)) : [mb]));
}

/** Rows per micro-batch after one more split: half, rounded up (8 → 4 → 2 → 1, 6 → 3 → 2 → 1). */
export function halveRows(rows: number): number {
  return Math.max(1, Math.ceil(rows / 2));
}

/**
 * `micro_batch_size: auto`'s candidates, largest first: the step's batch per replica, then repeatedly the largest
 * divisor of it at most half the previous one (24 → 12 → 6 → 3 → 1; 10 → 5 → 2 → 1), so the chosen size always
 * divides the batch and the gradient accumulation is a whole number.
 */
export function autoMicroBatchCandidates(batchSize: number): number[] {
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new ConfigError(`training.batch_size must be a positive integer, got ${batchSize}`);
  const out = [batchSize];
  for (let cur = batchSize; cur > 1;) {
    let d = Math.floor(cur / 2);
    while (batchSize % d !== 0) d--;
    out.push(d);
    cur = d;
  }
  return out;
}

/**
 * The probe's micro-batch: `rows` rows of `T` real tokens, every one a label (the most the head and the loss ever
 * hold), sample ids 0..rows−1. The token ids are a fixed pattern over the vocabulary; memory does not depend on them.
 */
export function probeMicroBatch(rows: number, T: number, vocabSize: number, padId: number): MicroBatch {
  const examples: Example[] = Array.from({ length: rows }, (_, r) => {
    const ids = Int32Array.from({ length: T }, (_, t) => (r * 7919 + t * 104729 + 3) % vocabSize);
    return { inputIds: ids, labels: Int32Array.from(ids), sourceIndex: r };
  });
  return makeMicroBatch(examples, { padId, sampleIds: examples.map((_, r) => r) });
}

/** What a `micro_batch_size: auto` probe found. */
export interface ProbeResult {
  /** The largest candidate that fitted. */
  readonly rows: number;
  /** Every candidate tried, largest first, and whether it fitted (with the out-of-memory error's first line). */
  readonly tried: readonly { readonly rows: number; readonly fits: boolean; readonly error?: string }[];
}
