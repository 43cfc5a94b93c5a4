// The whole data stage: files → records → dedup → train/validation split → token examples.
//
// Dedup (opt-in, as in the seed workflow whose 40k pairs repeat a lot) keeps the first occurrence of each exact
// record: alpaca by (instruction, input, output, system), chat by its messages, text by its text.
// The split is drawn over UNIQUE records, so even without dedup every copy of a record lands on the same side and
// validation never measures memorised training data. The draw is `shuffledIndices(nUnique, seed, SPLIT_STREAM)`:
// the same seed gives the same split on every machine. Both sides keep file order.
import { ConfigError, DataError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import { shuffledIndices } from '../../common/rng.ts';
import { readRecords, recordKey, type Record } from './records.ts';

export { recordKey };
import { tokenizeRecords, type Example, type TokenizerLike } from './tokenize.ts';

const log = logger('data');
/** The "epoch" word of the split's RNG stream, apart from the training epochs 0, 1, 2, ... */
const SPLIT_STREAM = 0x53504c54; // 'SPLT'

export interface DatasetOptions {
  trainPath: string;
  validationPath?: string;
  /** A fraction in (0, 1) of the unique records, or a whole count ≥ 1. Not with validationPath. */
  validationSplit?: number;
  dedup?: boolean;
  seed: number;
  maxLength: number;
  onError?: 'throw' | 'skip';
  truncation?: 'right' | 'left-prompt';
  addBos?: 'auto' | boolean;
}

export interface DatasetStats {
  /** Records read from all files (after skipping bad lines, before dedup). */
  records: number;
  duplicatesRemoved: number;
  /** Bad lines / records left out with onError 'skip' (files and template failures). */
  skipped: number;
  /** Examples cut to maxLength (dropped ones included). */
  truncated: number;
  /** Examples dropped for having no trainable token left. */
  dropped: number;
  /** Σ tokens over the training examples. */
  trainTokens: number;
  /** Σ trainable targets over the training examples (what the loss averages over in one epoch). */
  trainLabelTokens: number;
  /** Validation records (from validationPath) whose exact content also appears in the training file. */
  validationOverlap: number;
}

export interface Dataset { train: Example[]; validation: Example[]; stats: DatasetStats }

export function buildDataset(opts: DatasetOptions, tok: TokenizerLike): Dataset {
  if (opts.validationPath !== undefined && opts.validationSplit !== undefined) {
    throw new ConfigError('both a validation file and a validation split are given', { hint: 'use one of data.validation / data.validation_split in the job file' });
  }
  const onError = opts.onError ?? 'throw';
  const trainRead = readRecords(opts.trainPath, { onError });
  let skipped = trainRead.skipped.length;
  if (skipped) log.warn({ file: opts.trainPath, skipped, first: trainRead.skipped.slice(0, 3) }, 'skipped bad dataset lines');
  let records = trainRead.records.length;

  // Group copies: groups[g] = indices of the records with the g-th distinct key, in file order.
  const trainGroups = groupByKey(trainRead.records);
  let duplicatesRemoved = 0;
  let trainIdx: number[];
  let valIdx: number[] = [];
  let valRecords: Record[] = [];

  if (opts.validationSplit !== undefined) {
    const nVal = splitCount(opts.validationSplit, trainGroups.groups.length);
    const perm = shuffledIndices(trainGroups.groups.length, opts.seed, SPLIT_STREAM);
    const isVal = new Uint8Array(trainGroups.groups.length);
    for (let i = 0; i < nVal; i++) isVal[perm[i]] = 1;
    trainIdx = []; valIdx = [];
    trainGroups.groups.forEach((g, gi) => (isVal[gi] ? valIdx : trainIdx).push(...(opts.dedup ? [g[0]] : g)));
    trainIdx.sort((a, b) => a - b); valIdx.sort((a, b) => a - b);
    if (opts.dedup) duplicatesRemoved += trainRead.records.length - trainGroups.groups.length;
    valRecords = valIdx.map((i) => trainRead.records[i]);
  } else {
    trainIdx = opts.dedup ? trainGroups.groups.map((g) => g[0]) : trainRead.records.map((_, i) => i);
    if (opts.dedup) duplicatesRemoved += trainRead.records.length - trainGroups.groups.length;
  }

  let validationOverlap = 0;
  let valSourceIdx: number[] = valIdx;
  if (opts.validationPath !== undefined) {
    const valRead = readRecords(opts.validationPath, { onError });
    skipped += valRead.skipped.length;
    records += valRead.records.length;
    if (valRead.skipped.length) log.warn({ file: opts.validationPath, skipped: valRead.skipped.length }, 'skipped bad dataset lines');
    const vg = groupByKey(valRead.records);
    valSourceIdx = opts.dedup ? vg.groups.map((g) => g[0]) : valRead.records.map((_, i) => i);
    if (opts.dedup) duplicatesRemoved += valRead.records.length - vg.groups.length;
    valRecords = valSourceIdx.map((i) => valRead.records[i]);
    for (const r of valRecords) if (trainGroups.byKey.has(recordKey(r))) validationOverlap++;
    if (validationOverlap) log.warn({ validationOverlap }, 'validation records also present in the training file');
  }

  const tokOpts = { maxLength: opts.maxLength, truncation: opts.truncation, addBos: opts.addBos, onError };
  const trainTok = tokenizeRecords(trainIdx.map((i) => trainRead.records[i]), tok, tokOpts);
  const valTok = tokenizeRecords(valRecords, tok, tokOpts);
  // sourceIndex: back to the index in the file's records (tokenizeRecords numbers its own input).
  for (const e of trainTok.examples) e.sourceIndex = trainIdx[e.sourceIndex];
  for (const e of valTok.examples) e.sourceIndex = valSourceIdx[e.sourceIndex];

  let trainTokens = 0, trainLabelTokens = 0;
  for (const e of trainTok.examples) {
    trainTokens += e.inputIds.length;
    for (let t = 1; t < e.labels.length; t++) if (e.labels[t] !== -100) trainLabelTokens++;
  }
  if (trainTok.examples.length === 0) {
    // Counts of the training file only (`records` also counts the validation file's).
    const read = trainRead.records.length, bad = trainRead.skipped.length;
    throw new DataError(`no training example left from ${opts.trainPath} (${read} records read${bad ? `, ${bad} malformed lines skipped` : ''}, ${trainTok.droppedNoLabels} dropped with no trainable token)`,
      { hint: read === 0 ? 'the training file holds no records: check data.train in the job file' : 'check the file, and that data.max_length leaves room for the answers' });
  }
  return {
    train: trainTok.examples,
    validation: valTok.examples,
    stats: {
      records, duplicatesRemoved, skipped: skipped + trainTok.skipped + valTok.skipped,
      truncated: trainTok.truncated + valTok.truncated, dropped: trainTok.droppedNoLabels + valTok.droppedNoLabels,
      trainTokens, trainLabelTokens, validationOverlap,
    },
  };
}

function groupByKey(records: Record[]): { groups: number[][]; byKey: Map<string, number> } {
  const byKey = new Map<string, number>();
  const groups: number[][] = [];
  records.forEach((r, i) => {
    const k = recordKey(r);
    const g = byKey.get(k);
    if (g === undefined) { byKey.set(k, groups.length); groups.push([i]); } else groups[g].push(i);
  });
  return { groups, byKey };
}

/** Number of unique records to hold out: a fraction in (0,1) (at least 1) or a whole count; leaves ≥ 1 for training. */
function splitCount(split: number, nUnique: number): number {
  let n: number;
  if (split > 0 && split < 1) n = Math.max(1, Math.round(split * nUnique));
  else if (Number.isInteger(split) && split >= 1) n = split;
  else throw new ConfigError(`validation split must be a fraction in (0, 1) or a whole count ≥ 1, got ${split}`, { hint: 'e.g. data.validation_split: 0.05 or 1000' });
  if (n >= nUnique) {
    throw new ConfigError(`validation split ${split} takes ${n} of ${nUnique} unique records, leaving none for training`, { hint: 'use a smaller validation split' });
  }
  return n;
}
