// Answers prompts with a local pipeline of stages, with or without the LoRA branch: the seed's before/after check.
import type { LlamaStage } from '../core/model/llama.ts';
import { LINEAR_MODULES } from '../core/model/llama.ts';
import type { LoraParams } from '../core/engine/lora.ts';
import { generateTokens } from '../core/model/generate.ts';
import { formatPrompt } from './data/format.ts';
import { startTokens, type TokenizerLike } from './data/tokenize.ts';
import type { JobConfig } from './job.ts';
import { decodeComplete, printableText } from '../common/tokenizer.ts';
import { ConfigError } from '../common/errors.ts';

export interface AnswerOptions {
  readonly maxNewTokens: number;
  /** false: answer with the base model (LoRA branches switched off). */
  readonly lora: boolean;
  readonly temperature?: number;
  readonly topK?: number;
  readonly topP?: number;
  readonly seed?: number;
  /** Extra stop ids besides the tokenizer's EOS (e.g. generation_config.json eos_token_id list). */
  readonly eosIds?: readonly number[];
  /** Prompts as they are (no chat template / prompt format; BOS or prefix tokens still added). */
  readonly raw?: boolean;
  /**
   * The model's context (max_position_embeddings). With it, a prompt whose tokens plus maxNewTokens do not fit is
   * refused (ConfigError naming the prompt, its token count and the limit) or, with `truncate`, cut to fit.
   */
  readonly context?: PromptContext;
}

export interface PromptContext {
  /** max_position_embeddings of the model. */
  readonly maxPositions: number;
  /** Cut an over-long prompt's text from the left (keep its end) or the right (keep its start); default: refuse. */
  readonly truncate?: 'left' | 'right';
  /** How the user names the options in messages: flags for commands (default), yaml keys for job files. */
  readonly names?: { maxNewTokens: string; truncate?: string };
  /** Told about each truncation (prompt index, tokens before, tokens after). */
  readonly onTruncate?: (i: number, from: number, to: number) => void;
}

export interface Decoder extends TokenizerLike { readonly vocabSize: number; decode(ids: number[], opts?: { skipSpecialTokens?: boolean }): string }

/** Encodes a prompt exactly as training encoded the prompt part of an alpaca record (template + BOS rule). */
export function encodePrompt(tok: TokenizerLike, instruction: string, opts: { raw?: boolean } = {}): number[] {
  const ids = tok.encode(opts.raw ? instruction : formatPrompt({ instruction }, tok), { addSpecialTokens: false });
  return [...startTokens(tok, ids), ...ids];
}

/**
 * Encodes each prompt and makes it fit the model's context with room for `maxNewTokens`: refused with its token
 * count and the limit, or (ctx.truncate) its TEXT is cut — never the template around it, so the prompt still ends
 * where the answer begins — and re-encoded until it fits. Runs on the tokenizer alone, before any model is loaded.
 */
export function encodePromptsToFit(tok: Decoder, prompts: string[], maxNewTokens: number, ctx: PromptContext, opts: { raw?: boolean } = {}): number[][] {
  const names = ctx.names ?? { maxNewTokens: '--max-new-tokens', truncate: '--truncate' };
  const limit = ctx.maxPositions;
  if (maxNewTokens >= limit) {
    throw new ConfigError(`${names.maxNewTokens} ${maxNewTokens} leaves no room for a prompt in the model's context of ${limit} tokens (max_position_embeddings)`, {
      hint: `use ${names.maxNewTokens} below ${limit}`,
    });
  }
  const budget = limit - maxNewTokens;
  return prompts.map((p, i) => {
    const ids = encodePrompt(tok, p, opts);
    if (ids.length <= budget) return ids;
    const what = `prompt ${i + 1} (${p.length} characters) is ${ids.length} tokens; with ${names.maxNewTokens} ${maxNewTokens} that is ${ids.length + maxNewTokens}, over the model's context of ${limit} tokens (max_position_embeddings)`;
    if (!ctx.truncate) {
      throw new ConfigError(what, { hint: `shorten the prompt, lower ${names.maxNewTokens}${names.truncate ? `, or pass ${names.truncate} left (keep the end) or right (keep the start)` : ''}` });
    }
    const overhead = encodePrompt(tok, '', opts).length;
    if (overhead >= budget) throw new ConfigError(`${what}; the prompt format alone takes ${overhead} tokens`, { hint: `lower ${names.maxNewTokens}` });
    const text = tok.encode(p, { addSpecialTokens: false });
    let keep = budget - overhead;
    for (let tries = 0; tries < 16 && keep > 0; tries++) {
      const part = ctx.truncate === 'left' ? text.slice(text.length - keep) : text.slice(0, keep);
      // A cut inside a multi-byte character decodes to U+FFFD at the cut: drop it.
      const cut = tok.decode(part).replace(ctx.truncate === 'left' ? /^\uFFFD+/ : /\uFFFD+$/, '');
      const fitted = encodePrompt(tok, cut, opts);
      if (fitted.length <= budget) { ctx.onTruncate?.(i, ids.length, fitted.length); return fitted; }
      keep -= Math.max(1, fitted.length - budget);
    }
    throw new ConfigError(`${what}, and it could not be cut to fit`, { hint: `shorten the prompt or lower ${names.maxNewTokens}` });
  });
}

/** Runs `fn` with every LoRA branch of the stages detached (the frozen base model), then restores them. */
export function withoutLora<T>(stages: LlamaStage[], fn: () => T): T {
  const saved: [{ lora: LoraParams | undefined }, LoraParams | undefined][] = [];
  for (const s of stages) for (const lw of s.weights.layers) for (const m of LINEAR_MODULES) { saved.push([lw.linears[m], lw.linears[m].lora]); lw.linears[m].lora = undefined; }
  try { return fn(); } finally { for (const [lin, p] of saved) lin.lora = p; }
}

export function answerPrompts(stages: LlamaStage[], tok: Decoder, prompts: string[], o: AnswerOptions): string[] {
  const encoded = o.context ? encodePromptsToFit(tok, prompts, o.maxNewTokens, o.context, { raw: o.raw }) : prompts.map((p) => encodePrompt(tok, p, { raw: o.raw }));
  return answerEncoded(stages, tok, encoded, o);
}

/** answerPrompts for prompts already encoded (encodePrompt / encodePromptsToFit). */
export function answerEncoded(stages: LlamaStage[], tok: Decoder, encoded: number[][], o: AnswerOptions): string[] {
  const run = (): string[] => {
    const eos = [...new Set([...(tok.eosId !== null ? [tok.eosId] : []), ...(o.eosIds ?? [])])];
    const out = generateTokens(stages, encoded, {
      maxNewTokens: o.maxNewTokens, temperature: o.temperature, topK: o.topK, topP: o.topP, seed: o.seed,
      eosIds: eos, padId: tok.padId ?? tok.eosId ?? 0,
    });
    // Models often pad their embedding past the tokenizer's vocabulary (e.g. to a multiple of 64); ids there have
    // no text, so they are dropped when decoding (as HF's fast tokenizers do). A character cut by max_new_tokens
    // is dropped rather than shown as U+FFFD; control characters are removed (answers go to terminals and JSON).
    return out.map((ids) => printableText(decodeComplete(tok, ids.filter((i) => i < tok.vocabSize), { skipSpecialTokens: true })).trim());
  };
  return o.lora ? run() : withoutLora(stages, run);
}

/**
 * Base vs fine-tuned answers to a job's compare.prompts, loading the whole model in this process (after a
 * distributed run whose local workers have exited).
 */
export async function compareAnswers(job: JobConfig, adapterDir: string): Promise<{ prompt: string; base: string; tuned: string }[]> {
  const { createBackend } = await import('../core/engine/index.ts');
  const { loadModelConfig } = await import('../core/model/config.ts');
  const { loadStage } = await import('../core/model/loader.ts');
  const { applyAdapter, loadAdapter } = await import('../core/model/adapter.ts');
  const { fullModelSpec } = await import('../core/model/llama.ts');
  const { loadTokenizer } = await import('../common/tokenizer.ts');
  const be = await createBackend(job.backend);
  const tok = loadTokenizer(job.model);
  const stage = loadStage(be, job.model, fullModelSpec(loadModelConfig(job.model)), { blocksize: job.quantization.blocksize, doubleQuant: job.quantization.double_quant, quantization: job.quantization.mode });
  const prompts = job.compare.prompts, o = { maxNewTokens: job.compare.max_new_tokens };
  const base = answerPrompts([stage], tok, prompts, { ...o, lora: false });
  applyAdapter(be, stage, loadAdapter(adapterDir), adapterDir);
  const tuned = answerPrompts([stage], tok, prompts, { ...o, lora: true });
  return prompts.map((prompt, i) => ({ prompt, base: base[i], tuned: tuned[i] }));
}
