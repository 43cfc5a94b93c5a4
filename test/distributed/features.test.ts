// The issue-13 training features with distributed workers, end to end with real processes (bin/worker.js over gRPC on
// 127.0.0.1, the gradient all-reduce over a real nats-server): for quantization: none, sample packing, DoRA, LoRA+ and
// NEFTune — each alone, and all five together — 2 stages × 2 replicas train the same per-step losses, validation loss
// and adapter (DoRA magnitudes included) as one process, within 1e-5 (CPU float32; the layouts differ only in summation
// order: the all-reduce adds the replicas' gradients, one process accumulates them in one buffer). A run of all five
// stopped after 2 steps and resumed from its checkpoint ends bit-identical to the uninterrupted one: the workers
// upload the DoRA magnitudes and their AdamW moments, the checkpoint holds them, and the workers restore them.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { natsServerMissing, startNatsServer, type NatsServerHandle } from '../helpers/nats.ts';
import { loadAdapter } from '../../core/model/adapter.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';
import { parseJob, type JobConfig } from '../../coordinator/job.ts';
import { runJob, type RunOutcome } from '../../coordinator/run.ts';
import type { JobObserver } from '../../coordinator/events.ts';

const skip = natsServerMissing();
const work = mkdtempSync(join(tmpdir(), 'dqlora-dist-features-'));
const { model, trainPath, validationPath } = tinyExampleSetup(work);

const STEPS = 3;
type Features = { quantization?: string; data?: Record<string, unknown>; lora?: Record<string, unknown>; training?: Record<string, unknown> };

/**
 * One job with `f`, in one process (dist undefined) or laid out as given. A step's samples are the same for
 * (R = 1, grad_accum 4) and (R = 2, grad_accum 2), and so are its micro-batches (packed ones included).
 */
function job(out: string, f: Features, dist?: Record<string, unknown>): JobConfig {
  return parseJob({
    name: 'dist-features', model, output_dir: out, backend: 'cpu',
    ...(f.quantization ? { quantization: f.quantization } : {}),
    data: { train: trainPath, validation: validationPath, max_length: 64, ...f.data },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear', ...f.lora },
    training: { max_steps: STEPS, micro_batch_size: 2, grad_accum: dist ? 2 : 4, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, max_grad_norm: 0.05, ...f.training },
    distributed: { heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60, ...dist },
  }, 'test', work);
}

let nats: NatsServerHandle | undefined;
before(async () => { if (!skip) nats = await startNatsServer(); });
after(async () => { await nats?.stop(); });
const twoByTwo = (): Record<string, unknown> => ({ stages: 2, replicas: 2, workers: 'local', nats_url: nats!.url });

/** Runs a job and records each step's loss and gradient norm. */
async function run(j: JobConfig, o: { stopAfter?: number } = {}): Promise<RunOutcome & { losses: number[]; gradNorms: number[] }> {
  const losses: number[] = [], gradNorms: number[] = [];
  const rec: JobObserver = { onStep: (e) => { losses.push(e.loss); gradNorms.push(e.gradNorm); } };
  const r = await runJob(j, { print: () => {}, observers: [rec], stopAfter: o.stopAfter });
  return { ...r, losses, gradNorms };
}

const close = (a: number, b: number): boolean => Math.abs(a - b) <= 1e-5 * Math.max(Math.abs(a), Math.abs(b), 1e-30);

/** Largest |a − b| / max|a| over each tensor of two adapters (lora_A, lora_B, DoRA magnitude), same module set. */
function maxRelDiff(a: string, b: string): number {
  const A = loadAdapter(a), B = loadAdapter(b);
  assert.deepEqual(A.modules.map((m) => m.path).sort(), B.modules.map((m) => m.path).sort());
  let worst = 0;
  for (const m of A.modules) {
    const n = B.modules.find((x) => x.path === m.path)!;
    assert.equal(!!m.magnitude, !!n.magnitude, `${m.path}: DoRA magnitude in one adapter only`);
    for (const [x, y] of [[m.A, n.A], [m.B, n.B], [m.magnitude, n.magnitude]] as const) {
      if (!x || !y) continue;
      let diff = 0, scale = 0;
      for (let i = 0; i < x.length; i++) { diff = Math.max(diff, Math.abs(x[i] - y[i])); scale = Math.max(scale, Math.abs(x[i])); }
      worst = Math.max(worst, diff / (scale || 1));
    }
  }
  return worst;
}

/** The one-process run and the 2 × 2 run of `f` agree step by step and in the adapter. */
async function assertSameAsOneProcess(name: string, f: Features): Promise<{ single: string; dist: string }> {
  const single = await run(job(join(work, `${name}-single`), f));
  const dist = await run(job(join(work, `${name}-2x2`), f, twoByTwo()));
  assert.equal(dist.steps, STEPS);
  assert.equal(dist.losses.length, STEPS);
  for (let s = 0; s < STEPS; s++) {
    assert.ok(close(dist.losses[s], single.losses[s]), `${name} step ${s + 1}: loss ${dist.losses[s]} (2×2) vs ${single.losses[s]} (one process)`);
    assert.ok(close(dist.gradNorms[s], single.gradNorms[s]), `${name} step ${s + 1}: grad norm ${dist.gradNorms[s]} vs ${single.gradNorms[s]}`);
  }
  assert.ok(dist.evalLoss !== null && close(dist.evalLoss, single.evalLoss!), `${name}: eval loss ${dist.evalLoss} vs ${single.evalLoss}`);
  const rel = maxRelDiff(single.adapterDir, dist.adapterDir);
  assert.ok(rel <= 1e-5, `${name}: the 2×2 adapter differs from the one-process adapter by ${rel} (relative)`);
  assert.ok(loadAdapter(dist.adapterDir).modules.some((m) => m.B.some((x) => x !== 0)), `${name}: the adapter was trained`);
  return { single: single.adapterDir, dist: dist.adapterDir };
}

/** Bytes of an adapter's safetensors file. */
const adapterBytes = (dir: string): Buffer => readFileSync(join(dir, 'adapter_model.safetensors'));

test('quantization: none — the workers load their layers unquantized: 2 × 2 = one process (1e-5)', { skip, timeout: 120_000 }, async () => {
  const { single, dist } = await assertSameAsOneProcess('noquant', { quantization: 'none' });
  // Against the NF4 run the adapter differs: the workers did not quantize.
  const nf4 = await run(job(join(work, 'nf4-single'), {}));
  assert.ok(maxRelDiff(nf4.adapterDir, dist) > 1e-3, 'quantization: none trains another adapter than NF4');
  assert.ok(maxRelDiff(nf4.adapterDir, single) > 1e-3);
});

test('data.packing — packed micro-batches reach every stage with their segments: 2 × 2 = one process (1e-5)', { skip, timeout: 120_000 }, async () => {
  // max_length 128: each micro-batch's two examples (32–52 tokens) share one row.
  await assertSameAsOneProcess('packing', { data: { packing: true, max_length: 128 } });
});

test('lora.use_dora — magnitudes train on the workers and are all-reduced: 2 × 2 = one process (1e-5), with every lora_magnitude_vector', { skip, timeout: 120_000 }, async () => {
  const { dist } = await assertSameAsOneProcess('dora', { lora: { use_dora: true } });
  const ad = loadAdapter(dist);
  assert.equal(ad.config.useDora, true);
  assert.equal(ad.modules.length, 3 * 7, 'every linear of the 3 layers, from both stages');
  for (const m of ad.modules) assert.ok(m.magnitude && m.magnitude.length === m.outFeatures, `${m.path} has its magnitude`);
  const f = SafetensorsFile.open(join(dist, 'adapter_model.safetensors'));
  try {
    const keys = f.names().filter((n) => n.endsWith('.lora_magnitude_vector'));
    assert.equal(keys.length, 21);
    assert.ok(keys.includes('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'), 'stage 0\'s');
    assert.ok(keys.includes('base_model.model.model.layers.2.mlp.down_proj.lora_magnitude_vector'), 'stage 1\'s');
  } finally { f.close(); }
});

test('lora.loraplus_lr_ratio — the workers update lora_B at lr × ratio: 2 × 2 = one process (1e-5)', { skip, timeout: 120_000 }, async () => {
  await assertSameAsOneProcess('loraplus', { lora: { loraplus_lr_ratio: 16 } });
});

test('training.neftune_noise_alpha — the first stage adds the same noise as one process: 2 × 2 = one process (1e-5)', { skip, timeout: 120_000 }, async () => {
  await assertSameAsOneProcess('neftune', { training: { neftune_noise_alpha: 5 } });
});

const ALL: Features = { quantization: 'none', data: { packing: true, max_length: 128 }, lora: { use_dora: true, loraplus_lr_ratio: 4 }, training: { neftune_noise_alpha: 5 } };
let allTwoByTwo: string | undefined;

test('all five together (none + packing + DoRA + LoRA+ + NEFTune): 2 × 2 = one process (1e-5)', { skip, timeout: 120_000 }, async () => {
  allTwoByTwo = (await assertSameAsOneProcess('all', ALL)).dist;
  assert.ok(loadAdapter(allTwoByTwo).modules.every((m) => m.magnitude));
});

test('all five, 2 × 2, stopped after 2 steps and resumed from the checkpoint: bit-identical adapter (DoRA moments checkpointed)', { skip, timeout: 120_000 }, async () => {
  assert.ok(allTwoByTwo, 'needs the previous test');
  const out = join(work, 'all-resume');
  const first = await run(job(out, ALL, twoByTwo()), { stopAfter: 2 });
  assert.equal(first.steps, 2);
  const ck = join(out, 'checkpoints', 'step-000002');
  const opt = SafetensorsFile.open(join(ck, 'optimizer.safetensors'));
  try {
    const mag = opt.names().filter((n) => n.includes('lora_magnitude_vector.exp_avg'));
    assert.equal(mag.length, 2 * 21, 'exp_avg and exp_avg_sq of every magnitude, from both stages');
    assert.ok(mag.every((n) => opt.readF32(n).some((x) => x !== 0)), 'the magnitude moments are the trained ones, not zeros');
  } finally { opt.close(); }
  const second = await run(job(out, ALL, twoByTwo()));
  assert.equal(second.steps, STEPS);
  assert.ok(adapterBytes(second.adapterDir).equals(adapterBytes(allTwoByTwo!)), 'resumed run = uninterrupted run, bit for bit');
});
