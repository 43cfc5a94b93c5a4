// config.json edited without losing what Python wrote: floats stay floats (transformers reads 1000000.0 and
// 1000000 differently), and `merge` writes one consistent dtype key set.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JsonNumber, parseJsonText, stringifyJsonText, toJsonNumber } from '../../common/json-text.ts';
import { mergedConfigText } from '../../coordinator/merge.ts';
import { FormatError } from '../../common/errors.ts';

// As transformers 5 writes a Llama 3 config (json.dumps(indent=2, sort_keys=True)), after `quantize`.
const LLAMA3 = `{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "bos_token_id": 128000,
  "dtype": "float32",
  "eos_token_id": [
    128001,
    128009
  ],
  "hidden_size": 64,
  "max_position_embeddings": 131072,
  "model_type": "llama",
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "name": "\\u62d3 \\"x\\" \\\\ é",
  "empty": {},
  "none": [],
  "neg": -0.5e+3,
  "quantization_config": {
    "bnb_4bit_quant_type": "nf4",
    "llm_int8_threshold": 6.0
  }
}`;

test('parse + stringify keeps every number as written and equals JSON.parse in value', () => {
  const v = parseJsonText(LLAMA3);
  assert.deepEqual(JSON.parse(JSON.stringify(v)), JSON.parse(LLAMA3));
  const again = stringifyJsonText(v);
  assert.equal(again, LLAMA3.replace('"\\u62d3', '"拓'), 'same layout as JSON.stringify(…, 2); \\u escapes become the character');
  for (const lit of ['"factor": 8.0', '"rope_theta": 500000.0', '"rms_norm_eps": 1e-05', '"llm_int8_threshold": 6.0', '"neg": -0.5e+3', '"bos_token_id": 128000']) {
    assert.ok(again.includes(lit), lit);
  }
  assert.equal(toJsonNumber(8, true).text, '8.0');
  assert.equal(toJsonNumber(8, false).text, '8');
  assert.equal(toJsonNumber(1e-5, true).text, '0.00001');
  assert.ok((parseJsonText('[1.50]') as JsonNumber[])[0] instanceof JsonNumber);
});

test('malformed JSON is refused with the position, like JSON.parse', () => {
  for (const bad of ['{', '{"a" 1}', '[1,]', '{"a": 01}', '{"a": -}', '"x', '{} x', '{"a": tru}']) {
    assert.throws(() => parseJsonText(bad), SyntaxError, bad);
    assert.throws(() => JSON.parse(bad), SyntaxError, bad);
  }
  assert.throws(() => mergedConfigText('{"a": ', 'bfloat16', 'm/config.json'), (e: Error) => e instanceof FormatError && /m\/config\.json: not valid JSON/.test(e.message));
  assert.throws(() => mergedConfigText('[1]', 'bfloat16'), FormatError);
});

test('merge config.json: the merged dtype under dtype and torch_dtype, no quantization_config, floats kept as floats', () => {
  const out = mergedConfigText(LLAMA3, 'bfloat16');
  const cfg = JSON.parse(out) as Record<string, unknown>;
  assert.equal(cfg.dtype, 'bfloat16');
  assert.equal(cfg.torch_dtype, 'bfloat16');
  assert.equal(cfg.quantization_config, undefined);
  assert.ok(out.includes('"rope_theta": 500000.0'), out);
  assert.ok(out.includes('    "factor": 8.0,'), out);
  assert.ok(out.endsWith('}\n'));
  // Everything else is the source's, value for value.
  const src = JSON.parse(LLAMA3) as Record<string, unknown>;
  delete src.quantization_config;
  assert.deepEqual({ ...cfg, dtype: undefined, torch_dtype: undefined }, { ...src, dtype: undefined, torch_dtype: undefined });
  // A transformers 4.x config (torch_dtype only) gets the same two keys.
  const v4 = JSON.parse(mergedConfigText('{"torch_dtype": "float16", "rope_theta": 10000.0}', 'float32'));
  assert.deepEqual(v4, { torch_dtype: 'float32', rope_theta: 10000, dtype: 'float32' });
});
