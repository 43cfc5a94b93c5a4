// OOM-safe micro-batches, the pieces and the step: an allocation beyond the backend's memory budget fails with the
// typed out-of-memory error and allocates nothing; the step that hits it is undone (in-flight micro-batches, every
// tensor it allocated, the gradients it had accumulated) and runs again in micro-batches of half the rows, which then
// stay. The out-of-memory failures here are real refusals of the cpu backend's allocator (its budget lowered at an
// exact point of the step), not thrown by the test: what the model code and the trainer see is what a full GPU gives.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { createCpuBackend, type CpuBackend } from '../../core/engine/cpu.ts';
import { isOutOfMemory, memoryLimitFromEnv, parseByteSize } from '../../core/engine/oom.ts';
import { makeMicroBatch, splitMicroBatch } from '../../core/train/batch.ts';
import { autoMicroBatchCandidates, capMicroBatchRows, halveRows, type MicroBatchSplit } from '../../core/train/micro-split.ts';
import { Trainer, type TrainSettings } from '../../core/train/trainer.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LoraConfig } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { ConfigError, OutOfMemoryError, OUT_OF_MEMORY_CODE } from '../../common/errors.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';
import { relErr } from '../engine/helpers.ts';
import { tinyExamples, tinyModelDir, TINY } from '../helpers/tiny.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'golden-noquant', 'llama-f32');

test('out of memory is recognised: the typed error, the addon\'s code, and its text after crossing a thread or a process', () => {
  assert.ok(isOutOfMemory(new OutOfMemoryError('cuda:0', 1 << 30, 5, undefined)));
  assert.ok(isOutOfMemory(Object.assign(new Error('dqlora cuda: something'), { code: OUT_OF_MEMORY_CODE })));
  assert.ok(isOutOfMemory(new Error('dqlora cuda: cudaMalloc of 1073741824 bytes failed: out of memory (live 5 B in 1 blocks; device free 0 of 8 B) at runtime.cu:72')));
  assert.ok(isOutOfMemory(new Error('worker w1 (stage 0, replica 0) failed runStep: out of device memory on cpu: 24576 bytes requested with 100 in use')));
  assert.ok(isOutOfMemory(new Error('cublasLtMatmul(...) failed: cuBLAS status 3 (CUBLAS_STATUS_ALLOC_FAILED) at gemm.cpp:180')));
  assert.ok(!isOutOfMemory(new Error('matmul: inner dims differ')));
  assert.ok(!isOutOfMemory(new RangeError('Invalid array length')));
});

test('DQLORA_MEM_LIMIT_BYTES: a byte count, with K/M/G/T suffixes; anything else is a ConfigError naming the variable', () => {
  assert.equal(memoryLimitFromEnv({}), undefined);
  assert.equal(memoryLimitFromEnv({ DQLORA_MEM_LIMIT_BYTES: '' }), undefined);
  assert.equal(memoryLimitFromEnv({ DQLORA_MEM_LIMIT_BYTES: '1048576' }), 1048576);
  assert.equal(parseByteSize('512M'), 512 * 2 ** 20);
  assert.equal(parseByteSize('1.5G'), 1.5 * 2 ** 30);
  assert.equal(parseByteSize('2GiB'), 2 * 2 ** 30);
  for (const bad of ['0', '-5', 'lots', '1.5.2G']) {
    assert.throws(() => memoryLimitFromEnv({ DQLORA_MEM_LIMIT_BYTES: bad }), (e: unknown) => e instanceof ConfigError && /DQLORA_MEM_LIMIT_BYTES=/.test((e as Error).message));
  }
});

test('the cpu backend\'s budget: an allocation beyond it throws OutOfMemoryError and allocates nothing; a tracker frees what a failed sequence left', () => {
  const be = createCpuBackend({ memoryLimitBytes: 4096 });
  const a = be.zeros([512], 'f32');                 // 2048 B
  assert.equal(be.memoryBudget(), 4096);
  const tr = be.trackAllocations();
  const b = be.zeros([256], 'f32');                 // 1024 B, tracked
  assert.throws(() => be.zeros([512], 'f32'), (e: unknown) => e instanceof OutOfMemoryError && e.requestedBytes === 2048 && e.inUseBytes === 3072 && e.limitBytes === 4096 && isOutOfMemory(e));
  assert.equal(be.memoryInUse(), 3072, 'the refused allocation took nothing');
  assert.equal(tr.freeLeftovers(), 1024, 'the tracked tensor that was never freed is given back');
  tr.close();
  assert.equal(be.memoryInUse(), 2048, 'what existed before the tracker is untouched');
  assert.throws(() => be.download(b), /used after free/);
  be.free(a);
  assert.equal(be.memoryInUse(), 0);
  assert.equal(createCpuBackend().memoryBudget(), undefined, 'no budget: host memory is not budgeted');
});

test('splitMicroBatch: rows, labels and packed fields go with their rows; label counts add up', () => {
  const tok = loadTokenizer(join(FIX, 'model'));
  const { examples } = tokenizeRecords(readRecords(join(FIX, 'data.jsonl')).records, tok, { maxLength: 512 });
  const mb = makeMicroBatch(examples, { padId: tok.padId!, packing: { maxLength: 64 } });
  const parts = splitMicroBatch(mb, 2);
  assert.equal(parts.reduce((a, p) => a + p.B, 0), mb.B);
  assert.equal(parts.reduce((a, p) => a + p.labelCount, 0), mb.labelCount);
  assert.deepEqual(Array.from(parts[1].segments!), Array.from(mb.segments!.subarray(parts[0].B * mb.T)));
  assert.equal(parts.reduce((a, p) => a + p.placement!.length, 0), examples.length);
  // capping rows cuts only the micro-batches above the cap, in consecutive rows, keeping T
  const capped = capMicroBatchRows([mb, parts[0]], 1);
  assert.equal(capped.length, mb.B + parts[0].B);
  assert.ok(capped.every((p) => p.B === 1 && p.T === mb.T));
});

test('halving and auto\'s candidates: half rounded up; every auto candidate divides the batch', () => {
  assert.deepEqual([8, 6, 3, 2, 1].map(halveRows), [4, 3, 2, 1, 1]);
  assert.deepEqual(autoMicroBatchCandidates(16), [16, 8, 4, 2, 1]);
  assert.deepEqual(autoMicroBatchCandidates(24), [24, 12, 6, 3, 1]);
  assert.deepEqual(autoMicroBatchCandidates(10), [10, 5, 2, 1]);
  assert.deepEqual(autoMicroBatchCandidates(1), [1]);
  for (let b = 1; b <= 64; b++) assert.ok(autoMicroBatchCandidates(b).every((c) => b % c === 0));
});

// ---- the step -------------------------------------------------------------------------------------------------

const dir = tinyModelDir();
const cfg = loadModelConfig(dir);
const LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0.1, useRslora: false, targetModules: 'all-linear' };
const data = tinyExamples(32, TINY.vocabSize, 5);
const SETTINGS: TrainSettings = {
  epochs: 1, microBatchSize: 4, gradAccum: 2, replicas: 1, lr: 1e-2, schedule: 'linear', warmupSteps: 1,
  weightDecay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 9, padId: 0,
};

/**
 * Makes call number `nth` (1-based, counted over the whole run) of backend method `method` run with the budget set
 * to what is live right then, so the allocation of its output is refused for real; the budget is lifted after it.
 */
function refuseAt(be: CpuBackend, method: 'embedding' | 'rmsnormBackward' | 'swigluBackward', nth: number): void {
  const orig = (be[method] as (...a: unknown[]) => unknown).bind(be);
  let calls = 0;
  (be as unknown as Record<string, unknown>)[method] = (...args: unknown[]) => {
    if (++calls !== nth) return orig(...args);
    be.setMemoryLimit(be.memoryInUse());
    try { return orig(...args); } finally { be.setMemoryLimit(undefined); }
  };
}

interface Run { losses: number[]; adapter: Float32Array; splits: MicroBatchSplit[]; rows: number | undefined; memoryAfter: number; memoryBefore: number }

function train(opts: { refuse?: Parameters<typeof refuseAt>[1]; at?: number; settings?: Partial<TrainSettings>; checkpointing?: boolean } = {}): Run {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9, gradientCheckpointing: opts.checkpointing ?? true });
  const t = new Trainer(be, [stage], data, { ...SETTINGS, ...opts.settings }, { configHash: 'c', dataHash: 'd' });
  const splits: MicroBatchSplit[] = [];
  t.pipeline.onSplit = (s) => splits.push(s);
  const memoryBefore = be.memoryInUse();
  if (opts.refuse) refuseAt(be, opts.refuse, opts.at!);
  const losses: number[] = [];
  while (!t.done) losses.push(t.step().loss);
  const adapter = Float32Array.from(t.snapshot().modules.flatMap((m) => [...m.A, ...m.B]));
  return { losses, adapter, splits, rows: t.pipeline.microBatchRows, memoryAfter: be.memoryInUse(), memoryBefore };
}

// Per micro-batch, rmsnormBackward runs once in the head's forward (the loss gradient is made there) and twice per
// layer in backward: call 7 + 1 + 3 is in the middle of the backward of micro-batch 1 (the second) of step 1.
const PER_MICRO = 1 + 2 * TINY.numLayers;
const MID_BACKWARD_OF_SECOND = PER_MICRO + 1 + 3;

test('out of memory in the middle of the backward of micro-batch 1 leaves no trace: the step runs again in halves, bit for bit as if halved from the start', () => {
  const whole = train();
  const atStart = train({ refuse: 'embedding', at: 1 });                               // the first allocation of step 1
  const midBackward = train({ refuse: 'rmsnormBackward', at: MID_BACKWARD_OF_SECOND }); // after micro-batch 0's gradients and half of 1's
  for (const r of [atStart, midBackward]) {
    assert.equal(r.splits.length, 1);
    assert.deepEqual({ ...r.splits[0], error: '' }, { step: 1, phase: 'train', fromRows: 4, toRows: 2, fromMicroBatches: 2, toMicroBatches: 4, error: '' });
    assert.match(r.splits[0].error, /out of device memory on cpu/);
    assert.equal(r.rows, 2, 'the smaller size is kept');
    assert.equal(r.memoryAfter, r.memoryBefore, 'nothing of the failed attempt stays allocated');
  }
  // the failed attempt's partial gradients, activations and in-flight states are gone: the same bits either way
  assert.deepEqual(midBackward.losses, atStart.losses);
  assert.deepEqual(midBackward.adapter, atStart.adapter);
  // and the halves add up to the whole (float summation order only)
  assert.equal(whole.losses.length, midBackward.losses.length);
  whole.losses.forEach((l, i) => assert.ok(Math.abs(l - midBackward.losses[i]) / l < 1e-5, `step ${i + 1}: loss ${midBackward.losses[i]} vs ${l}`));
  assert.ok(relErr(midBackward.adapter, whole.adapter) < 1e-5, `adapter differs by ${relErr(midBackward.adapter, whole.adapter)}`);
  assert.equal(whole.memoryAfter, whole.memoryBefore);
});

test('gradient checkpointing off (full tapes): out of memory mid-backward leaves no trace either; reset() frees in-flight tapes', () => {
  const whole = train({ checkpointing: false });
  const atStart = train({ refuse: 'embedding', at: 1, checkpointing: false });
  const midBackward = train({ refuse: 'rmsnormBackward', at: MID_BACKWARD_OF_SECOND, checkpointing: false });
  assert.equal(midBackward.memoryAfter, midBackward.memoryBefore);
  assert.deepEqual(midBackward.adapter, atStart.adapter);
  assert.ok(relErr(midBackward.adapter, whole.adapter) < 1e-5);
  // a micro-batch in flight (forward done, no backward) holds its tapes; reset() gives them all back
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9, gradientCheckpointing: false });
  const before = be.memoryInUse();
  const mb = makeMicroBatch(data.slice(0, 4), { padId: 0, sampleIds: [0, 1, 2, 3] });
  stage.forward(0, mb, undefined, { train: true, gradScale: 1 / mb.labelCount, dropout: { k0: 1, k1: 2 } });
  assert.ok(be.memoryInUse() > before);
  stage.reset();
  assert.equal(stage.inFlight, 0);
  assert.equal(be.memoryInUse(), before);
});

test('out of memory in a later step: the steps before keep their micro-batches, the rest run halved; same result', () => {
  const whole = train();
  const steps = whole.losses.length;
  assert.ok(steps >= 3);
  const at = 2 * 2 * PER_MICRO + MID_BACKWARD_OF_SECOND;    // step 3, micro-batch 1, mid-backward
  const late = train({ refuse: 'rmsnormBackward', at });
  assert.equal(late.splits.length, 1);
  assert.equal(late.splits[0].step, 3);
  whole.losses.forEach((l, i) => assert.ok(Math.abs(l - late.losses[i]) / l < 1e-5, `step ${i + 1}: loss ${late.losses[i]} vs ${l}`));
  assert.ok(relErr(late.adapter, whole.adapter) < 1e-5);
});

test('a micro-batch of one sequence that does not fit ends the run with an error that says what to do', () => {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9 });
  const t = new Trainer(be, [stage], data, { ...SETTINGS, microBatchSize: 2, gradAccum: 1 }, { configHash: 'c', dataHash: 'd' });
  const splits: MicroBatchSplit[] = [];
  t.pipeline.onSplit = (s) => splits.push(s);
  const loaded = be.memoryInUse();
  be.setMemoryLimit(loaded + 1024);   // the weights fit; no micro-batch does
  assert.throws(() => t.step(), (e: unknown) => e instanceof OutOfMemoryError && /step 1 does not fit even with micro-batches of one sequence/.test(e.message) && /data\.max_length/.test(e.message));
  assert.deepEqual(splits.map((s) => `${s.fromRows}→${s.toRows}`), ['2→1']);
  assert.equal(be.memoryInUse(), loaded);
});

test('out of memory in an evaluation: evaluated again in halves, the same loss; the smaller size is kept for training', () => {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9 });
  const t = new Trainer(be, [stage], data, SETTINGS, { configHash: 'c', dataHash: 'd' });
  const splits: MicroBatchSplit[] = [];
  t.pipeline.onSplit = (s) => splits.push(s);
  const clean = t.evaluate(data);
  const before = be.memoryInUse();
  refuseAt(be, 'embedding', 3);   // the third micro-batch of this evaluation
  const again = t.evaluate(data);
  assert.deepEqual(splits.map((s) => [s.phase, s.fromRows, s.toRows]), [['eval', 4, 2]]);
  assert.ok(Math.abs(again.loss - clean.loss) < 1e-6 * clean.loss, `${again.loss} vs ${clean.loss}`);
  assert.equal(again.tokens, clean.tokens);
  assert.equal(be.memoryInUse(), before);
  assert.equal(t.pipeline.microBatchRows, 2);
});
