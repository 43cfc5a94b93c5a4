// Where each part of the decoder lives in a checkpoint, per architecture. The engine computes one layer shape
// (q, k, v, o, gate, up, down + two RMSNorms; RoPE in HF's rotate_half layout); this file maps checkpoint tensors
// onto it:
//   llama / mistral / qwen2: one tensor per linear, `model.layers.N.self_attn.q_proj.weight`, …
//   chatglm (ChatGLM2): packed `transformer.encoder.layers.N.self_attention.query_key_value` [(Hq + 2Hk)·D, H]
//     (+ bias) = q | k | v rows, `mlp.dense_h_to_4h` [2I, H] = gate | up rows, `self_attention.dense` = o,
//     `mlp.dense_4h_to_h` = down. RoPE rotates the first D/2 dims of each head in interleaved pairs (2i, 2i+1): the
//     q and k rows are permuted within each head so that pair becomes (i, i + D/4) — rotate_half — which leaves
//     every q·k dot product unchanged. LoRA on a packed module is one LoRA (one A, one B over all its rows), as in
//     PEFT; its B rows use the same permutation internally and are written back in checkpoint order.
import type { ModelConfig } from './config.ts';
import { LINEAR_MODULES, modulePath, type LinearModule } from './llama.ts';

/** How one engine linear is read from the checkpoint. */
export interface LinearSource {
  /** The checkpoint module (PEFT's module path; the LoRA belongs to it). */
  readonly module: string;
  /** Rows [start, end) of a packed module's weight (and bias) that this linear uses (of `total`); undefined = all. */
  readonly rows?: { readonly start: number; readonly end: number; readonly total: number };
  /** Row permutation applied after slicing: new row i = old row perm[i] (interleaved → rotate_half). */
  readonly perm?: Int32Array;
  /** The module's LoRA B row permutation over all `total` rows (internal i = external perm[i]). */
  readonly loraRowPerm?: Int32Array;
}

export interface LayerNames {
  readonly inputNorm: string;
  readonly postNorm: string;
  readonly linears: Record<LinearModule, LinearSource>;
}

export interface ModelNames {
  readonly embed: string;
  readonly finalNorm: string;
  readonly lmHead: string;
  layer(l: number): LayerNames;
  /** PEFT's module names for `all-linear` and default targets. */
  readonly allLinear: readonly string[];
}

/** Per-head row permutation turning interleaved RoPE pairs into rotate_half pairs. [heads · D]. */
export function interleavedToHalfPerm(heads: number, D: number, rotaryDim: number): Int32Array {
  const perm = new Int32Array(heads * D);
  for (let h = 0; h < heads; h++) {
    for (let j = 0; j < D; j++) {
      let old = j;
      if (j < rotaryDim / 2) old = 2 * j;
      else if (j < rotaryDim) old = 2 * (j - rotaryDim / 2) + 1;
      perm[h * D + j] = h * D + old;
    }
  }
  return perm;
}

export function modelNames(cfg: ModelConfig): ModelNames {
  if (cfg.modelType === 'chatglm') return chatGlmNames(cfg);
  return {
    embed: 'model.embed_tokens.weight', finalNorm: 'model.norm.weight', lmHead: 'lm_head.weight',
    allLinear: LINEAR_MODULES,
    layer(l) {
      const linears = {} as Record<LinearModule, LinearSource>;
      for (const m of LINEAR_MODULES) {
        linears[m] = { module: modulePath(l, m) };
      }
      return { inputNorm: `model.layers.${l}.input_layernorm.weight`, postNorm: `model.layers.${l}.post_attention_layernorm.weight`, linears };
    },
  };
}

function chatGlmNames(cfg: ModelConfig): ModelNames {
  const D = cfg.headDim, q = cfg.numHeads * D, kv = cfg.numKvHeads * D, I = cfg.intermediateSize;
  const permQ = interleavedToHalfPerm(cfg.numHeads, D, cfg.rotaryDim), permK = interleavedToHalfPerm(cfg.numKvHeads, D, cfg.rotaryDim);
  const qkvTotal = q + 2 * kv;
  const qkvPerm = new Int32Array(qkvTotal);
  for (let i = 0; i < q; i++) qkvPerm[i] = permQ[i];
  for (let i = 0; i < kv; i++) qkvPerm[q + i] = q + permK[i];
  for (let i = 0; i < kv; i++) qkvPerm[q + kv + i] = q + kv + i;
  return {
    embed: 'transformer.embedding.word_embeddings.weight', finalNorm: 'transformer.encoder.final_layernorm.weight', lmHead: 'transformer.output_layer.weight',
    allLinear: ['query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h'],
    layer(l) {
      const p = `transformer.encoder.layers.${l}`;
      const qkv = `${p}.self_attention.query_key_value`, h4 = `${p}.mlp.dense_h_to_4h`;
      return {
        inputNorm: `${p}.input_layernorm.weight`, postNorm: `${p}.post_attention_layernorm.weight`,
        linears: {
          q_proj: { module: qkv, rows: { start: 0, end: q, total: qkvTotal }, perm: permQ, loraRowPerm: qkvPerm },
          k_proj: { module: qkv, rows: { start: q, end: q + kv, total: qkvTotal }, perm: permK, loraRowPerm: qkvPerm },
          v_proj: { module: qkv, rows: { start: q + kv, end: qkvTotal, total: qkvTotal }, loraRowPerm: qkvPerm },
          o_proj: { module: `${p}.self_attention.dense` },
          gate_proj: { module: h4, rows: { start: 0, end: I, total: 2 * I } },
          up_proj: { module: h4, rows: { start: I, end: 2 * I, total: 2 * I } },
          down_proj: { module: `${p}.mlp.dense_4h_to_h` },
        },
      };
    },
  };
}

/** Rows [start, end) of a row-major [total, cols] array, reordered by perm (new i = old perm[i]) when given. */
export function sliceRows(data: Float32Array, cols: number, start: number, end: number, perm?: Int32Array): Float32Array {
  const out = new Float32Array((end - start) * cols);
  for (let i = 0; i < end - start; i++) {
    const src = start + (perm ? perm[i] : i);
    out.set(data.subarray(src * cols, (src + 1) * cols), i * cols);
  }
  return out;
}
