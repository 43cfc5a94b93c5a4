// Behaviour of the Llama stage beyond the golden numbers: B = 0 equals the base model, gradient checkpointing
// and pipeline boundaries do not change the numbers, and the dropout path's gradients are right.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LlamaStage, type LoraConfig } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { planStages } from '../../core/train/plan.ts';
import { makeMicroBatch } from '../../core/train/batch.ts';
import { withoutLora } from '../../coordinator/answer.ts';
import { tinyExamples, tinyModelDir, TINY } from '../helpers/tiny.ts';
import type { Backend } from '../../core/engine/backend.ts';

const LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0, useRslora: false, targetModules: 'all-linear' };
const dir = tinyModelDir();
const cfg = loadModelConfig(dir);
const batch = makeMicroBatch(tinyExamples(3, TINY.vocabSize), { padId: 0, sampleIds: [0, 1, 2] });

function grads(be: Backend, stages: LlamaStage[]): Float32Array[] {
  return stages.flatMap((s) => s.loraParams().flatMap((p) => [be.download(p.dA) as Float32Array, be.download(p.dB) as Float32Array]));
}

function step(stages: LlamaStage[], lora = LORA, dropout?: { k0: number; k1: number }): number {
  let hidden, loss = 0;
  for (const s of stages) { const r = s.forward(0, batch, hidden, { train: true, gradScale: 1 / batch.labelCount, dropout }); hidden = r.hidden; if (r.lossSum !== undefined) loss = r.lossSum / batch.labelCount; }
  let d;
  for (let i = stages.length - 1; i >= 0; i--) d = stages[i].backward(0, d);
  void lora;
  return loss;
}

test('a fresh adapter (B = 0) leaves the base model unchanged: logits equal with and without the LoRA branch', () => {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 1 });
  const rows = [0, 5, batch.T - 1];
  const withLora = stage.logitsAt(batch, undefined, rows);
  const base = withoutLora([stage], () => stage.logitsAt(batch, undefined, rows));
  for (let i = 0; i < rows.length; i++) assert.deepEqual(Array.from(withLora[i]), Array.from(base[i]));
});

test('LoRA init follows PEFT: A ~ U(±1/√in) (non-zero), B = 0, one module per targeted linear', () => {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: { ...LORA, targetModules: ['q_proj', 'v_proj'] }, seed: 1 });
  const ps = stage.loraParams();
  assert.equal(ps.length, 2 * TINY.numLayers);
  for (const p of ps) {
    const A = be.download(p.A) as Float32Array, B = be.download(p.B) as Float32Array;
    const bound = 1 / Math.sqrt(p.inFeatures);
    assert.ok(A.every((x) => Math.abs(x) <= bound) && A.some((x) => x !== 0), p.name);
    assert.ok(B.every((x) => x === 0), p.name);
    assert.equal(p.scale, 2);
  }
});

test('gradient checkpointing on or off gives bit-identical loss and gradients', () => {
  const run = (ckpt: boolean): { loss: number; g: Float32Array[] } => {
    const be = createCpuBackend();
    const st = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 1, gradientCheckpointing: ckpt });
    for (const p of st.loraParams()) be.axpy(p.B, be.upload(new Float32Array(p.B.size).fill(0.01), p.B.shape, 'f32'));
    const loss = step([st]);
    return { loss, g: grads(be, [st]) };
  };
  const a = run(true), b = run(false);
  assert.equal(a.loss, b.loss);
  assert.deepEqual(a.g.map((x) => Array.from(x)), b.g.map((x) => Array.from(x)));
});

test('a pipeline of 3 stages gives bit-identical loss and gradients to one stage', () => {
  const run = (n: number): { loss: number; g: Float32Array[] } => {
    const be = createCpuBackend();
    const stages = planStages(cfg, n).specs.map((spec) => loadStage(be, dir, spec, { lora: LORA, seed: 1 }));
    for (const s of stages) for (const p of s.loraParams()) be.axpy(p.B, be.upload(new Float32Array(p.B.size).fill(0.01), p.B.shape, 'f32'));
    return { loss: step(stages), g: grads(be, stages) };
  };
  const one = run(1), three = run(3);
  assert.equal(one.loss, three.loss);
  assert.deepEqual(one.g.map((x) => Array.from(x)), three.g.map((x) => Array.from(x)));
});

test('with LoRA dropout, the gradient of a LoRA weight matches a finite difference of the (fixed-mask) loss', () => {
  const be = createCpuBackend();
  const lora = { ...LORA, dropout: 0.3 };
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora, seed: 1, gradientCheckpointing: true });
  for (const p of stage.loraParams()) be.axpy(p.B, be.upload(new Float32Array(p.B.size).fill(0.05), p.B.shape, 'f32'));
  const dropout = { k0: 11, k1: 22 };
  step([stage], lora, dropout);
  const p = stage.loraParams()[2]; // layer 0 v_proj
  const g = be.download(p.dA) as Float32Array;
  // Eval-mode forward has no dropout, so the loss is measured in train mode with the same dropout key.
  const trainLoss = (): number => { const r = stage.forward(2, batch, undefined, { train: true, dropout, gradScale: 0 }); stage.backward(2); return r.lossSum! / r.count!; };
  for (const idx of [0, 7, 13]) {
    const A = be.download(p.A) as Float32Array;
    const h = 1e-2;
    const set = (v: number): void => { const a = A.slice(); a[idx] = v; const t = be.upload(a, p.A.shape, 'f32'); be.scale(p.A, 0); be.axpy(p.A, t); };
    const x0 = A[idx];
    set(x0 + h); const lp = trainLoss();
    set(x0 - h); const lm = trainLoss();
    set(x0);
    const fd = (lp - lm) / (2 * h);
    assert.ok(Math.abs(fd - g[idx]) <= 2e-3 + 2e-2 * Math.abs(g[idx]), `dA[${idx}]: backward ${g[idx]} vs finite difference ${fd}`);
  }
});

test('generation with a KV cache equals full recomputation, batched (left padding) and one prompt at a time, across 2 stages', async () => {
  const { generateTokens } = await import('../../core/model/generate.ts');
  const be = createCpuBackend();
  const stages = planStages(cfg, 2).specs.map((spec) => loadStage(be, dir, spec, { lora: LORA, seed: 1 }));
  for (const s of stages) for (const p of s.loraParams()) be.axpy(p.B, be.upload(new Float32Array(p.B.size).fill(0.02), p.B.shape, 'f32'));
  const prompts = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25]];
  const opts = { maxNewTokens: 6, eosIds: [], padId: 0 };
  const cached = generateTokens(stages, prompts, { ...opts, cache: true });
  const full = generateTokens(stages, prompts, { ...opts, cache: false });
  assert.deepEqual(cached, full);
  prompts.forEach((p, i) => assert.deepEqual(generateTokens(stages, [p], { ...opts, cache: true })[0], cached[i], `prompt ${i} alone`));
  assert.ok(cached.every((c) => c.length === 6));
  // Sampling is seeded: same seed, same tokens.
  const s1 = generateTokens(stages, prompts, { ...opts, temperature: 0.8, topK: 10, topP: 0.9, seed: 3 });
  assert.deepEqual(generateTokens(stages, prompts, { ...opts, temperature: 0.8, topK: 10, topP: 0.9, seed: 3 }), s1);
});
