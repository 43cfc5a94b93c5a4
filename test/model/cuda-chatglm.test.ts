// ChatGLM2 (the seed model's architecture) on the cuda backend: the golden fixtures of golden-chatglm.test.ts
// (independent PyTorch implementation, fp32, NF4-exact weights) with bf16 activations — loss within 1e-2
// relative, the whole LoRA gradient within 3e-2 (L2-relative), logits within 3e-2 of their largest magnitude.
// Exercises partial interleaved RoPE (permuted to rotate_half), MQA and the packed modules' shared LoRA on the GPU.
// Skipped (with the reason) where no GPU / addon is present.
import { goldenBatch } from '../helpers/golden.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter } from '../../core/model/adapter.ts';
import { permuteRows } from '../../core/engine/lora.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';

const ROOT = [join(import.meta.dirname ?? '.', '..', 'fixtures', 'golden-chatglm'), join(process.cwd(), 'test', 'fixtures', 'golden-chatglm')].find((d) => existsSync(d))!;

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try { cuda = createCudaBackend(); } catch (e) { skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`; }

interface Expected { loss: number; num_targets: number; batch: { input_ids: number[][]; attention_mask: number[][]; labels: number[][] } }

for (const name of ['chatglm-qkv', 'chatglm-all']) {
  test(`cuda golden ${name}: loss ≤ 1e-2 rel, LoRA gradient ≤ 3e-2 (L2), logits ≤ 3e-2 vs the PyTorch reference`, { skip }, () => {
    const be = cuda!;
    const dir = join(ROOT, name);
    const e = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;
    const batch = goldenBatch(e.batch), T = batch.T;
    const stage = loadStage(be, join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))), { doubleQuant: false });
    applyAdapter(be, stage, loadAdapter(join(dir, 'adapter')), name);
    const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / e.num_targets });
    const loss = r.lossSum! / r.count!;
    assert.ok(Math.abs(loss - e.loss) <= 1e-2 * e.loss, `loss ${loss} vs reference ${e.loss}`);
    stage.backward(0);
    const grads = SafetensorsFile.open(join(dir, 'grads.safetensors'));
    try {
      let num = 0, den = 0;
      for (const p of stage.loraParams()) {
        const got = { A: be.download(p.dA) as Float32Array, B: permuteRows(be.download(p.dB) as Float32Array, p.r, p.rowPerm, 'toExternal') };
        for (const which of ['A', 'B'] as const) {
          const want = grads.readF32(`base_model.model.${p.name}.lora_${which}.weight`);
          for (let i = 0; i < want.length; i++) { num += (got[which][i] - want[i]) ** 2; den += want[i] ** 2; }
        }
      }
      const rel = Math.sqrt(num / den);
      assert.ok(rel <= 3e-2, `LoRA gradient L2-relative error ${rel.toExponential(3)}`);
      const logits = stage.logitsAt(batch, undefined, Array.from({ length: T }, (_, t) => t));
      const want = grads.readF32('logits0'), V = want.length / T;
      let maxErr = 0, maxAbs = 0;
      for (let t = 0; t < T; t++) for (let v = 0; v < V; v++) { maxErr = Math.max(maxErr, Math.abs(logits[t][v] - want[t * V + v])); maxAbs = Math.max(maxAbs, Math.abs(want[t * V + v])); }
      assert.ok(maxErr <= 3e-2 * maxAbs, `logits max error ${maxErr} vs max |logit| ${maxAbs}`);
    } finally { grads.close(); }
  });
}
