// Input of the "PEFT loads our DoRA adapter" check: starting from PEFT's DoRA fixture adapter, trains 3 AdamW steps
// here (so the magnitudes, A and B are ours, not PEFT's), saves the adapter in PEFT format and our logits of the
// golden batch's sequence 0. check_dora_adapter.py (device machine) loads that adapter with PEFT 0.21 and writes
// peft-check.json with the largest logit difference; test/model/dora-golden.test.ts asserts it.
//
// Usage:  node --import tsx test/reference/make_dora_roundtrip.ts [FIXTURE_DIR]
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter, saveAdapter, stageLoraTensors } from '../../core/model/adapter.ts';
import { writeSafetensors } from '../../common/safetensors.ts';
import { goldenBatch } from '../helpers/golden.ts';

const ROOT = join(process.env.DQLORA_ROOT ?? join(import.meta.dirname, '..', '..'), 'test', 'fixtures');
const MODEL = join(ROOT, 'golden', 'llama-gqa', 'model');
const DIR = process.argv[2] ?? join(ROOT, 'golden-dora', 'llama-gqa');
const expected = JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8'));
const be = createCpuBackend();
const stage = loadStage(be, MODEL, fullModelSpec(loadModelConfig(MODEL)), { quantization: 'none' });
const adapter = loadAdapter(join(DIR, 'adapter'));
applyAdapter(be, stage, adapter, 'fixture');
const batch = goldenBatch(expected.batch);
for (let step = 1; step <= 3; step++) {
  const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / expected.num_targets });
  stage.backward(0);
  for (const p of stage.loraParams()) {
    for (const t of p.trainable()) be.adamw(t.param, t.grad, t.m, t.v, { lr: 1e-2 * t.lrScale, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step });
    p.zeroGrad();
  }
  process.stdout.write(`step ${step}: loss ${r.lossSum! / r.count!}\n`);
}
saveAdapter(join(DIR, 'ours', 'adapter'), stageLoraTensors(be, stage), adapter.config, null);
const logits = stage.logitsAt(batch, undefined, Array.from({ length: batch.T }, (_, t) => t));
const flat = new Float32Array(logits.length * logits[0].length);
logits.forEach((l, t) => flat.set(l, t * l.length));
writeSafetensors(join(DIR, 'ours', 'logits0.safetensors'), [{ name: 'logits0', dtype: 'F32', shape: [logits.length, logits[0].length], data: flat }], { format: 'pt' });
