// Our side of "the DoRA adapter we save loads in PEFT with the same logits" (issue 13). Run here (CPU, fp32):
//   node --import tsx test/reference/make_dora_ours.ts
// From PEFT's DoRA adapter (golden-dora/llama-gqa/adapter), three AdamW steps on the golden batch (lr 1e-2, as
// make_dora_trained.py), then saveAdapter → golden-dora/llama-gqa/ours-trained/adapter, and our logits of sequence 0
// → ours-trained/logits0.safetensors. On the device machine, check_peft_loads_dora.py loads that adapter with
// PeftModel.from_pretrained and writes PEFT's logits of it → ours-trained/peft-logits0.safetensors; the test
// (test/model/dora-golden.test.ts) compares the two.
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { goldenBatch } from '../helpers/golden.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter, saveAdapter, stageLoraTensors } from '../../core/model/adapter.ts';
import { writeSafetensors } from '../../common/safetensors.ts';

const ROOT = join(import.meta.dirname, '..', 'fixtures');
const MODEL = join(ROOT, 'golden', 'llama-gqa', 'model');
const DIR = join(ROOT, 'golden-dora', 'llama-gqa');
const OUT = join(DIR, 'ours-trained');
const expected = JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8')) as { num_targets: number; batch: Parameters<typeof goldenBatch>[0] };

const be = createCpuBackend();
const stage = loadStage(be, MODEL, fullModelSpec(loadModelConfig(MODEL)), { quantization: 'none' });
const peftAdapter = loadAdapter(join(DIR, 'adapter'));
applyAdapter(be, stage, peftAdapter, 'golden-dora');
const batch = goldenBatch(expected.batch);
const losses: number[] = [];
for (let step = 1; step <= 3; step++) {
  const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / expected.num_targets });
  stage.backward(0);
  losses.push(r.lossSum! / r.count!);
  for (const p of stage.loraParams()) {
    for (const t of p.trainable()) be.adamw(t.param, t.grad, t.m, t.v, { lr: 1e-2 * t.lrScale, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step });
    p.zeroGrad();
  }
}
rmSync(OUT, { recursive: true, force: true });
mkdirSync(OUT, { recursive: true });
saveAdapter(join(OUT, 'adapter'), stageLoraTensors(be, stage), peftAdapter.config, null);
const ids = Array.from({ length: batch.T }, (_, t) => t);
const rows = stage.logitsAt(batch, undefined, ids);
const V = rows[0].length;
const flat = new Float32Array(batch.T * V);
rows.forEach((r, t) => flat.set(r, t * V));
writeSafetensors(join(OUT, 'logits0.safetensors'), [{ name: 'logits0', dtype: 'F32', shape: [batch.T, V], data: flat }], { format: 'pt', note: 'dqlora logits of sequence 0 after 3 DoRA AdamW steps (make_dora_ours.ts)' });
console.log(`ours-trained: losses ${losses.map((l) => l.toFixed(6)).join(', ')}; adapter + logits0 [${batch.T}, ${V}] in ${OUT}`);
