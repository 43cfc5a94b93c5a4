// The training loop: loss goes down, the loss normaliser covers the whole optimizer step, stop + resume from a
// checkpoint gives the bit-identical adapter, corrupt checkpoints are refused, schedules follow the HF Trainer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LoraConfig } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { Trainer, type TrainSettings } from '../../core/train/trainer.ts';
import { saveCheckpoint, loadCheckpoint, listCheckpoints } from '../../common/checkpoint.ts';
import { lrMultiplier, warmupSteps } from '../../core/train/schedule.ts';
import { CheckpointError } from '../../common/errors.ts';
import { tinyExamples, tinyModelDir, TINY } from '../helpers/tiny.ts';

const dir = tinyModelDir();
const cfg = loadModelConfig(dir);
const LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0.1, useRslora: false, targetModules: 'all-linear' };
const data = tinyExamples(24, TINY.vocabSize, 5);
const SETTINGS: TrainSettings = {
  epochs: 3, microBatchSize: 4, gradAccum: 2, replicas: 1, lr: 1e-2, schedule: 'linear', warmupSteps: 2,
  weightDecay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, maxGradNorm: 1.0, seed: 9, padId: 0,
};

function makeTrainer(settings: Partial<TrainSettings> = {}): Trainer {
  const be = createCpuBackend();
  const stage = loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9 });
  return new Trainer(be, [stage], data, { ...SETTINGS, ...settings }, { configHash: 'c', dataHash: 'd' });
}

function adapterBytes(t: Trainer): number[][] {
  return t.snapshot().modules.flatMap((m) => [Array.from(m.A), Array.from(m.B)]);
}

test('training lowers the loss on a small dataset (10 epochs, GA 2, dropout, clipping, linear warmup)', () => {
  const t = makeTrainer({ epochs: 10, lr: 3e-2 });
  const first = t.evaluate(data).loss;
  const losses: number[] = [];
  while (!t.done) losses.push(t.step().loss);
  const last = t.evaluate(data).loss;
  assert.equal(t.state.step, t.totalSteps);
  assert.equal(t.totalSteps, 10 * 3);  // 24 samples / (4 · 2) = 3 steps per epoch
  assert.ok(last < first - 1.5, `eval loss ${first} → ${last}`);
  assert.ok(losses.every(Number.isFinite));
});

test('the first optimizer step runs at lr·0 with warmup (HF Trainer semantics), and the adapter is unchanged by it', () => {
  const t = makeTrainer();
  const before = adapterBytes(t);
  const r = t.step();
  assert.equal(r.lr, 0);
  assert.deepEqual(adapterBytes(t), before);
  assert.ok(t.step().lr > 0);
});

test('the same seed and config give a bit-identical adapter; another seed does not', () => {
  const run = (seed: number): number[][] => { const t = makeTrainer({ seed, epochs: 1 }); while (!t.done) t.step(); return adapterBytes(t); };
  assert.deepEqual(run(9), run(9));
  assert.notDeepEqual(run(9), run(10));
});

test('a run stopped mid-epoch and resumed from its checkpoint ends with the bit-identical adapter', () => {
  const out = mkdtempSync(join(tmpdir(), 'dqlora-ck-'));
  const full = makeTrainer();
  while (!full.done) full.step();
  const a = makeTrainer();
  for (let i = 0; i < 4; i++) a.step(); // 4 steps = 1 epoch + 1 step: mid-epoch
  const snap = a.snapshot();
  saveCheckpoint(out, { state: a.state, modules: snap.modules, moments: snap.moments, loraConfig: LORA }, dir, 2);
  const b = makeTrainer();
  b.restore(loadCheckpoint(listCheckpoints(out).at(-1)!.dir));
  assert.equal(b.state.step, 4);
  while (!b.done) b.step();
  assert.deepEqual(adapterBytes(b), adapterBytes(full));
});

test('a corrupt or torn checkpoint is refused with a clear error', () => {
  const out = mkdtempSync(join(tmpdir(), 'dqlora-ck-'));
  const a = makeTrainer();
  a.step();
  const snap = a.snapshot();
  const ckDir = saveCheckpoint(out, { state: a.state, modules: snap.modules, moments: snap.moments, loraConfig: LORA }, dir, 2);
  const f = join(ckDir, 'optimizer.safetensors');
  const original = readFileSync(f);
  const bytes = Buffer.from(original);
  bytes[bytes.length - 3] ^= 0xff;
  writeFileSync(f, bytes);
  assert.throws(() => loadCheckpoint(ckDir), (e: unknown) => e instanceof CheckpointError && /optimizer\.safetensors is corrupt/.test((e as Error).message));
  // A checkpoint directory without its manifest (interrupted write) is not listed and cannot be loaded.
  writeFileSync(f, original);
  const manifest = JSON.parse(readFileSync(join(ckDir, 'manifest.json'), 'utf8'));
  manifest.files['missing.bin'] = { sha256: '00', bytes: 1 };
  writeFileSync(join(ckDir, 'manifest.json'), JSON.stringify(manifest));
  assert.throws(() => loadCheckpoint(ckDir), /missing\.bin is missing/);
});

test('resuming with other training settings is refused', () => {
  const out = mkdtempSync(join(tmpdir(), 'dqlora-ck-'));
  const a = makeTrainer();
  a.step();
  const snap = a.snapshot();
  const ck = saveCheckpoint(out, { state: a.state, modules: snap.modules, moments: snap.moments, loraConfig: LORA }, dir, 2);
  const be = createCpuBackend();
  const other = new Trainer(be, [loadStage(be, dir, fullModelSpec(cfg), { lora: LORA, seed: 9 })], data, SETTINGS, { configHash: 'other', dataHash: 'd' });
  assert.throws(() => other.restore(loadCheckpoint(ck)), /other training settings/);
});

test('old checkpoints are pruned to keep_checkpoints', () => {
  const out = mkdtempSync(join(tmpdir(), 'dqlora-ck-'));
  const a = makeTrainer();
  for (let i = 0; i < 4; i++) {
    a.step();
    const snap = a.snapshot();
    saveCheckpoint(out, { state: a.state, modules: snap.modules, moments: snap.moments, loraConfig: LORA }, dir, 2);
  }
  assert.deepEqual(listCheckpoints(out).map((c) => c.step), [3, 4]);
  assert.deepEqual(readdirSync(join(out, 'checkpoints')).sort(), ['step-000003', 'step-000004']);
});

test('gradient accumulation normalises by the label tokens of the whole step: GA 2 × 4 equals one micro-batch of 8', () => {
  const ga = makeTrainer({ microBatchSize: 4, gradAccum: 2, warmupSteps: 0, maxGradNorm: 0 });
  const big = makeTrainer({ microBatchSize: 8, gradAccum: 1, warmupSteps: 0, maxGradNorm: 0 });
  const r1 = ga.step(), r2 = big.step();
  assert.ok(Math.abs(r1.loss - r2.loss) <= 1e-5 * r2.loss, `${r1.loss} vs ${r2.loss}`);
  assert.ok(Math.abs(r1.gradNorm - r2.gradNorm) <= 1e-4 * r2.gradNorm, `${r1.gradNorm} vs ${r2.gradNorm}`);
  const a = adapterBytes(ga).flat(), b = adapterBytes(big).flat();
  let maxErr = 0;
  for (let i = 0; i < a.length; i++) maxErr = Math.max(maxErr, Math.abs(a[i] - b[i]));
  assert.ok(maxErr < 1e-5, `adapters differ by ${maxErr}`);
});

test('learning-rate schedules follow the HF Trainer lambdas', () => {
  // linear with W=2, T=10: s/W during warmup, then (T−s)/(T−W)
  assert.deepEqual([0, 1, 2, 6, 10].map((s) => lrMultiplier('linear', s, 10, 2)), [0, 0.5, 1, 0.5, 0]);
  assert.equal(lrMultiplier('constant', 0, 10, 5), 1); // constant ignores warmup
  assert.equal(lrMultiplier('constant_with_warmup', 1, 10, 4), 0.25);
  assert.ok(Math.abs(lrMultiplier('cosine', 6, 10, 2) - 0.5) < 1e-12);
  assert.equal(lrMultiplier('cosine', 10, 10, 2), 0);
  assert.equal(warmupSteps(0.1, 95), 10);
  assert.equal(warmupSteps(3, 95), 3);
});
