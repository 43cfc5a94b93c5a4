// Golden checks against the Python reference stack (torch 2.11, transformers 5.17, safetensors 0.8), whose
// outputs test/formats/reference/make_fixtures.py wrote into test/formats/reference/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SafetensorsFile, writeSafetensors } from '../../common/safetensors.ts';
import { f32ToBf16, f32ToF16 } from '../../common/halfprec.ts';
import { parseModelConfig, ropeInvFreq } from '../../core/model/config.ts';

const REF = path.join(path.dirname(fileURLToPath(import.meta.url)), 'reference');

test('writeSafetensors produces the same bytes as safetensors.torch.save_file', () => {
  const want = new Uint8Array(fs.readFileSync(path.join(REF, 'ref.safetensors')));
  const p = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-ref-')), 'ours.safetensors');
  writeSafetensors(p, [
    { name: 'b', dtype: 'F32', shape: [2, 3], data: Float32Array.from([0, 1, 2, 3, 4, 5]) },
    { name: 'a', dtype: 'BF16', shape: [4], data: f32ToBf16(Float32Array.from([0, 1, 2, 3])) },
    { name: 'c', dtype: 'I64', shape: [2], data: new Uint8Array(BigInt64Array.from([1n, -2n]).buffer) },
    { name: 'z.0', dtype: 'F16', shape: [3], data: f32ToF16(Float32Array.from([0.5, -1, 65504])) },
    { name: 'm', dtype: 'BOOL', shape: [2], data: Uint8Array.from([1, 0]) },
    { name: '10', dtype: 'I8', shape: [1], data: Uint8Array.from([7]) },
  ], { format: 'pt' });
  assert.deepEqual(new Uint8Array(fs.readFileSync(p)), want);

  const f = SafetensorsFile.open(path.join(REF, 'ref.safetensors'));
  assert.deepEqual(f.names(), ['c', 'b', 'a', 'z.0', '10', 'm']);
  assert.deepEqual([...f.readF32('z.0')], [0.5, -1, 65504]);
  assert.deepEqual([...f.readI32('c')], [1, -2]);
  assert.deepEqual([...f.readF32('a')], [0, 1, 2, 3]);
  assert.deepEqual({ ...f.metadata }, { format: 'pt' });
  f.close();
});

test('ropeInvFreq equals transformers 5.17 LlamaRotaryEmbedding bit for bit for every rope type', () => {
  const ref = JSON.parse(fs.readFileSync(path.join(REF, 'rope.json'), 'utf8')) as Record<string, [number[], number]>;
  const L = { model_type: 'llama', hidden_size: 4096, num_attention_heads: 32, num_key_value_heads: 8, intermediate_size: 64, num_hidden_layers: 1, vocab_size: 10 };
  const cases: [string, Record<string, unknown>, number?][] = [
    ['l2', { ...L, rope_theta: 1e4, max_position_embeddings: 4096 }],
    ['l31', { ...L, rope_theta: 5e5, max_position_embeddings: 131072, rope_scaling: { rope_type: 'llama3', factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 } }],
    ['lin', { ...L, rope_theta: 1e4, max_position_embeddings: 4096, rope_scaling: { type: 'linear', factor: 2.0 } }],
    ['dyn', { ...L, rope_theta: 1e4, max_position_embeddings: 4096, rope_scaling: { rope_type: 'dynamic', factor: 4.0 } }],
    ['dyn10000', { ...L, rope_theta: 1e4, max_position_embeddings: 4096, rope_scaling: { rope_type: 'dynamic', factor: 4.0 } }, 10000],
    ['yarn', { model_type: 'qwen2', hidden_size: 896, num_attention_heads: 14, num_key_value_heads: 2, intermediate_size: 64, num_hidden_layers: 1, vocab_size: 10, rope_theta: 1e6, max_position_embeddings: 32768, rope_scaling: { type: 'yarn', factor: 4.0, original_max_position_embeddings: 32768 } }],
  ];
  for (const [name, cfg, seqLen] of cases) {
    const [bits, scaling] = ref[name];
    const { invFreq, mscale } = ropeInvFreq(parseModelConfig(cfg, name), seqLen);
    const ours = Array.from(new Int32Array(invFreq.buffer));
    assert.deepEqual(ours, bits, name);
    assert.equal(mscale, scaling, `${name} attention scaling`);
  }
});
