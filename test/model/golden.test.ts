// Golden test: our QLoRA Llama stage against Hugging Face transformers 5.17 + PEFT 0.21 on the same checkpoints
// (fixtures written by test/reference/make_golden.py, see test/reference/README.md). fp32 on the cpu backend:
// loss within 1e-5 relative, every LoRA gradient within 1e-4 (relative to the tensor's largest value), NF4 codes
// bit for bit, greedy generations token for token.
import { goldenBatch } from '../helpers/golden.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, LINEAR_MODULES } from '../../core/model/llama.ts';
import { loadModelConfig, ropeInvFreq } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter } from '../../core/model/adapter.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { quantizeNf4, dequantizeNf4 } from '../../core/engine/nf4.ts';
import { generateTokens } from '../../core/model/generate.ts';
import { withoutLora } from '../../coordinator/answer.ts';
import type { StageBatch } from '../../core/model/llama.ts';

const ROOT = join(import.meta.dirname, '..', 'fixtures', 'golden');
const CASES = ['llama-gqa', 'qwen2-tied', 'llama3-rope'];

interface Expected {
  loss: number; num_targets: number;
  batch: { input_ids: number[][]; attention_mask: number[][]; labels: number[][]; pad_token_id: number };
  generate: { prompt: number[]; max_new_tokens: number; base: number[]; adapted: number[] };
  nf4: { modules: string[]; dequant_sha256: Record<string, string> };
  diagnostics: { rope_inv_freq: number[] };
}

const batchOf = (e: Expected): StageBatch => goldenBatch(e.batch);

for (const name of CASES) {
  const dir = join(ROOT, name);
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;

  test(`golden ${name}: NF4 codes and dequantized weights equal the independent numpy emulation bit for bit`, () => {
    const w = ModelWeights.open(join(dir, 'model'));
    const ref = SafetensorsFile.open(join(dir, 'nf4.safetensors'));
    try {
      for (const mod of expected.nf4.modules) {
        const info = w.info(`${mod}.weight`);
        const q = quantizeNf4(w.readF32(`${mod}.weight`), [info.shape[0], info.shape[1]], { blocksize: 64, doubleQuant: true });
        assert.deepEqual(Buffer.from(q.packed), Buffer.from(ref.readRaw(`${mod}.packed`)), `${mod} packed codes`);
        assert.deepEqual(Buffer.from(q.absmax as Uint8Array), Buffer.from(ref.readRaw(`${mod}.absmax`)), `${mod} absmax codes`);
        assert.deepEqual(Array.from(q.nested!.absmax), Array.from(ref.readF32(`${mod}.nested_absmax`)), `${mod} nested absmax`);
        assert.equal(Math.fround(q.nested!.offset), ref.readF32(`${mod}.offset`)[0], `${mod} offset`);
        const deq = dequantizeNf4(q);
        const sha = createHash('sha256').update(new Uint8Array(deq.buffer, deq.byteOffset, deq.byteLength)).digest('hex');
        assert.equal(sha, expected.nf4.dequant_sha256[mod], `${mod} dequantized weights`);
      }
    } finally { w.close(); ref.close(); }
  });

  test(`golden ${name}: rope inv_freq matches transformers`, () => {
    const cfg = loadModelConfig(join(dir, 'model'));
    const { invFreq } = ropeInvFreq(cfg);
    const want = expected.diagnostics.rope_inv_freq;
    assert.equal(invFreq.length, want.length);
    for (let i = 0; i < want.length; i++) assert.ok(Math.abs(invFreq[i] - want[i]) <= 1e-7 * Math.abs(want[i]), `inv_freq[${i}] ${invFreq[i]} vs ${want[i]}`);
  });

  test(`golden ${name}: loss and every LoRA gradient match transformers + PEFT (fp32)`, () => {
    const be = createCpuBackend();
    const stage = loadStage(be, join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))), { gradientCheckpointing: true });
    const adapter = loadAdapter(join(dir, 'adapter'));
    assert.equal(applyAdapter(be, stage, adapter, name), adapter.modules.length);
    const batch = batchOf(expected);
    const count = expected.num_targets;
    const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / count });
    assert.equal(r.count, count);
    const loss = r.lossSum! / r.count!;
    assert.ok(Math.abs(loss - expected.loss) <= 1e-5 * expected.loss, `loss ${loss} vs transformers ${expected.loss}`);
    stage.backward(0);
    const grads = SafetensorsFile.open(join(dir, 'grads.safetensors'));
    try {
      let checked = 0;
      for (const p of stage.loraParams()) {
        for (const [which, t] of [['A', p.dA], ['B', p.dB]] as const) {
          const key = `base_model.model.${p.name}.lora_${which}.weight`;
          const want = grads.readF32(key), got = be.download(t) as Float32Array;
          assert.equal(got.length, want.length, key);
          let maxAbs = 0, maxErr = 0;
          for (let i = 0; i < want.length; i++) { maxAbs = Math.max(maxAbs, Math.abs(want[i])); maxErr = Math.max(maxErr, Math.abs(got[i] - want[i])); }
          assert.ok(maxErr <= 1e-4 * maxAbs + 1e-9, `${key}: max error ${maxErr.toExponential(3)} vs max |grad| ${maxAbs.toExponential(3)}`);
          checked++;
        }
      }
      assert.equal(checked, adapter.modules.length * 2);
    } finally { grads.close(); }
    // The same step with gradient checkpointing off gives the same gradients.
  });

  test(`golden ${name}: logits of sequence 0 and greedy generations (base and adapted) match`, () => {
    const be = createCpuBackend();
    const stage = loadStage(be, join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))));
    applyAdapter(be, stage, loadAdapter(join(dir, 'adapter')), name);
    const batch = batchOf(expected);
    const T = batch.T;
    const logits = stage.logitsAt(batch, undefined, Array.from({ length: T }, (_, t) => t));
    const grads = SafetensorsFile.open(join(dir, 'grads.safetensors'));
    const want = grads.readF32('logits0'); grads.close();
    const V = want.length / T;
    let maxErr = 0;
    for (let t = 0; t < T; t++) for (let v = 0; v < V; v++) maxErr = Math.max(maxErr, Math.abs(logits[t][v] - want[t * V + v]));
    assert.ok(maxErr < 1e-4, `logits max error ${maxErr}`);
    const g = expected.generate;
    const opts = { maxNewTokens: g.max_new_tokens, eosIds: [], padId: 0 };
    for (const cache of [true, false]) {
      const adapted = generateTokens([stage], [g.prompt], { ...opts, cache })[0];
      const base = withoutLora([stage], () => generateTokens([stage], [g.prompt], { ...opts, cache })[0]);
      assert.deepEqual(base, g.base, `base model greedy tokens (KV cache ${cache})`);
      assert.deepEqual(adapted, g.adapted, `adapted model greedy tokens (KV cache ${cache})`);
    }
    void LINEAR_MODULES;
  });
}
