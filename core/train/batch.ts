// Micro-batches and the per-epoch step plan.
//
// Legend: B micro-batch size (rows), T padded sequence length, R data-parallel replicas, GA gradient accumulation.
import { ConfigError } from '../../common/errors.ts';
import { shuffledIndices } from '../../common/rng.ts';

/** One tokenized training example (prompt + answer). */
export interface Example {
  inputIds: Int32Array; // [T]
  labels: Int32Array;   // [T] −100 on prompt / untrained tokens, else = inputIds (NOT shifted; batch.ts shifts)
  /** Index of the record in the array given to tokenizeRecords (for buildDataset: in the file's records). */
  sourceIndex: number;
}

export const IGNORE_INDEX = -100;

export interface MicroBatch {
  B: number;
  T: number;
  ids: Int32Array;        // [B, T] right-padded with padId
  targets: Int32Array;    // [B, T] SHIFTED: targets[b, t] = labels[b, t+1]; −100 at t = T−1, on padding, on prompt
  keyMask: Int32Array;    // [B, T] 1 on real tokens, 0 on padding
  positions: Int32Array;  // [B, T] 0..len−1, 0 on padding
  sampleIds: Int32Array;  // [B] global sample index (index into the training set; keys dropout masks); packed: the row's first
  labelCount: number;     // number of targets ≠ −100 (the loss normaliser's share of this micro-batch)
  // Sample packing only (makeMicroBatch with `packing`); absent = one example per row:
  segments?: Int32Array;        // [B, T] 1, 2, … = which example of its row a token belongs to; 0 on padding
  tokenSampleIds?: Int32Array;  // [B, T] global sample index of each token's example (−1 on padding)
  placement?: ExamplePlacement[]; // where each input example went, in input order
}

/** Where a packed example sits: tokens [offset, offset + length) of row `row`. */
export interface ExamplePlacement { readonly row: number; readonly offset: number; readonly length: number }

/** Sample packing settings: rows hold whole examples up to `maxLength` tokens. */
export interface PackingOptions { readonly maxLength: number }

/**
 * Pads `examples` (right) to the longest, rounded up to `padToMultiple` (e.g. 8 for tensor cores).
 * `sampleIds[b]` defaults to examples[b].sourceIndex; pass the plan's indices to key by training-set position.
 * With `packing`, the same examples are packed several to a row instead (see packMicroBatch): the step's examples,
 * label tokens and loss normaliser do not change, only the padding does.
 */
export function makeMicroBatch(examples: Example[], opts: { padId: number; padToMultiple?: number; sampleIds?: ArrayLike<number>; packing?: PackingOptions }): MicroBatch {
  const B = examples.length;
  if (B === 0) throw new ConfigError('cannot make an empty micro-batch');
  if (opts.sampleIds && opts.sampleIds.length !== B) throw new ConfigError(`sampleIds has ${opts.sampleIds.length} entries for ${B} examples`);
  const mult = opts.padToMultiple ?? 1;
  if (!Number.isInteger(mult) || mult < 1) throw new ConfigError(`padToMultiple must be a positive integer, got ${mult}`);
  if (opts.packing) return packMicroBatch(examples, { ...opts, padToMultiple: mult, packing: opts.packing });
  let longest = 0;
  for (const e of examples) longest = Math.max(longest, e.inputIds.length);
  const T = Math.ceil(Math.max(longest, 1) / mult) * mult;
  const ids = new Int32Array(B * T).fill(opts.padId);
  const targets = new Int32Array(B * T).fill(IGNORE_INDEX);
  const keyMask = new Int32Array(B * T);
  const positions = new Int32Array(B * T);
  const sampleIds = new Int32Array(B);
  let labelCount = 0;
  for (let b = 0; b < B; b++) {
    const e = examples[b], len = e.inputIds.length, row = b * T;
    ids.set(e.inputIds, row);
    for (let t = 0; t < len; t++) {
      keyMask[row + t] = 1;
      positions[row + t] = t;
      if (t + 1 < len) {
        const y = e.labels[t + 1];
        targets[row + t] = y;
        if (y !== IGNORE_INDEX) labelCount++;
      }
    }
    sampleIds[b] = opts.sampleIds ? opts.sampleIds[b] : e.sourceIndex;
  }
  return { B, T, ids, targets, keyMask, positions, sampleIds, labelCount };
}

/** The order samples are visited in an epoch: a permutation of 0..n−1 from (seed, epoch), same on every machine. */
export function epochOrder(n: number, seed: number, epoch: number): Int32Array {
  return shuffledIndices(n, seed, epoch);
}

/**
 * The epoch's schedule: `plan[step][replica][micro]` = training-set indices of one micro-batch.
 *
 * The epoch order is cut into consecutive steps of S = microBatchSize · gradAccum · replicas samples; the last
 * step keeps the remainder (nothing is dropped, as HF's Trainer). A step's slice is split into `replicas`
 * contiguous shares as evenly as possible (the first ones get one more), and each share into micro-batches of
 * microBatchSize (the last one smaller). Full steps thus give every replica exactly gradAccum micro-batches of
 * microBatchSize; in the last step a replica may get fewer, or none at all when fewer samples than replicas are
 * left — it then contributes zero gradients to the all-reduce. Every sample appears exactly once per epoch, and
 * a step's sample set does not depend on how it is spread over replicas.
 */
export function planSteps(nTrain: number, opts: { microBatchSize: number; gradAccum: number; replicas: number; seed: number; epoch: number }): number[][][][] {
  for (const k of ['microBatchSize', 'gradAccum', 'replicas'] as const) {
    if (!Number.isInteger(opts[k]) || opts[k] < 1) throw new ConfigError(`${k} must be a positive integer, got ${opts[k]}`);
  }
  const order = epochOrder(nTrain, opts.seed, opts.epoch);
  const { microBatchSize: mb, gradAccum: ga, replicas: R } = opts;
  const perStep = mb * ga * R;
  const plan: number[][][][] = [];
  for (let start = 0; start < nTrain; start += perStep) {
    const n = Math.min(perStep, nTrain - start);
    const step: number[][][] = [];
    let off = start;
    for (let r = 0; r < R; r++) {
      const share = Math.floor(n / R) + (r < n % R ? 1 : 0);
      const micros: number[][] = [];
      for (let k = 0; k < share; k += mb) micros.push(Array.from(order.subarray(off + k, off + Math.min(share, k + mb))));
      off += share;
      step.push(micros);
    }
    plan.push(step);
  }
  return plan;
}

/** Number of optimizer steps in one epoch (HF: ceil(len(dataloader) / GA), here with the global batch). */
export function stepsPerEpoch(nTrain: number, opts: { microBatchSize: number; gradAccum: number; replicas: number }): number {
  return Math.ceil(nTrain / (opts.microBatchSize * opts.gradAccum * opts.replicas));
}

/**
 * Sample packing: the examples go, whole, into ⌈tokens / maxLength⌉ balanced rows (longest first into the least-filled
 * row with room; a row holds at most `packing.maxLength` tokens, an example longer than that gets a row of its own),
 * in input order inside a row; rows are right-padded to the longest. Inside a row each example keeps its own positions (restarting at 0), its own targets (its last token
 * predicts nothing: no target crosses into the next example), its own dropout keys (tokenSampleIds) and a segment
 * label that makes attention block-diagonal, so every example's loss and gradients are those it has unpacked. The
 * label-token count (loss normaliser) is the same as unpacked.
 */
export function packMicroBatch(examples: Example[], opts: { padId: number; padToMultiple: number; sampleIds?: ArrayLike<number>; packing: PackingOptions }): MicroBatch {
  const cap = opts.packing.maxLength;
  if (!Number.isInteger(cap) || cap < 1) throw new ConfigError(`packing.maxLength must be a positive integer, got ${cap}`);
  // Balanced rows: as few rows as the tokens need (⌈total / cap⌉), examples longest first into the least-filled row
  // that has room (a new row when none has), so the rows come out about equally long and B·T is close to the token
  // count. Plain first fit would leave one long row and one short one (padded to the long one).
  const total = examples.reduce((a, e) => a + e.inputIds.length, 0);
  const used: number[] = Array.from({ length: Math.max(1, Math.ceil(total / cap)) }, () => 0);
  const rowOf = new Int32Array(examples.length);
  const order = examples.map((e, i) => i).sort((a, b) => examples[b].inputIds.length - examples[a].inputIds.length || a - b);
  for (const i of order) {
    const len = examples[i].inputIds.length;
    let r = -1;
    for (let k = 0; k < used.length; k++) if (used[k] + len <= cap && (r < 0 || used[k] < used[r])) r = k;
    if (r < 0) { r = used.length; used.push(0); }
    used[r] += len;
    rowOf[i] = r;
  }
  // Inside a row, examples keep their input order.
  const rowsOf: number[][] = used.map(() => []);
  const fill = used.map(() => 0);
  const placement: ExamplePlacement[] = [];
  for (let i = 0; i < examples.length; i++) {
    const r = rowOf[i], len = examples[i].inputIds.length;
    placement.push({ row: r, offset: fill[r], length: len });
    fill[r] += len;
    rowsOf[r].push(i);
  }
  // Rows that got nothing (only possible when an oversized example opened its own row) are dropped.
  const keep = used.map((u) => u > 0);
  if (keep.some((k) => !k)) {
    const newIdx = keep.map((k, i) => keep.slice(0, i).filter(Boolean).length);
    for (let i = 0; i < placement.length; i++) placement[i] = { ...placement[i], row: newIdx[placement[i].row] };
    for (let r = used.length - 1; r >= 0; r--) if (!keep[r]) { used.splice(r, 1); rowsOf.splice(r, 1); }
  }
  const B = used.length;
  const T = Math.ceil(Math.max(1, ...used) / opts.padToMultiple) * opts.padToMultiple;
  const ids = new Int32Array(B * T).fill(opts.padId);
  const targets = new Int32Array(B * T).fill(IGNORE_INDEX);
  const keyMask = new Int32Array(B * T);
  const positions = new Int32Array(B * T);
  const segments = new Int32Array(B * T);
  const tokenSampleIds = new Int32Array(B * T).fill(-1);
  const sampleIds = new Int32Array(B);
  let labelCount = 0;
  for (let i = 0; i < examples.length; i++) {
    const e = examples[i], { row, offset, length: len } = placement[i], base = row * T + offset;
    const sid = opts.sampleIds ? opts.sampleIds[i] : e.sourceIndex;
    const seg = rowsOf[row].indexOf(i) + 1;
    if (seg === 1) sampleIds[row] = sid;
    ids.set(e.inputIds, base);
    for (let t = 0; t < len; t++) {
      keyMask[base + t] = 1;
      positions[base + t] = t;
      segments[base + t] = seg;
      tokenSampleIds[base + t] = sid;
      if (t + 1 < len) {
        const y = e.labels[t + 1];
        targets[base + t] = y;
        if (y !== IGNORE_INDEX) labelCount++;
      }
    }
  }
  return { B, T, ids, targets, keyMask, positions, sampleIds, labelCount, segments, tokenSampleIds, placement };
}

/**
 * Splits a micro-batch into `parts` micro-batches of consecutive rows (as equal as possible), each keeping the whole's
 * padded length T. The step's loss scale (1 / label tokens of the whole step) is applied per token, so running the
 * parts one after the other accumulates exactly the gradient of the whole (up to float summation order): what an
 * out-of-memory retry needs (core/train/micro-split.ts).
 */
export function splitMicroBatch(mb: MicroBatch, parts: number): MicroBatch[] {
  if (!Number.isInteger(parts) || parts < 1) throw new ConfigError(`parts must be a positive integer, got ${parts}`);
  const n = Math.min(parts, mb.B), out: MicroBatch[] = [];
  for (let k = 0, r0 = 0; k < n; k++) {
    const rows = Math.floor(mb.B / n) + (k < mb.B % n ? 1 : 0), r1 = r0 + rows, T = mb.T;
    const sl = (a: Int32Array): Int32Array => a.slice(r0 * T, r1 * T);
    const targets = sl(mb.targets);
    let labelCount = 0;
    for (const y of targets) if (y !== IGNORE_INDEX) labelCount++;
    out.push({
      B: rows, T, ids: sl(mb.ids), targets, keyMask: sl(mb.keyMask), positions: sl(mb.positions), sampleIds: mb.sampleIds.slice(r0, r1), labelCount,
      ...(mb.segments ? { segments: sl(mb.segments) } : {}),
      ...(mb.tokenSampleIds ? { tokenSampleIds: sl(mb.tokenSampleIds) } : {}),
      ...(mb.placement ? { placement: mb.placement.filter((p) => p.row >= r0 && p.row < r1).map((p) => ({ ...p, row: p.row - r0 })) } : {}),
    });
    r0 = r1;
  }
  return out;
}
