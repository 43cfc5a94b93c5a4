// HF config.json parsing for Llama / Mistral / Qwen2, RoPE inverse frequencies against independent float64
// formulas, round trips through modelConfigToHfJson, bad configs, and a fuzz of every field.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  loadGenerationConfig, loadModelConfig, modelConfigToHfJson, parseModelConfig, ropeInvFreq, type ModelConfig,
} from '../../core/model/config.ts';
import { ConfigError, FormatError, UnsupportedError } from '../../common/errors.ts';
import { CounterRng } from '../../common/rng.ts';

// Typed from the published config.json files of these checkpoints.
const LLAMA2_7B = {
  architectures: ['LlamaForCausalLM'], bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', hidden_size: 4096,
  initializer_range: 0.02, intermediate_size: 11008, max_position_embeddings: 4096, model_type: 'llama',
  num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 32, pretraining_tp: 1, rms_norm_eps: 1e-5,
  rope_scaling: null, tie_word_embeddings: false, torch_dtype: 'float16', transformers_version: '4.31.0.dev0',
  use_cache: true, vocab_size: 32000,
};
const LLAMA31_8B = {
  architectures: ['LlamaForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009], hidden_act: 'silu', hidden_size: 4096, initializer_range: 0.02,
  intermediate_size: 14336, max_position_embeddings: 131072, mlp_bias: false, model_type: 'llama',
  num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, pretraining_tp: 1, rms_norm_eps: 1e-5,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.43.0.dev0',
  use_cache: true, vocab_size: 128256,
};
const MISTRAL_7B = {
  architectures: ['MistralForCausalLM'], bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', hidden_size: 4096,
  initializer_range: 0.02, intermediate_size: 14336, max_position_embeddings: 32768, model_type: 'mistral',
  num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5, rope_theta: 10000.0,
  sliding_window: 4096, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.34.0.dev0',
  use_cache: true, vocab_size: 32000,
};
const QWEN25_05B = {
  architectures: ['Qwen2ForCausalLM'], attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151643,
  hidden_act: 'silu', hidden_size: 896, initializer_range: 0.02, intermediate_size: 4864, max_position_embeddings: 32768,
  max_window_layers: 24, model_type: 'qwen2', num_attention_heads: 14, num_hidden_layers: 24, num_key_value_heads: 2,
  rms_norm_eps: 1e-6, rope_theta: 1000000.0, sliding_window: 32768, tie_word_embeddings: true, torch_dtype: 'bfloat16',
  transformers_version: '4.40.1', use_cache: true, use_mrope: false, use_sliding_window: false, vocab_size: 151936,
};

function withField(base: object, key: string, value: unknown): Record<string, unknown> {
  return { ...structuredClone(base), [key]: value };
}

function assertRel(got: Float32Array, want: number[], tol: number, what: string): void {
  assert.equal(got.length, want.length, what);
  for (let i = 0; i < want.length; i++) {
    const rel = Math.abs(got[i] - want[i]) / Math.abs(want[i]);
    assert.ok(rel <= tol, `${what}[${i}]: got ${got[i]}, want ${want[i]} (rel ${rel.toExponential(2)})`);
  }
}

/** Plain float64 RoPE: 1 / θ^(2i/d). */
function ref64Default(theta: number, d: number): number[] {
  return Array.from({ length: d / 2 }, (_, i) => 1 / theta ** ((2 * i) / d));
}

test('Llama-2-7B: MHA, default rope, fp16, ids', () => {
  const c = parseModelConfig(LLAMA2_7B, 'llama2/config.json');
  assert.equal(c.modelType, 'llama');
  assert.deepEqual([c.hiddenSize, c.intermediateSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim, c.vocabSize], [4096, 11008, 32, 32, 32, 128, 32000]);
  assert.equal(c.rmsNormEps, 1e-5);
  assert.equal(c.ropeTheta, 10000);
  assert.deepEqual(c.ropeScaling, { type: 'default', factor: 1 });
  assert.equal(c.torchDtype, 'float16');
  assert.deepEqual([c.bosTokenId, c.eosTokenIds, c.padTokenId], [1, [2], null]);
  assert.deepEqual([c.qkvBias, c.oBias, c.mlpBias, c.tieWordEmbeddings, c.slidingWindow, c.quantization], [false, false, false, false, null, null]);
  const { invFreq, mscale } = ropeInvFreq(c);
  assert.equal(mscale, 1);
  assertRel(invFreq, ref64Default(10000, 128), 1e-6, 'llama2 inv_freq');
  assert.equal(invFreq[0], 1);
});

test('Llama-3.1-8B: GQA 32/8, eos list, llama3 rope scaling matches the float64 formula', () => {
  const c = parseModelConfig(LLAMA31_8B, 'llama31/config.json');
  assert.deepEqual([c.numHeads, c.numKvHeads, c.headDim, c.vocabSize], [32, 8, 128, 128256]);
  assert.deepEqual(c.eosTokenIds, [128001, 128008, 128009]);
  assert.equal(c.torchDtype, 'bfloat16');
  assert.deepEqual(c.ropeScaling, { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
  // Independent float64: wavelength bands from Meta's reference `apply_scaling`.
  const want = ref64Default(500000, 128).map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < 8192 / 4) return f;
    if (wavelen > 8192 / 1) return f / 8;
    const smooth = (8192 / wavelen - 1) / (4 - 1);
    return (1 - smooth) * (f / 8) + smooth * f;
  });
  const { invFreq, mscale } = ropeInvFreq(c);
  assert.equal(mscale, 1);
  assertRel(invFreq, want, 1e-6, 'llama3 inv_freq');
  // The three bands are all present for these numbers: unscaled, smoothed, divided by 8.
  const ratio = Array.from(invFreq, (v, i) => v / ref64Default(500000, 128)[i]);
  assert.ok(Math.abs(ratio[0] - 1) < 1e-6 && Math.abs(ratio[63] - 1 / 8) < 1e-6);
  assert.ok(ratio.some((r) => r > 0.2 && r < 0.9));
});

test('Mistral-7B: sliding window, GQA', () => {
  const c = parseModelConfig(MISTRAL_7B, 'mistral/config.json');
  assert.equal(c.modelType, 'mistral');
  assert.equal(c.slidingWindow, 4096);
  assert.deepEqual([c.numKvHeads, c.headDim, c.maxPositionEmbeddings], [8, 128, 32768]);
  assert.equal(parseModelConfig(withField(MISTRAL_7B, 'sliding_window', null), 'm').slidingWindow, null);
  assertRel(ropeInvFreq(c).invFreq, ref64Default(10000, 128), 1e-6, 'mistral inv_freq');
});

test('Qwen2.5-0.5B: tied embeddings, q/k/v bias without a config field, head_dim 64, theta 1e6', () => {
  const c = parseModelConfig(QWEN25_05B, 'qwen/config.json');
  assert.equal(c.modelType, 'qwen2');
  assert.deepEqual([c.qkvBias, c.oBias, c.mlpBias], [true, false, false]);
  assert.equal(c.tieWordEmbeddings, true);
  assert.deepEqual([c.hiddenSize, c.numHeads, c.numKvHeads, c.headDim], [896, 14, 2, 64]);
  assert.equal(c.slidingWindow, null, 'use_sliding_window false → full attention');
  assert.deepEqual([c.bosTokenId, c.eosTokenIds], [151643, [151643]]);
  assertRel(ropeInvFreq(c).invFreq, ref64Default(1e6, 64), 1e-6, 'qwen inv_freq');
  assert.equal(parseModelConfig(withField(QWEN25_05B, 'use_sliding_window', true), 'q').slidingWindow, 32768);
});

test('linear, dynamic NTK and yarn rope scaling match float64 formulas', () => {
  const lin = parseModelConfig(withField(LLAMA2_7B, 'rope_scaling', { type: 'linear', factor: 2.0 }), 'lin');
  assertRel(ropeInvFreq(lin).invFreq, ref64Default(10000, 128).map((f) => f / 2), 1e-6, 'linear');

  const dyn = parseModelConfig(withField(LLAMA2_7B, 'rope_scaling', { rope_type: 'dynamic', factor: 4.0 }), 'dyn');
  assertRel(ropeInvFreq(dyn).invFreq, ref64Default(10000, 128), 1e-6, 'dynamic within the trained length');
  assertRel(ropeInvFreq(dyn, 4096).invFreq, ref64Default(10000, 128), 1e-6, 'dynamic at the trained length');
  const base = 10000 * ((4 * 10000) / 4096 - 3) ** (128 / 126);
  assertRel(ropeInvFreq(dyn, 10000).invFreq, ref64Default(base, 128), 1e-6, 'dynamic beyond the trained length');

  // Qwen2.5's documented YaRN setting.
  const yarnCfg = parseModelConfig(withField(QWEN25_05B, 'rope_scaling', { type: 'yarn', factor: 4.0, original_max_position_embeddings: 32768 }), 'yarn');
  const d = 64, theta = 1e6, orig = 32768, factor = 4;
  const corr = (rot: number) => (d * Math.log(orig / (rot * 2 * Math.PI))) / (2 * Math.log(theta));
  const lo = Math.max(Math.floor(corr(32)), 0), hi = Math.min(Math.ceil(corr(1)), d - 1);
  const want = ref64Default(theta, d).map((f, i) => {
    const r = Math.min(1, Math.max(0, (i - lo) / (hi - lo))); // 0 → keep (extrapolate), 1 → divide by factor
    return (f / factor) * r + f * (1 - r);
  });
  const y = ropeInvFreq(yarnCfg);
  assertRel(y.invFreq, want, 1e-6, 'yarn');
  assert.ok(Math.abs(y.mscale - (0.1 * Math.log(4) + 1)) < 1e-12);
  const yAtt = parseModelConfig(withField(QWEN25_05B, 'rope_scaling', { rope_type: 'yarn', factor: 4.0, attention_factor: 1.5 }), 'y2');
  assert.equal(ropeInvFreq(yAtt).mscale, 1.5);
  const yDs = parseModelConfig(withField(QWEN25_05B, 'rope_scaling', { rope_type: 'yarn', factor: 40, mscale: 1.0, mscale_all_dim: 0.707 }), 'y3');
  assert.ok(Math.abs(ropeInvFreq(yDs).mscale - (0.1 * Math.log(40) + 1) / (0.1 * 0.707 * Math.log(40) + 1)) < 1e-12);
});

test('transformers 5.x rope_parameters and dtype are read like 4.x rope_theta/rope_scaling and torch_dtype', () => {
  const v5: Record<string, unknown> = structuredClone(LLAMA31_8B);
  delete v5.rope_theta;
  delete v5.rope_scaling;
  delete v5.torch_dtype;
  v5.rope_parameters = { rope_theta: 500000.0, rope_type: 'llama3', factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
  v5.dtype = 'bfloat16';
  const a = parseModelConfig(v5, 'v5');
  const b = parseModelConfig(LLAMA31_8B, 'v4');
  assert.deepEqual({ ...a, raw: null }, { ...b, raw: null });
  const plain = withField(LLAMA2_7B, 'rope_parameters', { rope_theta: 10000.0, rope_type: 'default' });
  assert.deepEqual(parseModelConfig(plain, 'p').ropeScaling, { type: 'default', factor: 1 });
});

test('modelConfigToHfJson round-trips every example and keeps unknown fields', () => {
  for (const [name, src] of Object.entries({ LLAMA2_7B, LLAMA31_8B, MISTRAL_7B, QWEN25_05B })) {
    const c = parseModelConfig(src, name);
    const out = modelConfigToHfJson(c);
    const again = parseModelConfig(JSON.parse(JSON.stringify(out)), name);
    assert.deepEqual({ ...again, raw: null }, { ...c, raw: null }, name);
    assert.equal(out.model_type, src.model_type);
    assert.equal(out.initializer_range, 0.02, 'unknown fields are kept');
    assert.equal(out.rope_theta, c.ropeTheta);
  }
  const l3 = modelConfigToHfJson(parseModelConfig(LLAMA31_8B, 'x'));
  assert.deepEqual(l3.rope_scaling, { rope_type: 'llama3', type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 });
  assert.deepEqual(l3.eos_token_id, [128001, 128008, 128009]);
  assert.equal(modelConfigToHfJson(parseModelConfig(LLAMA2_7B, 'x')).eos_token_id, 2);
  const q = modelConfigToHfJson(parseModelConfig(QWEN25_05B, 'q'));
  assert.equal(q.use_sliding_window, false);
  assert.equal('attention_bias' in q, false, 'qwen2 has no attention_bias field');
  const bad: ModelConfig = { ...parseModelConfig(LLAMA2_7B, 'x'), qkvBias: true, oBias: false };
  assert.throws(() => modelConfigToHfJson(bad), ConfigError);
});

test('bad configs: errors name the field and the file', () => {
  const cases: [object, RegExp, new (...a: never[]) => Error][] = [
    [withField(LLAMA2_7B, 'model_type', 'falcon'), /model_type "falcon" is not supported[\s\S]*llama, mistral, qwen2, chatglm/, UnsupportedError],
    [withField(LLAMA2_7B, 'model_type', 'chatglm'), /"ffn_hidden_size" is missing/, FormatError],
    [withField(LLAMA2_7B, 'model_type', 'gpt2'), /"gpt2"/, UnsupportedError],
    [withField(LLAMA2_7B, 'model_type', 3), /"model_type" must be a string/, FormatError],
    [withField(LLAMA2_7B, 'hidden_size', 0), /"hidden_size" must be a positive integer/, FormatError],
    [withField(LLAMA2_7B, 'hidden_size', 4096.5), /"hidden_size"/, FormatError],
    [withField(LLAMA2_7B, 'hidden_size', 4100), /"hidden_size" \(4100\) must be a multiple of "num_attention_heads"/, FormatError],
    [withField(LLAMA2_7B, 'num_key_value_heads', 5), /"num_attention_heads" \(32\) must be a multiple of "num_key_value_heads" \(5\)/, FormatError],
    [withField(LLAMA2_7B, 'num_hidden_layers', -2), /"num_hidden_layers"/, FormatError],
    [withField(LLAMA2_7B, 'vocab_size', '32000'), /"vocab_size"/, FormatError],
    [withField(LLAMA2_7B, 'rms_norm_eps', 0), /"rms_norm_eps"/, FormatError],
    [withField(LLAMA2_7B, 'rope_theta', -1), /"rope_theta"/, FormatError],
    [withField(LLAMA2_7B, 'head_dim', 127), /"head_dim" \(127\) must be even/, FormatError],
    [withField(LLAMA2_7B, 'eos_token_id', [2, 'x']), /"eos_token_id"/, FormatError],
    [withField(LLAMA2_7B, 'bos_token_id', -1), /"bos_token_id"/, FormatError],
    [withField(LLAMA2_7B, 'tie_word_embeddings', 'yes'), /"tie_word_embeddings" must be true or false/, FormatError],
    [withField(LLAMA2_7B, 'attention_bias', 1), /"attention_bias"/, FormatError],
    [withField(LLAMA2_7B, 'hidden_act', 'gelu'), /"hidden_act"/, UnsupportedError],
    [withField(LLAMA2_7B, 'torch_dtype', 'float8_e4m3fn'), /"torch_dtype"/, UnsupportedError],
    [withField(LLAMA2_7B, 'rope_scaling', { type: 'longrope', factor: 2 }), /rope_scaling type "longrope" is not supported/, UnsupportedError],
    [withField(LLAMA2_7B, 'rope_scaling', { type: 'linear' }), /"rope_scaling.factor" is missing/, FormatError],
    [withField(LLAMA2_7B, 'rope_scaling', { rope_type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 8192 }), /"rope_scaling.high_freq_factor"/, FormatError],
    [withField(LLAMA2_7B, 'rope_scaling', 'linear'), /"rope_scaling" must be an object/, FormatError],
    [withField(LLAMA2_7B, 'quantization_config', 'nf4'), /"quantization_config"/, FormatError],
    [withField(LLAMA2_7B, 'architectures', 'LlamaForCausalLM'), /"architectures"/, FormatError],
    [withField(LLAMA2_7B, 'partial_rotary_factor', 0.5), /"partial_rotary_factor"/, UnsupportedError],
    [[1, 2], /must be a JSON object/, FormatError],
  ];
  for (const [cfg, re, cls] of cases) {
    assert.throws(() => parseModelConfig(cfg, '/models/x/config.json'), (e: unknown) => e instanceof cls && re.test((e as Error).message) && (e as Error).message.includes('/models/x/config.json'), String(re));
  }
  const missing: Record<string, unknown> = structuredClone(LLAMA2_7B);
  delete missing.intermediate_size;
  assert.throws(() => parseModelConfig(missing, 'c.json'), /required field "intermediate_size" is missing/);
  // Defaults: GQA kv heads default to heads, head_dim to hidden/heads, eps/theta/max_pos to the class defaults.
  const minimal = { model_type: 'llama', hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, vocab_size: 100 };
  const m = parseModelConfig(minimal, 'min');
  assert.deepEqual([m.numKvHeads, m.headDim, m.rmsNormEps, m.ropeTheta, m.maxPositionEmbeddings, m.bosTokenId, m.eosTokenIds, m.torchDtype],
    [4, 16, 1e-6, 10000, 2048, 1, [2], 'float32']);
  assert.deepEqual(m.architectures, ['LlamaForCausalLM']);
  assert.deepEqual(parseModelConfig(withField(minimal, 'quantization_config', { quant_method: 'bitsandbytes', load_in_4bit: true }), 'q').quantization, { quant_method: 'bitsandbytes', load_in_4bit: true });
});

test('loadModelConfig and loadGenerationConfig read a model directory', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-cfg-'));
  assert.throws(() => loadModelConfig(dir), /no config.json/);
  fs.writeFileSync(path.join(dir, 'config.json'), '{"model_type": "llama", ');
  assert.throws(() => loadModelConfig(dir), (e: unknown) => e instanceof FormatError && /config.json: invalid JSON/.test(e.message));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(LLAMA31_8B));
  assert.equal(loadModelConfig(dir).numKvHeads, 8);
  // Without generation_config.json the ids come from config.json.
  assert.deepEqual(loadGenerationConfig(dir), { eosTokenIds: [128001, 128008, 128009], bosTokenId: 128000, padTokenId: null });
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({
    bos_token_id: 128000, do_sample: true, eos_token_id: [128001, 128009], temperature: 0.6, top_p: 0.9, transformers_version: '4.43.0.dev0',
  }));
  assert.deepEqual(loadGenerationConfig(dir), { eosTokenIds: [128001, 128009], bosTokenId: 128000, padTokenId: null, temperature: 0.6, topP: 0.9, doSample: true });
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ top_k: 20, max_new_tokens: 512, pad_token_id: 0, eos_token_id: 7 }));
  assert.deepEqual(loadGenerationConfig(dir), { eosTokenIds: [7], bosTokenId: 128000, padTokenId: 0, topK: 20, maxNewTokens: 512 });
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ top_p: 1.5 }));
  assert.throws(() => loadGenerationConfig(dir), /"top_p"/);
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ temperature: 'hot' }));
  assert.throws(() => loadGenerationConfig(dir), (e: unknown) => e instanceof FormatError && /generation_config.json: field "temperature"/.test(e.message));
});

test('fuzz: random JSON values in every field give a valid config or a named error', () => {
  const rng = new CounterRng(31337, 3);
  const pick = <T>(xs: readonly T[]): T => xs[rng.int(xs.length)];
  const randomValue = (depth = 0): unknown => {
    switch (rng.int(12)) {
      case 0: return null;
      case 1: return rng.int(2) === 0;
      case 2: return rng.int(200) - 50;
      case 3: return (rng.next() - 0.5) * 10 ** (rng.int(40) - 20);
      case 4: return pick(['', 'llama', 'qwen2', 'mistral', 'silu', 'linear', 'llama3', 'yarn', 'dynamic', 'bfloat16', 'x'.repeat(200), '__proto__']);
      case 5: return depth > 2 ? 1 : Array.from({ length: rng.int(4) }, () => randomValue(depth + 1));
      case 6: return depth > 2 ? {} : Object.fromEntries(Array.from({ length: rng.int(4) }, () => [pick(['type', 'rope_type', 'factor', 'rope_theta', 'a']), randomValue(depth + 1)]));
      case 7: return pick([2 ** 53, -0, 1e308, 4096, 8, 32, 1e-5]);
      case 8: return pick([Number.MAX_SAFE_INTEGER, 7, 3, 128]);
      default: return rng.int(64) + 1;
    }
  };
  const bases = [LLAMA2_7B, LLAMA31_8B, MISTRAL_7B, QWEN25_05B];
  const ropeKeys = ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings', 'rope_type', 'type', 'beta_fast', 'attention_factor', 'mscale', 'truncate'];
  let ok = 0;
  for (let it = 0; it < 3000; it++) {
    const cfg: Record<string, unknown> = structuredClone(pick(bases));
    const keys = [...Object.keys(cfg), 'head_dim', 'rope_parameters', 'dtype', 'quantization_config', 'use_sliding_window', 'attention_bias'];
    for (let k = 1 + rng.int(3); k > 0; k--) {
      if (rng.int(4) === 0) {
        const rs = (cfg.rope_scaling && typeof cfg.rope_scaling === 'object' ? cfg.rope_scaling : { rope_type: pick(['yarn', 'llama3', 'linear', 'dynamic']) }) as Record<string, unknown>;
        rs[pick(ropeKeys)] = randomValue();
        cfg.rope_scaling = rs;
      } else {
        cfg[pick(keys)] = randomValue();
      }
    }
    let c: ModelConfig;
    try {
      c = parseModelConfig(rng.int(200) === 0 ? randomValue() : cfg, 'fuzz/config.json');
    } catch (e) {
      assert.ok(e instanceof ConfigError || e instanceof FormatError || e instanceof UnsupportedError, `unexpected ${(e as Error)?.stack}`);
      continue;
    }
    ok++;
    // A config that parses is internally consistent and usable.
    for (const v of [c.hiddenSize, c.intermediateSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim, c.vocabSize, c.maxPositionEmbeddings]) {
      assert.ok(Number.isSafeInteger(v) && v > 0);
    }
    assert.equal(c.numHeads % c.numKvHeads, 0);
    assert.equal(c.headDim % 2, 0);
    assert.ok(c.rmsNormEps > 0 && c.ropeTheta > 0 && c.ropeScaling.factor > 0);
    if (c.headDim <= 4096) {
      const r = ropeInvFreq(c, 1 + rng.int(200000));
      assert.equal(r.invFreq.length, c.headDim / 2);
      assert.ok(!r.invFreq.some(Number.isNaN) && !Number.isNaN(r.mscale));
    }
    const back = parseModelConfig(JSON.parse(JSON.stringify(modelConfigToHfJson(c))), 'back');
    assert.deepEqual({ ...back, raw: null }, { ...c, raw: null });
  }
  assert.ok(ok > 300, `parsed ${ok}`);
});
