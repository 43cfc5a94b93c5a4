// Golden test for ChatGLM2, the seed model's architecture: our stage (packed modules split into engine linears,
// interleaved RoPE permuted to rotate_half, LoRA on packed modules as one LoRA) against an independent PyTorch
// implementation (test/reference/chatglm2_reference.py) on NF4-exact weights: loss within 1e-5 relative, every
// LoRA gradient within 1e-4 of its largest value, logits within 1e-4; and the adapter written back by us equals
// the PEFT-format adapter we read (row order of the packed B restored).
import { goldenBatch } from '../helpers/golden.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig, ropeInvFreq } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter, saveAdapter, stageLoraTensors } from '../../core/model/adapter.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';
import { planStages } from '../../core/train/plan.ts';
import { permuteRows } from '../../core/engine/lora.ts';
import type { StageBatch } from '../../core/model/llama.ts';

const ROOT = join(import.meta.dirname, '..', 'fixtures', 'golden-chatglm');

interface Expected { loss: number; num_targets: number; batch: { input_ids: number[][]; attention_mask: number[][]; labels: number[][] } }

const batchOf = (e: Expected): StageBatch => goldenBatch(e.batch);

test('chatglm config: MQA groups, head dim from kv_channels, RoPE on half the head (interleaved), padded vocab', () => {
  const cfg = loadModelConfig(join(ROOT, 'chatglm-qkv', 'model'));
  assert.equal(cfg.modelType, 'chatglm');
  assert.deepEqual([cfg.numHeads, cfg.numKvHeads, cfg.headDim, cfg.rotaryDim, cfg.vocabSize, cfg.intermediateSize], [4, 2, 16, 8, 128, 96]);
  assert.equal(cfg.ropeInterleaved, true);
  assert.equal(cfg.qkvBias, true);
  // inv_freq over the rotary dims: 1 / 10000^(2i/8)
  assert.deepEqual(Array.from(ropeInvFreq(cfg).invFreq), [1, 0.10000000149011612, 0.009999999776482582, 0.0010000000474974513]);
});

for (const name of ['chatglm-qkv', 'chatglm-all']) {
  const dir = join(ROOT, name);
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;

  for (const stages of [1, 2]) {
    test(`golden ${name} (${stages} stage${stages > 1 ? 's' : ''}): loss, logits and every LoRA gradient match the PyTorch reference`, () => {
      const be = createCpuBackend();
      const cfg = loadModelConfig(join(dir, 'model'));
      const st = planStages(cfg, stages).specs.map((spec) => loadStage(be, join(dir, 'model'), spec, { doubleQuant: false }));
      const adapter = loadAdapter(join(dir, 'adapter'));
      const applied = st.reduce((a, s) => a + applyAdapter(be, s, adapter, name), 0);
      assert.equal(applied, adapter.modules.length);
      const batch = batchOf(expected);
      let hidden, lossSum = 0, count = 0;
      for (const s of st) { const r = s.forward(0, batch, hidden, { train: true, gradScale: 1 / expected.num_targets }); hidden = r.hidden; if (r.lossSum !== undefined) { lossSum = r.lossSum; count = r.count!; } }
      assert.equal(count, expected.num_targets);
      const loss = lossSum / count;
      assert.ok(Math.abs(loss - expected.loss) <= 1e-5 * expected.loss, `loss ${loss} vs reference ${expected.loss}`);
      let d;
      for (let i = st.length - 1; i >= 0; i--) d = st[i].backward(0, d);
      const grads = SafetensorsFile.open(join(dir, 'grads.safetensors'));
      try {
        let checked = 0;
        for (const s of st) for (const p of s.loraParams()) {
          const h = { A: be.download(p.dA) as Float32Array, B: be.download(p.dB) as Float32Array };
          // gradients live in the internal row order, like the weights: convert B's like the weights
          const ext = { A: h.A, B: permuteRows(h.B, p.r, p.rowPerm, 'toExternal') };
          for (const which of ['A', 'B'] as const) {
            const key = `base_model.model.${p.name}.lora_${which}.weight`;
            const want = grads.readF32(key), got = ext[which];
            let maxAbs = 0, maxErr = 0;
            for (let i = 0; i < want.length; i++) { maxAbs = Math.max(maxAbs, Math.abs(want[i])); maxErr = Math.max(maxErr, Math.abs(got[i] - want[i])); }
            assert.ok(maxErr <= 1e-4 * maxAbs + 1e-9, `${key}: max error ${maxErr.toExponential(3)} vs max |grad| ${maxAbs.toExponential(3)}`);
            checked++;
          }
        }
        assert.equal(checked, adapter.modules.length * 2);
        if (stages === 1) {
          const logits = st[0].logitsAt(batch, undefined, Array.from({ length: batch.T }, (_, t) => t));
          const want = grads.readF32('logits0'), V = want.length / batch.T;
          let maxErr = 0;
          for (let t = 0; t < batch.T; t++) for (let v = 0; v < V; v++) maxErr = Math.max(maxErr, Math.abs(logits[t][v] - want[t * V + v]));
          assert.ok(maxErr < 1e-4, `logits max error ${maxErr}`);
        }
      } finally { grads.close(); }
    });
  }

  test(`golden ${name}: the adapter read in and written out again is byte-identical in its tensors (packed B row order restored)`, () => {
    const be = createCpuBackend();
    const stage = loadStage(be, join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))), { doubleQuant: false });
    const adapter = loadAdapter(join(dir, 'adapter'));
    applyAdapter(be, stage, adapter, name);
    const out = join(mkdtempSync(join(tmpdir(), 'dqlora-glm-')), 'adapter');
    saveAdapter(out, stageLoraTensors(be, stage), adapter.config, null);
    const again = loadAdapter(out);
    assert.deepEqual(again.modules.map((m) => m.path), adapter.modules.map((m) => m.path));
    for (let i = 0; i < again.modules.length; i++) {
      assert.deepEqual(Array.from(again.modules[i].A), Array.from(adapter.modules[i].A));
      assert.deepEqual(Array.from(again.modules[i].B), Array.from(adapter.modules[i].B));
    }
  });
}
