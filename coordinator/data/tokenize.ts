// Records → token ids + labels (−100 where nothing is trained), truncated to maxLength.
//
// Encoding is PIECEWISE: each piece from format.ts is encoded on its own with addSpecialTokens=false and the ids
// are concatenated. The prompt/answer boundary therefore falls exactly between tokens (no BPE merge straddles it,
// so no label ever covers part prompt, part answer) — the same choice as TRL's prompt/completion tokenization.
// The price: ids can differ from encoding the joined string in one go at a boundary; generation must build its
// prompt the same way (encode the prompt alone), which `formatPrompt` + encode does.
//
// BOS ('auto', the default): when the tokenizer defines a BOS id and the sequence does not already start with it
// (a template like Llama 3's writes it as text), BOS is prepended with label −100. `true` insists (error without
// a BOS id); `false` never adds one. EOS: appended where format.ts asks (template-less completions, text records).
//
// Truncation to maxLength: 'right' (default) cuts the end; 'left-prompt' first removes the oldest prompt tokens
// (keeping a leading BOS) so the answer survives, then cuts the end if the answer alone is still too long.
// An example left with no trainable target (labels[1..] all −100; label 0 is never a target after the shift) is
// dropped and counted.
import { ConfigError, DataError, DqloraError } from '../../common/errors.ts';
import { IGNORE_INDEX, type Example } from '../../core/train/batch.ts';
export { IGNORE_INDEX, type Example };
import { formatRecord, type TokenizerLike } from './format.ts';
export type { TokenizerLike };
import { recordKey, type Record } from './records.ts';



export interface TokenizeOptions {
  maxLength: number;
  truncation?: 'right' | 'left-prompt';
  addBos?: 'auto' | boolean;
  /** 'skip': a record the template cannot render is counted in `skipped` instead of throwing. Default 'throw'. */
  onError?: 'throw' | 'skip';
}

export interface TokenizeResult {
  examples: Example[];
  /** Examples that were longer than maxLength and were cut (including dropped ones). */
  truncated: number;
  /** Examples dropped because no trainable target was left after truncation. */
  droppedNoLabels: number;
  /** Records that could not be formatted (only with onError 'skip'). */
  skipped: number;
}

export function tokenizeRecords(records: Record[], tok: TokenizerLike, opts: TokenizeOptions): TokenizeResult {
  checkOptions(opts, tok);
  const examples: Example[] = [];
  let truncated = 0, droppedNoLabels = 0, skipped = 0;
  // Datasets like the seed's repeat records and prompts a lot; template rendering and encoding dominate the cost.
  const cache = new Map<string, number[]>(); // piece text → ids
  const done = new Map<string, { ids: number[]; labels: number[] }>(); // record content → full encoding
  for (let i = 0; i < records.length; i++) {
    let full: { ids: number[]; labels: number[] };
    try {
      const key = recordKey(records[i]);
      const hit = done.get(key);
      full = hit ?? encodeRecord(records[i], tok, opts.addBos ?? 'auto', cache);
      if (!hit) done.set(key, full);
    } catch (e) {
      if (opts.onError === 'skip' && e instanceof DataError) { skipped++; continue; }
      if (e instanceof DataError) throw new DataError(`record ${i}: ${e.message}`, { cause: e });
      throw e;
    }
    let { ids, labels } = full;
    if (ids.length > opts.maxLength) {
      truncated++;
      ({ ids, labels } = truncate(ids, labels, opts.maxLength, opts.truncation ?? 'right',
        opts.addBos !== false && tok.bosId !== null && ids[0] === tok.bosId));
    }
    let targets = 0;
    for (let t = 1; t < labels.length; t++) if (labels[t] !== IGNORE_INDEX) targets++;
    if (targets === 0) { droppedNoLabels++; continue; }
    examples.push({ inputIds: Int32Array.from(ids), labels: Int32Array.from(labels), sourceIndex: i });
  }
  return { examples, truncated, droppedNoLabels, skipped };
}

function checkOptions(opts: TokenizeOptions, tok: TokenizerLike): void {
  if (!Number.isInteger(opts.maxLength) || opts.maxLength < 2) {
    throw new ConfigError(`maxLength must be an integer ≥ 2, got ${opts.maxLength}`, { hint: 'set data.max_length, e.g. 512' });
  }
  if (opts.truncation !== undefined && opts.truncation !== 'right' && opts.truncation !== 'left-prompt') {
    throw new ConfigError(`truncation must be 'right' or 'left-prompt', got ${JSON.stringify(opts.truncation)}`);
  }
  if (opts.addBos === true && tok.bosId === null) {
    throw new ConfigError('addBos is true but the tokenizer has no BOS token', { hint: "set bos_token in tokenizer_config.json or use addBos 'auto'" });
  }
}

/**
 * The ids a sequence starting with `ids` gets in front: the tokenizer's prefix tokens (ChatGLM2's [gMASK] sop), or
 * BOS when it has one and the text does not already start with it. Training and generation prompts both use this.
 */
export function startTokens(tok: TokenizerLike, ids: readonly number[]): number[] {
  const prefix = tok.prefixTokens?.();
  if (prefix && prefix.length > 0) return prefix;
  return tok.bosId !== null && ids[0] !== tok.bosId ? [tok.bosId] : [];
}

/** Full (untruncated) ids and labels of one record. */
export function encodeRecord(rec: Record, tok: TokenizerLike, addBos: 'auto' | boolean = 'auto', cache?: Map<string, number[]>): { ids: number[]; labels: number[] } {
  if (rec.kind === 'tokens') return { ids: rec.inputIds.slice(), labels: (rec.labels ?? rec.inputIds).slice() };   // pre-tokenized: as given
  const ids: number[] = [], labels: number[] = [];
  for (const piece of formatRecord(rec, tok)) {
    let enc = cache?.get(piece.text);
    if (enc === undefined) {
      enc = tok.encode(piece.text, { addSpecialTokens: false });
      cache?.set(piece.text, enc);
    }
    for (const id of enc) { ids.push(id); labels.push(piece.trained ? id : IGNORE_INDEX); }
    if (piece.eos) {
      if (tok.eosId === null) throw new DqloraError('internal: format asked for EOS but the tokenizer has none');
      ids.push(tok.eosId); labels.push(piece.trained ? tok.eosId : IGNORE_INDEX);
    }
  }
  if (addBos !== false) {
    const start = startTokens(tok, ids);
    ids.unshift(...start); labels.unshift(...start.map(() => IGNORE_INDEX));
  }
  return { ids, labels };
}

function truncate(ids: number[], labels: number[], maxLength: number, mode: 'right' | 'left-prompt', keepFirst: boolean): { ids: number[]; labels: number[] } {
  if (mode === 'left-prompt') {
    const start = keepFirst ? 1 : 0;
    let firstTrained = labels.findIndex((l) => l !== IGNORE_INDEX);
    if (firstTrained < 0) firstTrained = labels.length;
    // Keep one prompt token before the answer so the first answer token is still a target after the shift.
    const removable = Math.max(0, firstTrained - 1 - start);
    const cut = Math.min(ids.length - maxLength, removable);
    if (cut > 0) {
      ids = ids.slice(0, start).concat(ids.slice(start + cut));
      labels = labels.slice(0, start).concat(labels.slice(start + cut));
    }
  }
  return { ids: ids.slice(0, maxLength), labels: labels.slice(0, maxLength) };
}
