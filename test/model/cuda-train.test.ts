// A 200-step QLoRA training run of a small Llama on the cuda backend tracks the same run on the cpu backend
// (same checkpoint, data, seed, LoRA dropout masks, schedule): first loss within 1e-2 relative, every 20-step window
// mean within 0.05 + 5 % of the cpu's, both curves fall, and device memory in use is the same after step 1 and
// step 200. Skipped (with the reason) where no GPU / addon is present. Set DQLORA_CURVE_OUT=file.json to keep the
// two curves.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import type { Backend } from '../../core/engine/backend.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LoraConfig } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { Trainer, type TrainSettings } from '../../core/train/trainer.ts';
import { writeRandomLlama } from '../../coordinator/example/model.ts';
import { tinyExamples } from '../helpers/tiny.ts';

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try { cuda = createCudaBackend(); } catch (e) { skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`; }

// Head dim 16: the smallest the cuda attention kernels take.
const SHAPE = {
  hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: 64,
  maxPositionEmbeddings: 64, tieWordEmbeddings: false, bosTokenId: 1, eosTokenId: 2, padTokenId: 0, embedStd: 0.3,
};
const LORA: LoraConfig = { r: 8, alpha: 16, dropout: 0.1, useRslora: false, targetModules: 'all-linear' };
const STEPS = 200;
const SETTINGS: TrainSettings = {
  epochs: 1000, maxSteps: STEPS, microBatchSize: 8, gradAccum: 1, replicas: 1, lr: 1e-2, schedule: 'linear', warmupSteps: 5,
  weightDecay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 4, padId: 0,
};

function curve(be: Backend, dir: string): { losses: number[]; memAfterFirst: number; memAfterLast: number } {
  const stage = loadStage(be, dir, fullModelSpec(loadModelConfig(dir)), { lora: LORA, seed: 4 });
  const data = tinyExamples(32, SHAPE.vocabSize, 11);
  const t = new Trainer(be, [stage], data, SETTINGS, { configHash: 'c', dataHash: 'd' });
  const losses: number[] = [];
  let memAfterFirst = 0;
  while (!t.done) {
    losses.push(t.step().loss);
    if (losses.length === 1) memAfterFirst = be.memoryInUse();
  }
  return { losses, memAfterFirst, memAfterLast: be.memoryInUse() };
}

const mean = (a: number[]): number => a.reduce((x, y) => x + y, 0) / a.length;

test('200 training steps on cuda track the cpu backend\'s loss curve', { skip }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-cuda-train-'));
  try {
    writeRandomLlama(dir, SHAPE, 5);
    const c = curve(createCpuBackend(), dir);
    const g = curve(cuda!, dir);
    if (process.env.DQLORA_CURVE_OUT) writeFileSync(process.env.DQLORA_CURVE_OUT, JSON.stringify({ cpu: c.losses, cuda: g.losses }));
    assert.equal(g.losses.length, STEPS);
    assert.ok(g.losses.every(Number.isFinite), 'cuda losses are finite');
    const first = Math.abs(g.losses[0] - c.losses[0]) / c.losses[0];
    assert.ok(first <= 1e-2, `first loss: cuda ${g.losses[0]} vs cpu ${c.losses[0]}`);
    const W = 20, rows: string[] = [];
    for (let s = 0; s < STEPS; s += W) {
      const mc = mean(c.losses.slice(s, s + W)), mg = mean(g.losses.slice(s, s + W));
      rows.push(`${s + 1}-${s + W}: cpu ${mc.toFixed(4)} cuda ${mg.toFixed(4)}`);
      assert.ok(Math.abs(mg - mc) <= 0.05 + 0.05 * mc, `steps ${s + 1}-${s + W}: mean loss cuda ${mg} vs cpu ${mc}`);
    }
    process.stdout.write(`# loss windows: ${rows.join(' | ')}\n`);
    const c0 = mean(c.losses.slice(0, W)), cN = mean(c.losses.slice(-W)), g0 = mean(g.losses.slice(0, W)), gN = mean(g.losses.slice(-W));
    assert.ok(cN < 0.7 * c0 && gN < 0.7 * g0, `both curves fall: cpu ${c0} → ${cN}, cuda ${g0} → ${gN}`);
    assert.equal(g.memAfterLast, g.memAfterFirst, 'device memory in use is flat from step 1 to step 200');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
