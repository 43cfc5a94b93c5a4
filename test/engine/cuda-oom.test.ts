// Out of device memory on the cuda backend: a cudaMalloc the device cannot serve, and an allocation beyond the pool's
// budget (DQLORA_MEM_LIMIT_BYTES), both fail with OutOfMemoryError (code DQLORA_OOM) after the pool has given its
// cache back; a failure inside a native call (its scratch from the pool) carries the same code; nothing leaks and the
// device serves allocations again afterwards. A step on cuda that does not fit the budget is split and trains the
// loss curve of the unsplit run within bf16 tolerance. Skipped (with the reason) where no GPU / addon is present.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { isOutOfMemory } from '../../core/engine/oom.ts';
import type { Tensor } from '../../core/engine/backend.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LoraConfig } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { Trainer, type TrainSettings } from '../../core/train/trainer.ts';
import type { MicroBatchSplit } from '../../core/train/micro-split.ts';
import { OutOfMemoryError, OUT_OF_MEMORY_CODE } from '../../common/errors.ts';
import { writeRandomLlama } from '../../coordinator/example/model.ts';
import { tinyExamples } from '../helpers/tiny.ts';

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try { cuda = createCudaBackend(); } catch (e) { skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`; }
const MiB = 2 ** 20;

test('a cudaMalloc larger than the device: OutOfMemoryError, nothing leaks, the device works after', { skip }, () => {
  const be = cuda!;
  be.setMemoryLimit(undefined);
  const live = be.memoryInUse();
  const elems = Math.ceil((be.info.totalMemory + 2 ** 30) / 4);
  assert.throws(() => be.zeros([elems], 'f32'), (e: unknown) => {
    assert.ok(e instanceof OutOfMemoryError, String(e));
    assert.equal(e.code, OUT_OF_MEMORY_CODE);
    assert.match(e.message, /^out of device memory on cuda:\d+: \d+ bytes requested/);
    assert.match(e.message, /cudaMalloc of \d+ bytes failed/);
    assert.ok(isOutOfMemory(e));
    return true;
  });
  assert.equal(be.memoryInUse(), live);
  const t = be.upload(Float32Array.from([1, 2, 3]), [3]);
  assert.deepEqual(Array.from(be.download(t)), [1, 2, 3]);
  be.free(t);
});

test('the pool budget: refused beyond it (typed), a native call\'s scratch refused with the code, a tracker gives everything back', { skip }, async () => {
  const be = cuda!;
  const live = be.memoryInUse();
  be.setMemoryLimit(live + 64 * MiB);
  try {
    assert.equal(be.memoryBudget(), live + 64 * MiB);
    const tr = be.trackAllocations();
    const held: Tensor[] = [];
    assert.throws(() => { for (;;) held.push(be.zeros([4 * MiB], 'f32')); }, (e: unknown) => e instanceof OutOfMemoryError && e.limitBytes === live + 64 * MiB && isOutOfMemory(e));
    assert.equal(held.length, 4, 'four 16 MiB tensors fill the 64 MiB, a fifth is refused');
    be.free(held.pop()!);
    // downloadAsync stages through a scratch block of the pool, allocated in C++: its failure carries the code
    const big = be.zeros([3 * MiB], 'f32');    // 12 MiB: 60 of 64 in use, the 12 MiB scratch does not fit
    await assert.rejects(Promise.resolve().then(() => be.downloadAsync(big)), (e: unknown) => (e as { code?: string }).code === OUT_OF_MEMORY_CODE && isOutOfMemory(e));
    assert.equal(tr.freeLeftovers(), 3 * 16 * MiB + 12 * MiB);
    tr.close();
    assert.equal(be.memoryInUse(), live);
    be.releaseCache();
    const again = be.zeros([8 * MiB], 'f32');   // 32 MiB: fits again
    be.free(again);
  } finally {
    be.setMemoryLimit(undefined);
  }
});

test('a step that does not fit the budget is split on cuda: the same loss curve as the unsplit run (bf16 tolerance), no leak', { skip }, () => {
  const be = cuda!;
  be.setMemoryLimit(undefined);
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-cuda-oom-'));
  try {
    // Head dim 16: the smallest the cuda attention kernels take.
    writeRandomLlama(dir, { hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: 512,
      maxPositionEmbeddings: 256, tieWordEmbeddings: false, bosTokenId: 1, eosTokenId: 2, padTokenId: 0, embedStd: 0.3 }, 5);
    const lora: LoraConfig = { r: 8, alpha: 16, dropout: 0.1, useRslora: false, targetModules: 'all-linear' };
    const settings: TrainSettings = {
      epochs: 100, maxSteps: 6, microBatchSize: 32, gradAccum: 1, replicas: 1, lr: 1e-2, schedule: 'linear', warmupSteps: 1,
      weightDecay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 4, padId: 0,
    };
    const data = tinyExamples(64, 512, 11, 200);
    const run = (limit?: (loaded: number, peak: number) => number, peakOf?: number): { losses: number[]; splits: MicroBatchSplit[]; peak: number; loaded: number; after: number } => {
      const stage = loadStage(be, dir, fullModelSpec(loadModelConfig(dir)), { lora, seed: 4 });
      const t = new Trainer(be, [stage], data, settings, { configHash: 'c', dataHash: 'd' });
      const splits: MicroBatchSplit[] = [];
      t.pipeline.onSplit = (s) => splits.push(s);
      be.synchronize(); be.releaseCache(); be.resetPeak();
      const loaded = be.memoryInUse();
      if (limit) be.setMemoryLimit(limit(loaded, peakOf!));
      const losses: number[] = [];
      try { while (!t.done) losses.push(t.step().loss); } finally { be.setMemoryLimit(undefined); }
      const out = { losses, splits, peak: be.poolStats().peakInUse, loaded, after: be.memoryInUse() };
      for (const p of stage.loraParams()) p.free();
      stage.reset();
      return out;
    };
    const whole = run();
    const split = run((loaded, peak) => loaded + Math.floor((peak - loaded) * 0.7), whole.peak);
    assert.ok(split.splits.length >= 1, 'the budget forced a split');
    assert.equal(split.splits[0].fromRows, 32);
    assert.equal(split.after, split.loaded, 'nothing of the failed attempt stays allocated');
    assert.equal(whole.after, whole.loaded);
    whole.losses.forEach((l, i) => assert.ok(Math.abs(split.losses[i] - l) <= 1e-2 * Math.abs(l), `step ${i + 1}: ${split.losses[i]} vs ${l}`));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
