// Answers prompts with a local pipeline of stages, with or without the LoRA branch: the seed's before/after check.
import type { LlamaStage } from '../core/model/llama.ts';
import { LINEAR_MODULES } from '../core/model/llama.ts';
import type { LoraParams } from '../core/engine/lora.ts';
import { generateTokens } from '../core/model/generate.ts';
import { formatPrompt } from './data/format.ts';
import { startTokens, type TokenizerLike } from './data/tokenize.ts';
import type { JobConfig } from './job.ts';

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
}

export interface Decoder extends TokenizerLike { readonly vocabSize: number; decode(ids: number[], opts?: { skipSpecialTokens?: boolean }): string }

/** Encodes a prompt exactly as training encoded the prompt part of an alpaca record (template + BOS rule). */
export function encodePrompt(tok: TokenizerLike, instruction: string): number[] {
  const ids = tok.encode(formatPrompt({ instruction }, tok), { addSpecialTokens: false });
  return [...startTokens(tok, ids), ...ids];
}

/** Runs `fn` with every LoRA branch of the stages detached (the frozen base model), then restores them. */
export function withoutLora<T>(stages: LlamaStage[], fn: () => T): T {
  const saved: [{ lora: LoraParams | undefined }, LoraParams | undefined][] = [];
  for (const s of stages) for (const lw of s.weights.layers) for (const m of LINEAR_MODULES) { saved.push([lw.linears[m], lw.linears[m].lora]); lw.linears[m].lora = undefined; }
  try { return fn(); } finally { for (const [lin, p] of saved) lin.lora = p; }
}

export function answerPrompts(stages: LlamaStage[], tok: Decoder, prompts: string[], o: AnswerOptions): string[] {
  const run = (): string[] => {
    const eos = [...new Set([...(tok.eosId !== null ? [tok.eosId] : []), ...(o.eosIds ?? [])])];
    const out = generateTokens(stages, prompts.map((p) => encodePrompt(tok, p)), {
      maxNewTokens: o.maxNewTokens, temperature: o.temperature, topK: o.topK, topP: o.topP, seed: o.seed,
      eosIds: eos, padId: tok.padId ?? tok.eosId ?? 0,
    });
    // Models often pad their embedding past the tokenizer's vocabulary (e.g. to a multiple of 64); ids there have
    // no text, so they are dropped when decoding (as HF's fast tokenizers do).
    return out.map((ids) => tok.decode(ids.filter((i) => i < tok.vocabSize), { skipSpecialTokens: true }).trim());
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
  const stage = loadStage(be, job.model, fullModelSpec(loadModelConfig(job.model)), { blocksize: job.quantization.blocksize, doubleQuant: job.quantization.double_quant });
  const prompts = job.compare.prompts, o = { maxNewTokens: job.compare.max_new_tokens };
  const base = answerPrompts([stage], tok, prompts, { ...o, lora: false });
  applyAdapter(be, stage, loadAdapter(adapterDir), adapterDir);
  const tuned = answerPrompts([stage], tok, prompts, { ...o, lora: true });
  return prompts.map((prompt, i) => ({ prompt, base: base[i], tuned: tuned[i] }));
}
