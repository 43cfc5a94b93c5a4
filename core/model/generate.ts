// Text generation through a local pipeline of stages: greedy or sampling (temperature, top-k, top-p), stops at EOS.
// Prompts are batched and left-padded (position ids count real tokens only), so every prompt's last token sits
// in the last column. With a KV cache (backends with `attentionCached`) the prompt is run once and each new token
// costs one position; otherwise each new token re-runs the whole sequence (O(T²) work).
import { CounterRng, mixKey } from '../../common/rng.ts';
import type { LlamaStage, StageBatch } from './llama.ts';

export interface SamplingOptions {
  readonly maxNewTokens: number;
  /** 0 (default) = greedy. */
  readonly temperature?: number;
  readonly topK?: number;
  readonly topP?: number;
  readonly seed?: number;
  /** Token ids that end an answer. */
  readonly eosIds: readonly number[];
  readonly padId: number;
  /** Called after each new token with (prompt index, tokens so far). */
  readonly onToken?: (i: number, tokens: number[]) => void;
}

/** Generates continuations of each prompt (token ids). Returns the new tokens of each (without EOS). */
export function generateTokens(stages: LlamaStage[], prompts: number[][], opts: SamplingOptions & { cache?: boolean }): number[][] {
  if (opts.cache !== false && stages.every((s) => s.canDecodeCached)) return generateCached(stages, prompts, opts);
  const B = prompts.length;
  const out: number[][] = prompts.map(() => []);
  const finished = new Array<boolean>(B).fill(false);
  const rng = new CounterRng(mixKey(opts.seed ?? 0, 0x47454e), 0);
  const eos = new Set(opts.eosIds);
  for (let stepI = 0; stepI < opts.maxNewTokens && finished.some((f) => !f); stepI++) {
    const seqs = prompts.map((p, i) => [...p, ...out[i]]);
    const T = Math.max(...seqs.map((s) => s.length));
    const ids = new Int32Array(B * T).fill(opts.padId), keyMask = new Int32Array(B * T), positions = new Int32Array(B * T);
    for (let b = 0; b < B; b++) {
      const s = seqs[b], off = T - s.length;
      for (let t = 0; t < s.length; t++) { ids[b * T + off + t] = s[t]; keyMask[b * T + off + t] = 1; positions[b * T + off + t] = t; }
    }
    const batch: StageBatch = { B, T, ids, keyMask, positions, sampleIds: new Int32Array(B) };
    let hidden;
    for (let i = 0; i < stages.length - 1; i++) hidden = stages[i].forward(-1, batch, hidden, { train: false }).hidden;
    const rows = Array.from({ length: B }, (_, b) => b * T + T - 1);
    const logits = stages[stages.length - 1].logitsAt(batch, hidden, rows);
    for (let b = 0; b < B; b++) {
      if (finished[b]) continue;
      const tok = pickToken(logits[b], opts, rng);
      if (eos.has(tok)) { finished[b] = true; continue; }
      out[b].push(tok);
      opts.onToken?.(b, out[b]);
    }
  }
  return out;
}

/** Greedy argmax, or temperature / top-k / top-p sampling. */
export function pickToken(logits: Float32Array, o: Pick<SamplingOptions, 'temperature' | 'topK' | 'topP'>, rng: CounterRng): number {
  const temp = o.temperature ?? 0;
  if (temp <= 0) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  let idx = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  if (o.topK && o.topK > 0) idx = idx.slice(0, o.topK);
  const maxL = logits[idx[0]];
  let probs = idx.map((i) => Math.exp((logits[i] - maxL) / temp));
  let z = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / z);
  if (o.topP !== undefined && o.topP < 1) {
    let cum = 0, keep = 0;
    while (keep < probs.length && cum < o.topP) cum += probs[keep++];
    idx = idx.slice(0, Math.max(1, keep)); probs = probs.slice(0, Math.max(1, keep));
    z = probs.reduce((a, b) => a + b, 0); probs = probs.map((p) => p / z);
  }
  let u = rng.next();
  for (let k = 0; k < idx.length; k++) { u -= probs[k]; if (u <= 0) return idx[k]; }
  return idx[idx.length - 1];
}

/** Generation with a KV cache per stage: one prefill of the left-padded prompts, then one position per token. */
function generateCached(stages: LlamaStage[], prompts: number[][], opts: SamplingOptions): number[][] {
  const B = prompts.length, T0 = Math.max(...prompts.map((p) => p.length)), cap = T0 + opts.maxNewTokens;
  const out: number[][] = prompts.map(() => []);
  const finished = new Array<boolean>(B).fill(false);
  const rng = new CounterRng(mixKey(opts.seed ?? 0, 0x47454e), 0);
  const eos = new Set(opts.eosIds);
  const caches = stages.map((s) => s.createKvCache(B, cap));
  const keyMask = new Int32Array(B * cap);
  const ids = new Int32Array(B * T0).fill(opts.padId), positions = new Int32Array(B * T0);
  const lens = prompts.map((p) => p.length);
  prompts.forEach((p, b) => {
    const off = T0 - p.length;
    for (let t = 0; t < p.length; t++) { ids[b * T0 + off + t] = p[t]; positions[b * T0 + off + t] = t; keyMask[b * cap + off + t] = 1; }
  });
  const run = (start: number, T: number, idsNow: Int32Array, pos: Int32Array): Float32Array[] => {
    let hidden: import('../engine/backend.ts').Tensor | undefined;
    let logits: Float32Array[] | undefined;
    stages.forEach((s, i) => {
      const r = s.decode(caches[i], start, { B, T, ids: idsNow, positions: pos, keyMask }, hidden);
      hidden = r.hidden; logits = r.logits;
    });
    return logits!;
  };
  try {
    let logits = run(0, T0, ids, positions);
    for (let step = 0; step < opts.maxNewTokens; step++) {
      const next = new Int32Array(B), pos = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        pos[b] = lens[b] + step;
        if (finished[b]) { next[b] = opts.padId; continue; }
        const tok = pickToken(logits[b], opts, rng);
        if (eos.has(tok)) { finished[b] = true; next[b] = opts.padId; continue; }
        out[b].push(tok); next[b] = tok;
        opts.onToken?.(b, out[b]);
      }
      if (finished.every((f) => f) || step === opts.maxNewTokens - 1) break;
      for (let b = 0; b < B; b++) keyMask[b * cap + T0 + step] = 1;
      logits = run(T0 + step, 1, next, pos);
    }
  } finally {
    stages.forEach((s, i) => s.freeKvCache(caches[i]));
  }
  return out;
}
