// Hugging Face `config.json` / `generation_config.json` for the Llama family (Llama 2/3, Mistral, Qwen2/2.5),
// validated into one plain ModelConfig, written back in a form transformers 4.4x and 5.x load, and the RoPE
// inverse frequencies every rope_type needs (qlora-spec.md §11).
//
// Field defaults are the transformers config-class defaults (LlamaConfig, MistralConfig, Qwen2Config), since
// that is what `from_pretrained` uses when a config.json leaves a field out. The few size fields have no
// sensible default for a real checkpoint and are required. Every problem names the field and the file.

import fs from 'node:fs';
import path from 'node:path';
import { ConfigError, FormatError, UnsupportedError } from '../../common/errors.ts';

export type ModelType = 'llama' | 'mistral' | 'qwen2' | 'chatglm';
export const SUPPORTED_MODEL_TYPES: readonly ModelType[] = ['llama', 'mistral', 'qwen2', 'chatglm'];

export interface RopeScaling {
  type: 'default' | 'linear' | 'dynamic' | 'llama3' | 'yarn';
  /** 1 for 'default'. */
  factor: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  originalMaxPositionEmbeddings?: number;
  betaFast?: number;
  betaSlow?: number;
  attentionFactor?: number;
  /** yarn (DeepSeek style): attention_factor = mscale(factor, mscale) / mscale(factor, mscaleAllDim). */
  mscale?: number;
  mscaleAllDim?: number;
  /** yarn: floor/ceil the correction range (transformers default true). */
  truncate?: boolean;
}

export interface ModelConfig {
  modelType: ModelType;
  architectures: string[];
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** Dims of each head that RoPE rotates (headDim for the Llama family; ChatGLM2 rotates the first half). */
  rotaryDim: number;
  /**
   * RoPE pairs dims (2i, 2i+1) (Meta / ChatGLM "interleaved") instead of HF's (i, i + rotaryDim/2). The loader
   * permutes the q/k rows of interleaved checkpoints so the engine always computes the HF (rotate_half) layout.
   */
  ropeInterleaved: boolean;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections have biases (Qwen2 always; Llama with attention_bias). */
  qkvBias: boolean;
  oBias: boolean;
  mlpBias: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
  padTokenId: number | null;
  /** The checkpoint's dtype (torch_dtype, or transformers 5.x `dtype`). */
  torchDtype: 'float32' | 'bfloat16' | 'float16';
  /** Sliding-window attention size, null when attention is full (Qwen2 unless use_sliding_window). */
  slidingWindow: number | null;
  /** The raw `quantization_config` (e.g. bitsandbytes) if the checkpoint is pre-quantized. */
  quantization: Record<string, unknown> | null;
  /** The parsed config.json as read, for fields this interface does not model. */
  raw: Record<string, unknown>;
}

const ARCH: Record<ModelType, string> = { llama: 'LlamaForCausalLM', mistral: 'MistralForCausalLM', qwen2: 'Qwen2ForCausalLM', chatglm: 'ChatGLMModel' };

/** transformers config-class defaults for the optional fields. */
const DEFAULTS: Record<ModelType, { rmsNormEps: number; ropeTheta: number; maxPos: number; bos: number | null; eos: number | null; slidingWindow: number | null }> = {
  llama: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPos: 2048, bos: 1, eos: 2, slidingWindow: null },
  mistral: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPos: 4096 * 32, bos: 1, eos: 2, slidingWindow: 4096 },
  qwen2: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPos: 32768, bos: null, eos: null, slidingWindow: 4096 },
  chatglm: { rmsNormEps: 1e-5, ropeTheta: 10000, maxPos: 2048, bos: null, eos: 2, slidingWindow: null },
};

// ---------------------------------------------------------------------------------------------------------
// Field readers: each names the field and the file in its error.

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function own(o: Obj, k: string): unknown {
  return Object.prototype.hasOwnProperty.call(o, k) ? o[k] : undefined;
}

function show(v: unknown): string {
  let s: string | undefined;
  try { s = JSON.stringify(v); } catch { s = undefined; }
  s ??= String(v);
  return s.length > 60 ? s.slice(0, 57) + '...' : s;
}

class Fields {
  constructor(readonly o: Obj, readonly source: string, readonly prefix = '') {}

  err(key: string, want: string, v: unknown): FormatError {
    return new FormatError(`${this.source}: field "${this.prefix}${key}" must be ${want}, found ${show(v)}`);
  }

  has(key: string): boolean {
    const v = own(this.o, key);
    return v !== undefined && v !== null;
  }

  /** Positive (or non-negative) safe integer; `def` when absent/null, required when def is undefined. */
  int(key: string, def?: number, min = 1): number {
    const v = own(this.o, key);
    if (v === undefined || v === null) {
      if (def === undefined) throw new FormatError(`${this.source}: required field "${this.prefix}${key}" is missing`);
      return def;
    }
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw this.err(key, min === 1 ? 'a positive integer' : `an integer >= ${min}`, v);
    return v + 0; // JSON "-0" → 0
  }

  /** Finite number > 0 (or >= min when `inclusive`). */
  num(key: string, def?: number, opts: { min?: number; inclusive?: boolean } = {}): number {
    const v = own(this.o, key);
    if (v === undefined || v === null) {
      if (def === undefined) throw new FormatError(`${this.source}: required field "${this.prefix}${key}" is missing`);
      return def;
    }
    const min = opts.min ?? 0;
    if (typeof v !== 'number' || !Number.isFinite(v) || (opts.inclusive ? v < min : v <= min)) {
      throw this.err(key, `a finite number ${opts.inclusive ? '>=' : '>'} ${min}`, v);
    }
    return v;
  }

  optNum(key: string, opts: { min?: number; inclusive?: boolean } = {}): number | undefined {
    return this.has(key) ? this.num(key, undefined, opts) : undefined;
  }

  bool(key: string, def: boolean): boolean {
    const v = own(this.o, key);
    if (v === undefined || v === null) return def;
    if (typeof v !== 'boolean') throw this.err(key, 'true or false', v);
    return v;
  }

  /** A token id: non-negative integer or null. */
  tokenId(key: string, def: number | null): number | null {
    const v = own(this.o, key);
    if (v === undefined) return def;
    if (v === null) return null;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw this.err(key, 'a token id (non-negative integer) or null', v);
    return v + 0; // JSON "-0" → 0
  }

  /** `eos_token_id`: an id or a list of ids. */
  tokenIds(key: string, def: number[]): number[] {
    const v = own(this.o, key);
    if (v === undefined) return def;
    if (v === null) return [];
    const list = Array.isArray(v) ? v : [v];
    for (const x of list) {
      if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 0) throw this.err(key, 'a token id or a list of token ids', v);
    }
    return [...new Set((list as number[]).map((x) => x + 0))];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Parsing

/** Validates a parsed config.json. `source` (the file path) is named in every error. */
export function parseModelConfig(json: unknown, source: string): ModelConfig {
  if (!isObj(json)) throw new FormatError(`${source}: config must be a JSON object, found ${show(json)}`);
  const raw = json;
  const f = new Fields(raw, source);
  const mt = own(raw, 'model_type');
  if (typeof mt !== 'string') {
    throw new FormatError(`${source}: field "model_type" must be a string, found ${show(mt)}`, { hint: `supported model types: ${SUPPORTED_MODEL_TYPES.join(', ')}` });
  }
  if (!(SUPPORTED_MODEL_TYPES as readonly string[]).includes(mt)) {
    throw new UnsupportedError(`${source}: model_type "${mt.slice(0, 60)}" is not supported`, {
      hint: `supported model types: ${SUPPORTED_MODEL_TYPES.join(', ')}`,
    });
  }
  const modelType = mt as ModelType;
  if (modelType === 'chatglm') return parseChatGlmConfig(raw, source);
  const d = DEFAULTS[modelType];

  const archV = own(raw, 'architectures');
  let architectures: string[];
  if (archV === undefined || archV === null) architectures = [ARCH[modelType]];
  else if (Array.isArray(archV) && archV.every((a) => typeof a === 'string')) architectures = [...(archV as string[])];
  else throw f.err('architectures', 'a list of class names', archV);

  const act = own(raw, 'hidden_act');
  if (act !== undefined && act !== null && act !== 'silu') {
    throw new UnsupportedError(`${source}: field "hidden_act" is ${show(act)}; only "silu" (SwiGLU) is supported`);
  }

  const hiddenSize = f.int('hidden_size');
  const intermediateSize = f.int('intermediate_size');
  const numLayers = f.int('num_hidden_layers');
  const numHeads = f.int('num_attention_heads');
  const numKvHeads = f.int('num_key_value_heads', numHeads);
  const vocabSize = f.int('vocab_size');
  if (numHeads % numKvHeads !== 0) {
    throw new FormatError(`${source}: field "num_attention_heads" (${numHeads}) must be a multiple of "num_key_value_heads" (${numKvHeads})`);
  }
  let headDim: number;
  if (f.has('head_dim')) headDim = f.int('head_dim');
  else {
    if (hiddenSize % numHeads !== 0) {
      throw new FormatError(`${source}: field "hidden_size" (${hiddenSize}) must be a multiple of "num_attention_heads" (${numHeads}) when "head_dim" is not given`);
    }
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) throw new FormatError(`${source}: field "head_dim" (${headDim}) must be even for rotary embeddings`);
  const prf = own(raw, 'partial_rotary_factor');
  if (prf !== undefined && prf !== null && prf !== 1 && prf !== 1.0) {
    throw new UnsupportedError(`${source}: field "partial_rotary_factor" = ${show(prf)}; only full rotary embeddings (1.0) are supported`);
  }

  const rmsNormEps = f.num('rms_norm_eps', d.rmsNormEps);
  const maxPositionEmbeddings = f.int('max_position_embeddings', d.maxPos);
  const { ropeTheta, ropeScaling } = parseRope(raw, source, d.ropeTheta, maxPositionEmbeddings);

  const tieWordEmbeddings = f.bool('tie_word_embeddings', false);
  let qkvBias = false, oBias = false, mlpBias = false;
  if (modelType === 'llama') {
    qkvBias = oBias = f.bool('attention_bias', false);
    mlpBias = f.bool('mlp_bias', false);
  } else if (modelType === 'qwen2') {
    qkvBias = true; // hard-coded in Qwen2Attention; the config has no field for it
  }

  let slidingWindow: number | null = null;
  if (modelType === 'mistral') {
    const sw = own(raw, 'sliding_window');
    slidingWindow = sw === null ? null : f.int('sliding_window', d.slidingWindow ?? undefined);
  } else if (modelType === 'qwen2') {
    if (f.bool('use_sliding_window', false)) slidingWindow = f.int('sliding_window', d.slidingWindow ?? undefined);
  }

  const bosTokenId = f.tokenId('bos_token_id', d.bos);
  const eosTokenIds = f.tokenIds('eos_token_id', d.eos === null ? [] : [d.eos]);
  const padTokenId = f.tokenId('pad_token_id', null);
  const torchDtype = parseDtype(raw, source);

  const q = own(raw, 'quantization_config');
  let quantization: Record<string, unknown> | null = null;
  if (q !== undefined && q !== null) {
    if (!isObj(q)) throw f.err('quantization_config', 'an object', q);
    quantization = q;
  }

  return {
    modelType, architectures, hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, rotaryDim: headDim,
    ropeInterleaved: false, vocabSize, rmsNormEps, ropeTheta, ropeScaling, maxPositionEmbeddings, tieWordEmbeddings, qkvBias, oBias, mlpBias,
    bosTokenId, eosTokenIds, padTokenId, torchDtype, slidingWindow, quantization, raw,
  };
}

/**
 * ChatGLM2 (THUDM/chatglm2-6b remote code, qlora-spec §10): `num_layers`, `ffn_hidden_size`, `kv_channels` (head
 * dim), `multi_query_group_num` (kv heads), `padded_vocab_size`, `layernorm_epsilon`, packed query_key_value with
 * bias, SwiGLU, RoPE on the first half of each head in interleaved pairs, no tied embeddings. The variants its code
 * supports but the released checkpoints do not use (LayerNorm instead of RMSNorm, biases on the other linears,
 * residual after the norm, rope_ratio ≠ 1 of the 32k models) are refused by name.
 */
function parseChatGlmConfig(raw: Obj, source: string): ModelConfig {
  const f = new Fields(raw, source);
  const refuse = (key: string, ok: (v: unknown) => boolean, what: string): void => {
    const v = own(raw, key);
    if (v !== undefined && v !== null && !ok(v)) throw new UnsupportedError(`${source}: ChatGLM field "${key}" = ${show(v)} is not supported (${what})`);
  };
  refuse('rmsnorm', (v) => v === true, 'only RMSNorm checkpoints');
  refuse('apply_residual_connection_post_layernorm', (v) => v === false, 'only pre-norm residuals');
  refuse('add_bias_linear', (v) => v === false, 'only bias-free dense layers');
  refuse('post_layer_norm', (v) => v === true, 'the final layer norm is required');
  refuse('original_rope', (v) => v === true, 'only the original RoPE');
  refuse('rope_ratio', (v) => v === 1, 'the 32k models’ scaled RoPE is not supported');
  const hiddenSize = f.int('hidden_size');
  const numHeads = f.int('num_attention_heads');
  const headDim = f.int('kv_channels', hiddenSize / numHeads);
  const numKvHeads = f.bool('multi_query_attention', false) ? f.int('multi_query_group_num', 1) : numHeads;
  if (numHeads % numKvHeads !== 0) throw new FormatError(`${source}: "num_attention_heads" (${numHeads}) must be a multiple of "multi_query_group_num" (${numKvHeads})`);
  if (headDim % 4 !== 0) throw new FormatError(`${source}: "kv_channels" (${headDim}) must be a multiple of 4 (RoPE on half the head, in pairs)`);
  const vocabSize = own(raw, 'padded_vocab_size') !== undefined ? f.int('padded_vocab_size') : f.int('vocab_size');
  const maxPos = f.int('seq_length', DEFAULTS.chatglm.maxPos);
  const archV = own(raw, 'architectures');
  return {
    modelType: 'chatglm',
    architectures: Array.isArray(archV) && archV.every((a) => typeof a === 'string') ? [...(archV as string[])] : [ARCH.chatglm],
    hiddenSize, intermediateSize: f.int('ffn_hidden_size'), numLayers: f.int('num_layers'), numHeads, numKvHeads, headDim,
    rotaryDim: headDim / 2, ropeInterleaved: true, vocabSize,
    rmsNormEps: f.num('layernorm_epsilon', DEFAULTS.chatglm.rmsNormEps), ropeTheta: 10000, ropeScaling: { type: 'default', factor: 1 },
    maxPositionEmbeddings: maxPos, tieWordEmbeddings: f.bool('tie_word_embeddings', false),
    qkvBias: f.bool('add_qkv_bias', false), oBias: false, mlpBias: false,
    bosTokenId: f.tokenId('bos_token_id', null), eosTokenIds: f.tokenIds('eos_token_id', [2]), padTokenId: f.tokenId('pad_token_id', 0),
    torchDtype: parseDtype(raw, source), slidingWindow: null,
    quantization: isObj(own(raw, 'quantization_config')) ? own(raw, 'quantization_config') as Record<string, unknown> : null,
    raw,
  };
}

function parseDtype(raw: Obj, source: string): ModelConfig['torchDtype'] {
  // transformers 5.x writes "dtype"; 4.x "torch_dtype".
  const key = own(raw, 'dtype') !== undefined && own(raw, 'dtype') !== null ? 'dtype' : 'torch_dtype';
  const v = own(raw, key);
  if (v === undefined || v === null || v === 'auto') return 'float32';
  if (typeof v !== 'string') throw new FormatError(`${source}: field "${key}" must be a dtype name, found ${show(v)}`);
  const name = v.replace(/^torch\./, '');
  if (name === 'float32' || name === 'float') return 'float32';
  if (name === 'bfloat16') return 'bfloat16';
  if (name === 'float16' || name === 'half') return 'float16';
  throw new UnsupportedError(`${source}: field "${key}" = "${v.slice(0, 40)}" is not supported`, { hint: 'supported: float32, bfloat16, float16' });
}

const ROPE_TYPES = ['default', 'linear', 'dynamic', 'llama3', 'yarn'] as const;

/** rope_theta + rope_scaling (4.x) or rope_parameters (5.x) → one RopeScaling. */
function parseRope(raw: Obj, source: string, defTheta: number, maxPos: number): { ropeTheta: number; ropeScaling: RopeScaling } {
  const rp = own(raw, 'rope_parameters');
  const rs = own(raw, 'rope_scaling');
  let params: Obj | null = null;
  let field = 'rope_scaling';
  if (rp !== undefined && rp !== null) {
    if (!isObj(rp)) throw new FormatError(`${source}: field "rope_parameters" must be an object, found ${show(rp)}`);
    params = rp;
    field = 'rope_parameters';
  } else if (rs !== undefined && rs !== null) {
    if (!isObj(rs)) throw new FormatError(`${source}: field "rope_scaling" must be an object or null, found ${show(rs)}`);
    params = rs;
  }
  const top = new Fields(raw, source);
  const pf = new Fields(params ?? {}, source, `${field}.`);
  // θ <= 1 gives no decaying frequencies (and log θ = 0 in yarn): reject it rather than compute NaNs.
  const ropeTheta = params && pf.has('rope_theta') ? pf.num('rope_theta', undefined, { min: 1 }) : top.num('rope_theta', defTheta, { min: 1 });
  if (!params) return { ropeTheta, ropeScaling: { type: 'default', factor: 1 } };

  const t = own(params, 'rope_type') ?? own(params, 'type') ?? 'default';
  if (typeof t !== 'string') throw new FormatError(`${source}: field "${field}.rope_type" must be a string, found ${show(t)}`);
  if (!(ROPE_TYPES as readonly string[]).includes(t)) {
    throw new UnsupportedError(`${source}: ${field} type "${t.slice(0, 40)}" is not supported`, { hint: `supported: ${ROPE_TYPES.join(', ')}` });
  }
  const type = t as RopeScaling['type'];
  switch (type) {
    case 'default':
      return { ropeTheta, ropeScaling: { type, factor: 1 } };
    case 'linear':
    case 'dynamic':
      return { ropeTheta, ropeScaling: { type, factor: pf.num('factor') } };
    case 'llama3': {
      const s: RopeScaling = {
        type, factor: pf.num('factor'), lowFreqFactor: pf.num('low_freq_factor'), highFreqFactor: pf.num('high_freq_factor'),
        originalMaxPositionEmbeddings: pf.int('original_max_position_embeddings'),
      };
      if (!(s.highFreqFactor! > s.lowFreqFactor!)) {
        throw new FormatError(`${source}: field "${field}.high_freq_factor" (${s.highFreqFactor}) must be greater than "low_freq_factor" (${s.lowFreqFactor})`);
      }
      return { ropeTheta, ropeScaling: s };
    }
    case 'yarn': {
      const orig = pf.has('original_max_position_embeddings') ? pf.int('original_max_position_embeddings') : undefined;
      // transformers 5.x: a missing factor is the ratio of the extended to the original context.
      const factor = pf.has('factor') || orig === undefined ? pf.num('factor') : maxPos / orig;
      const s: RopeScaling = { type, factor };
      if (orig !== undefined) s.originalMaxPositionEmbeddings = orig;
      const opt = (k: keyof RopeScaling, key: string) => { const v = pf.optNum(key); if (v !== undefined) (s as unknown as Record<string, number>)[k] = v; };
      opt('betaFast', 'beta_fast');
      opt('betaSlow', 'beta_slow');
      opt('attentionFactor', 'attention_factor');
      opt('mscale', 'mscale');
      opt('mscaleAllDim', 'mscale_all_dim');
      if (pf.has('truncate')) s.truncate = pf.bool('truncate', true);
      return { ropeTheta, ropeScaling: s };
    }
  }
}

function readJsonFile(p: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    throw new FormatError(`cannot read ${p}: ${(e as Error).message}`, { cause: e });
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${p}: invalid JSON: ${(e as Error).message}`, { cause: e });
  }
}

/** Reads and validates `<dir>/config.json`. */
export function loadModelConfig(dir: string): ModelConfig {
  const p = path.join(dir, 'config.json');
  if (!fs.existsSync(p)) throw new FormatError(`${dir}: no config.json`, { hint: 'point --model at a Hugging Face model directory' });
  return parseModelConfig(readJsonFile(p), p);
}

// ---------------------------------------------------------------------------------------------------------
// Writing

/**
 * A config.json object transformers 4.4x and 5.x both load: unknown fields of `raw` are kept, every modelled
 * field is written under its HF name, rope as `rope_theta` + `rope_scaling` (5.x converts it to
 * rope_parameters itself), dtype as `torch_dtype`.
 */
export function modelConfigToHfJson(cfg: ModelConfig): Record<string, unknown> {
  if (cfg.modelType === 'chatglm') return { ...cfg.raw }; // remote-code config: written back as read
  const out: Record<string, unknown> = { ...cfg.raw };
  delete out.rope_parameters; // would shadow rope_scaling in 5.x
  delete out.dtype;
  if (cfg.modelType === 'llama' && cfg.qkvBias !== cfg.oBias) {
    throw new ConfigError('llama configs have one attention_bias for q/k/v and o; qkvBias and oBias must be equal');
  }
  if (cfg.modelType === 'qwen2' && (!cfg.qkvBias || cfg.oBias || cfg.mlpBias)) {
    throw new ConfigError('qwen2 always has q/k/v biases and no o/mlp biases (qkvBias true, oBias and mlpBias false)');
  }
  if (cfg.modelType === 'mistral' && (cfg.qkvBias || cfg.oBias || cfg.mlpBias)) {
    throw new ConfigError('mistral has no linear biases');
  }
  Object.assign(out, {
    model_type: cfg.modelType,
    architectures: [...cfg.architectures],
    hidden_size: cfg.hiddenSize,
    intermediate_size: cfg.intermediateSize,
    num_hidden_layers: cfg.numLayers,
    num_attention_heads: cfg.numHeads,
    num_key_value_heads: cfg.numKvHeads,
    head_dim: cfg.headDim,
    hidden_act: 'silu',
    vocab_size: cfg.vocabSize,
    rms_norm_eps: cfg.rmsNormEps,
    rope_theta: cfg.ropeTheta,
    rope_scaling: ropeScalingToHf(cfg.ropeScaling),
    max_position_embeddings: cfg.maxPositionEmbeddings,
    tie_word_embeddings: cfg.tieWordEmbeddings,
    bos_token_id: cfg.bosTokenId,
    eos_token_id: cfg.eosTokenIds.length === 1 ? cfg.eosTokenIds[0] : cfg.eosTokenIds.length === 0 ? null : [...cfg.eosTokenIds],
    pad_token_id: cfg.padTokenId,
    torch_dtype: cfg.torchDtype,
  });
  if (cfg.modelType === 'llama') {
    out.attention_bias = cfg.qkvBias;
    out.mlp_bias = cfg.mlpBias;
  } else if (cfg.modelType === 'mistral') {
    out.sliding_window = cfg.slidingWindow;
  } else {
    out.use_sliding_window = cfg.slidingWindow !== null;
    out.sliding_window = cfg.slidingWindow;
  }
  if (cfg.quantization) out.quantization_config = cfg.quantization;
  else delete out.quantization_config;
  return out;
}

function ropeScalingToHf(s: RopeScaling): Record<string, unknown> | null {
  if (s.type === 'default') return null;
  // Both keys: "type" for transformers < 4.45 readers, "rope_type" for current ones.
  const o: Record<string, unknown> = { rope_type: s.type, type: s.type, factor: s.factor };
  if (s.lowFreqFactor !== undefined) o.low_freq_factor = s.lowFreqFactor;
  if (s.highFreqFactor !== undefined) o.high_freq_factor = s.highFreqFactor;
  if (s.originalMaxPositionEmbeddings !== undefined) o.original_max_position_embeddings = s.originalMaxPositionEmbeddings;
  if (s.betaFast !== undefined) o.beta_fast = s.betaFast;
  if (s.betaSlow !== undefined) o.beta_slow = s.betaSlow;
  if (s.attentionFactor !== undefined) o.attention_factor = s.attentionFactor;
  if (s.mscale !== undefined) o.mscale = s.mscale;
  if (s.mscaleAllDim !== undefined) o.mscale_all_dim = s.mscaleAllDim;
  if (s.truncate !== undefined) o.truncate = s.truncate;
  return o;
}

// ---------------------------------------------------------------------------------------------------------
// RoPE inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them (modeling_rope_utils.py,
// 5.x; identical to 4.4x for default/linear/dynamic/llama3). torch does this in float32 tensors with Python
// float scalars cast to float32, so every step below rounds to float32 with Math.fround (a single rounding
// of the exact double result equals the float32 operation for + - * /). The power is computed in float64
// and rounded once — a correctly rounded powf; torch's vectorised powf may differ from it by 1 ulp.

const f32 = Math.fround;

/** base ** (arange(0, dim, 2) / dim) in float32: [dim/2]. */
function posFreqs(base: number, dim: number): Float32Array {
  const out = new Float32Array(dim / 2);
  const b = f32(base);
  for (let i = 0; i < dim / 2; i++) out[i] = f32(Math.pow(b, f32((2 * i) / dim)));
  return out;
}

/**
 * inv_freq [headDim/2] for the config's rope type, and the cos/sin scale (`attention_scaling` in transformers:
 * 1 except for yarn). `seqLen` only matters for 'dynamic' (NTK): frequencies change once it exceeds
 * max_position_embeddings.
 */
export function ropeInvFreq(cfg: ModelConfig, seqLen?: number): { invFreq: Float32Array; mscale: number } {
  const dim = cfg.rotaryDim;
  const s = cfg.ropeScaling;
  const recip = (x: Float32Array) => x.map((v) => f32(1 / v));
  switch (s.type) {
    case 'default':
      return { invFreq: recip(posFreqs(cfg.ropeTheta, dim)), mscale: 1 };
    case 'linear': {
      const inv = recip(posFreqs(cfg.ropeTheta, dim));
      const fac = f32(s.factor);
      return { invFreq: inv.map((v) => f32(v / fac)), mscale: 1 };
    }
    case 'dynamic': {
      const maxPos = cfg.maxPositionEmbeddings;
      const sl = seqLen !== undefined && seqLen > maxPos ? seqLen : maxPos;
      // Python float math (double) for the new base, then the float32 tensor math.
      const base = cfg.ropeTheta * Math.pow((s.factor * sl) / maxPos - (s.factor - 1), dim / (dim - 2));
      return { invFreq: recip(posFreqs(base, dim)), mscale: 1 };
    }
    case 'llama3': {
      const inv = recip(posFreqs(cfg.ropeTheta, dim));
      const factor = f32(s.factor), low = s.lowFreqFactor!, high = s.highFreqFactor!, old = s.originalMaxPositionEmbeddings!;
      const lowWavelen = f32(old / low), highWavelen = f32(old / high); // compared against a float32 tensor
      const twoPi = f32(2 * Math.PI), oldF = f32(old), lowF = f32(low), span = f32(high - low);
      const out = new Float32Array(inv.length);
      for (let i = 0; i < inv.length; i++) {
        // `2 * math.pi / inv_freq` is Tensor.__rtruediv__ = reciprocal() * scalar in torch.
        const wavelen = f32(f32(1 / inv[i]) * twoPi);
        const llama = wavelen > lowWavelen ? f32(inv[i] / factor) : inv[i];
        if (wavelen < highWavelen || wavelen > lowWavelen) { out[i] = llama; continue; }
        const smooth = f32(f32(f32(f32(1 / wavelen) * oldF) - lowF) / span);
        out[i] = f32(f32(f32(f32(1 - smooth) * llama) / factor) + f32(smooth * llama));
      }
      return { invFreq: out, mscale: 1 };
    }
    case 'yarn': {
      const base = cfg.ropeTheta;
      const factor = s.factor;
      const orig = s.originalMaxPositionEmbeddings ?? cfg.maxPositionEmbeddings;
      const getMscale = (scale: number, m = 1) => (scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1);
      let attention = s.attentionFactor;
      if (attention === undefined) {
        attention = s.mscale && s.mscaleAllDim ? getMscale(factor, s.mscale) / getMscale(factor, s.mscaleAllDim) : getMscale(factor);
      }
      const betaFast = s.betaFast || 32, betaSlow = s.betaSlow || 1;
      const corrDim = (rot: number) => (dim * Math.log(orig / (rot * 2 * Math.PI))) / (2 * Math.log(base));
      let lo = corrDim(betaFast), hi = corrDim(betaSlow);
      if (s.truncate ?? true) { lo = Math.floor(lo); hi = Math.ceil(hi); }
      lo = Math.max(lo, 0);
      hi = Math.min(hi, dim - 1);
      if (lo === hi) hi += 0.001; // transformers: "prevent singularity"
      const pos = posFreqs(base, dim);
      const fac = f32(factor), loF = f32(lo), spanF = f32(hi - lo);
      const out = new Float32Array(dim / 2);
      for (let i = 0; i < dim / 2; i++) {
        const extrap = f32(1 / pos[i]);
        const interp = f32(1 / f32(fac * pos[i]));
        const ramp = Math.min(1, Math.max(0, f32(f32(i - loF) / spanF)));
        const extFactor = f32(1 - ramp);
        out[i] = f32(f32(interp * f32(1 - extFactor)) + f32(extrap * extFactor));
      }
      return { invFreq: out, mscale: attention };
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// generation_config.json

export interface GenerationConfig {
  eosTokenIds: number[];
  bosTokenId: number | null;
  padTokenId: number | null;
  maxNewTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  doSample?: boolean;
}

/**
 * Token ids and sampling defaults for generation: `generation_config.json` when present, its missing ids
 * taken from `config.json` (as transformers does when it builds a GenerationConfig from the model config).
 */
export function loadGenerationConfig(dir: string): GenerationConfig {
  const out: GenerationConfig = { eosTokenIds: [], bosTokenId: null, padTokenId: null };
  const cp = path.join(dir, 'config.json');
  if (fs.existsSync(cp)) {
    const c = readJsonFile(cp);
    if (isObj(c)) {
      const f = new Fields(c, cp);
      out.bosTokenId = f.tokenId('bos_token_id', null);
      out.eosTokenIds = f.tokenIds('eos_token_id', []);
      out.padTokenId = f.tokenId('pad_token_id', null);
    }
  }
  const gp = path.join(dir, 'generation_config.json');
  if (!fs.existsSync(gp)) return out;
  const g = readJsonFile(gp);
  if (!isObj(g)) throw new FormatError(`${gp}: must be a JSON object, found ${show(g)}`);
  const f = new Fields(g, gp);
  out.bosTokenId = f.tokenId('bos_token_id', out.bosTokenId);
  out.eosTokenIds = f.tokenIds('eos_token_id', out.eosTokenIds);
  out.padTokenId = f.tokenId('pad_token_id', out.padTokenId);
  if (f.has('max_new_tokens')) out.maxNewTokens = f.int('max_new_tokens');
  if (f.has('temperature')) out.temperature = f.num('temperature', undefined, { min: 0, inclusive: true });
  if (f.has('top_p')) {
    out.topP = f.num('top_p', undefined, { min: 0 });
    if (out.topP > 1) throw f.err('top_p', 'in (0, 1]', out.topP);
  }
  if (f.has('top_k')) out.topK = f.int('top_k', undefined, 0);
  if (f.has('do_sample')) out.doSample = f.bool('do_sample', false);
  return out;
}
