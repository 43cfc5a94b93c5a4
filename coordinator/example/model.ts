// The built-in example's base model: a small random-init Llama written in real Hugging Face format
// (config.json, model.safetensors, generation_config.json + the project's byte-level BPE tokenizer), so every
// loader path a real checkpoint takes is exercised. No pretrained weights exist here; the example shows QLoRA
// teaching a frozen (random) NF4 base new answers through the adapter alone.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeSafetensors, type TensorRecord } from '../../common/safetensors.ts';
import { CounterRng, mixKey } from '../../common/rng.ts';

export interface TinyLlamaShape {
  readonly hiddenSize: number;
  readonly intermediateSize: number;
  readonly numLayers: number;
  readonly numHeads: number;
  readonly numKvHeads: number;
  readonly vocabSize: number;
  readonly maxPositionEmbeddings: number;
  readonly tieWordEmbeddings: boolean;
  readonly ropeTheta?: number;
  readonly rmsNormEps?: number;
  readonly bosTokenId?: number | null;
  readonly eosTokenId?: number | null;
  readonly padTokenId?: number | null;
  readonly qkvBias?: boolean;           // Qwen2-style
  readonly modelType?: 'llama' | 'qwen2' | 'mistral';
  /**
   * Std of the embedding / LM head init (default 0.02, as HF). A frozen random head caps how confident the model can
   * become (max logit ≈ std·H), so models meant to be fine-tuned through LoRA alone use a larger one.
   */
  readonly embedStd?: number;
}

/** The example's shape: small enough to train in minutes on 2 CPU cores. */
export const EXAMPLE_SHAPE: Omit<TinyLlamaShape, 'vocabSize'> = {
  hiddenSize: 256, intermediateSize: 704, numLayers: 4, numHeads: 8, numKvHeads: 4,
  maxPositionEmbeddings: 512, tieWordEmbeddings: false, ropeTheta: 10000, rmsNormEps: 1e-5, embedStd: 0.125,
};

/** config.json as transformers writes it for LlamaForCausalLM / Qwen2ForCausalLM. */
export function hfConfigJson(s: TinyLlamaShape): Record<string, unknown> {
  const type = s.modelType ?? 'llama';
  const arch = type === 'qwen2' ? 'Qwen2ForCausalLM' : type === 'mistral' ? 'MistralForCausalLM' : 'LlamaForCausalLM';
  const cfg: Record<string, unknown> = {
    architectures: [arch], model_type: type,
    hidden_size: s.hiddenSize, intermediate_size: s.intermediateSize, num_hidden_layers: s.numLayers,
    num_attention_heads: s.numHeads, num_key_value_heads: s.numKvHeads, head_dim: s.hiddenSize / s.numHeads,
    hidden_act: 'silu', max_position_embeddings: s.maxPositionEmbeddings, initializer_range: 0.02,
    rms_norm_eps: s.rmsNormEps ?? 1e-5, rope_theta: s.ropeTheta ?? 10000, rope_scaling: null,
    tie_word_embeddings: s.tieWordEmbeddings, vocab_size: s.vocabSize, torch_dtype: 'float32', use_cache: true,
    bos_token_id: s.bosTokenId ?? null, eos_token_id: s.eosTokenId ?? null, pad_token_id: s.padTokenId ?? null,
  };
  if (type === 'llama') { cfg.attention_bias = false; cfg.mlp_bias = false; cfg.pretraining_tp = 1; }
  return cfg;
}

/**
 * Writes a random-init model directory. Weights ~ N(0, 0.02) as HF's `_init_weights`, with the residual output
 * projections (o_proj, down_proj) scaled by 1/√(2L) (GPT-2 style) so the random network stays well conditioned.
 */
export function writeRandomLlama(dir: string, s: TinyLlamaShape, seed: number): void {
  mkdirSync(dir, { recursive: true });
  const H = s.hiddenSize, I = s.intermediateSize, D = H / s.numHeads, KV = s.numKvHeads * D, V = s.vocabSize;
  const rng = new CounterRng(mixKey(seed, 0x4d4f44), 0);
  const normal = (n: number, std: number): Float32Array => {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = rng.normal() * std;
    return a;
  };
  const ones = (n: number): Float32Array => new Float32Array(n).fill(1);
  const recs: TensorRecord[] = [];
  const add = (name: string, shape: number[], data: Float32Array): void => { recs.push({ name, dtype: 'F32', shape, data }); };
  const resid = 0.02 / Math.sqrt(2 * s.numLayers);
  add('model.embed_tokens.weight', [V, H], normal(V * H, s.embedStd ?? 0.02));
  for (let l = 0; l < s.numLayers; l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [H], ones(H));
    add(`${p}.post_attention_layernorm.weight`, [H], ones(H));
    add(`${p}.self_attn.q_proj.weight`, [H, H], normal(H * H, 0.02));
    add(`${p}.self_attn.k_proj.weight`, [KV, H], normal(KV * H, 0.02));
    add(`${p}.self_attn.v_proj.weight`, [KV, H], normal(KV * H, 0.02));
    if (s.qkvBias) {
      add(`${p}.self_attn.q_proj.bias`, [H], normal(H, 0.02));
      add(`${p}.self_attn.k_proj.bias`, [KV], normal(KV, 0.02));
      add(`${p}.self_attn.v_proj.bias`, [KV], normal(KV, 0.02));
    }
    add(`${p}.self_attn.o_proj.weight`, [H, H], normal(H * H, resid));
    add(`${p}.mlp.gate_proj.weight`, [I, H], normal(I * H, 0.02));
    add(`${p}.mlp.up_proj.weight`, [I, H], normal(I * H, 0.02));
    add(`${p}.mlp.down_proj.weight`, [H, I], normal(H * I, resid));
  }
  add('model.norm.weight', [H], ones(H));
  if (!s.tieWordEmbeddings) add('lm_head.weight', [V, H], normal(V * H, s.embedStd ?? 0.02));
  writeSafetensors(join(dir, 'model.safetensors'), recs, { format: 'pt' });
  writeFileSync(join(dir, 'config.json'), JSON.stringify(hfConfigJson(s), null, 2) + '\n');
  writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({
    bos_token_id: s.bosTokenId ?? null, eos_token_id: s.eosTokenId ?? null, pad_token_id: s.padTokenId ?? null,
    do_sample: false, max_new_tokens: 64,
  }, null, 2) + '\n');
}
