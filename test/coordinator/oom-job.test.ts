// OOM-safe micro-batches through the job loop, on the cpu backend under a real memory budget (the same refusal a full
// GPU gives): a requested micro-batch that does not fit is split and the run ends with the losses and adapter of the
// run that asked for the smaller micro-batch directly (1e-5), and says so; dropout masks and NEFTune noise do not
// change with the split; `micro_batch_size: auto` picks the size the budget allows and trains exactly what that size
// asked directly trains; bad values and unsupported combinations are refused naming the field.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseJob, loraConfigOf, type JobConfig } from '../../coordinator/job.ts';
import { runJob, type RunOutcome } from '../../coordinator/run.ts';
import { InProcessExecutor } from '../../coordinator/in-process.ts';
import { probeLength } from '../../coordinator/features.ts';
import { buildDataset } from '../../coordinator/data/dataset.ts';
import type { MicroBatchEvent } from '../../coordinator/events.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadAdapter } from '../../core/model/adapter.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { ConfigError } from '../../common/errors.ts';
import { relErr } from '../engine/helpers.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';

const work = mkdtempSync(join(tmpdir(), 'dqlora-oom-job-'));
const setup = tinyExampleSetup(work, { shape: { numLayers: 2 } });
let runs = 0;

function job(training: Record<string, unknown>, extra: Record<string, unknown> = {}): JobConfig {
  return parseJob({
    name: 'oom', model: setup.model, output_dir: join(work, `run-${runs++}`), backend: 'cpu', http_port: -1,
    data: { train: setup.trainPath, validation: setup.validationPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear' },
    training: { max_steps: 4, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, resume: false, ...training },
    ...extra,
  }, 'oom test job', work);
}

interface Trained { outcome: RunOutcome; losses: number[]; adapter: Float32Array; printed: string[]; events: MicroBatchEvent[]; stepPeak: number; summary: { microBatch: RunOutcome['microBatch'] } }

/** Runs `j` in this process on a cpu backend with `limit` bytes of budget; the peak is measured after the model loaded. */
async function train(j: JobConfig, limit?: number): Promise<Trained> {
  const be = createCpuBackend({ memoryLimitBytes: limit });
  const losses: number[] = [], printed: string[] = [], events: MicroBatchEvent[] = [];
  const outcome = await runJob(j, {
    backend: be, print: (s) => printed.push(s),
    observers: [{ onStart: () => be.resetPeakMemory(), onStep: (e) => losses.push(e.loss), onMicroBatch: (e) => events.push(e) }],
  });
  const ad = loadAdapter(outcome.adapterDir);
  const adapter = Float32Array.from(ad.modules.flatMap((m) => [...m.A, ...m.B]));
  const summary = JSON.parse(readFileSync(join(j.output_dir, 'summary.json'), 'utf8')) as Trained['summary'];
  return { outcome, losses, adapter, printed, events, stepPeak: be.peakMemoryInUse, summary };
}

function close(a: Trained, b: Trained, what: string): void {
  assert.equal(a.losses.length, b.losses.length);
  a.losses.forEach((l, i) => assert.ok(Math.abs(l - b.losses[i]) / Math.abs(b.losses[i]) < 1e-5, `${what}: step ${i + 1} loss ${l} vs ${b.losses[i]}`));
  assert.ok(relErr(a.adapter, b.adapter) < 1e-5, `${what}: adapters differ by ${relErr(a.adapter, b.adapter)}`);
}

test('micro_batch_size 8 does not fit the budget: split to 4 (grad accumulation 2), said so, and the same losses and adapter as micro 4 × 2 asked directly', async () => {
  const whole = await train(job({ micro_batch_size: 8 }));
  const direct = await train(job({ micro_batch_size: 4, grad_accum: 2 }));
  assert.ok(whole.stepPeak > direct.stepPeak * 1.3, `peaks ${whole.stepPeak} vs ${direct.stepPeak}`);
  const limit = Math.floor((whole.stepPeak + direct.stepPeak) / 2);
  const split = await train(job({ micro_batch_size: 8 }), limit);

  assert.ok(split.stepPeak <= limit);
  const first = split.outcome.microBatch.splits[0];
  assert.ok(first, 'a split happened');
  assert.deepEqual([first.phase, first.fromRows, first.toRows, first.fromMicroBatches, first.toMicroBatches], ['train', 8, 4, 1, 2]);
  assert.equal(split.outcome.microBatch.rows, 4);
  assert.equal(split.outcome.microBatch.splits.length, 1, 'halves of 8 fit: no second split');
  assert.deepEqual(split.summary.microBatch.splits.map((s) => [s.step, s.fromRows, s.toRows]), [[first.step, 8, 4]], 'summary.json records it');
  const line = split.printed.find((p) => /out of device memory/.test(p));
  assert.match(line ?? '', new RegExp(`^step ${first.step}: out of device memory with micro-batches of 8 sequence\\(s\\); running it again with micro-batches of 4 \\(1 → 2 micro-batches per step`));
  assert.deepEqual(split.events.map((e) => [e.reason, e.rows, e.previousRows]), [['requested', 8, undefined], ['out-of-memory', 4, 8]]);

  close(split, direct, 'split vs micro 4 directly');
  close(split, whole, 'split vs micro 8 without a budget');
  assert.ok(Math.abs(split.outcome.evalLoss! - direct.outcome.evalLoss!) < 1e-5 * direct.outcome.evalLoss!, 'evaluation too');
});

test('dropout masks and NEFTune noise are keyed per (seed, step, sample, position): the split run equals the unsplit one', async () => {
  const features = { micro_batch_size: 8, neftune_noise_alpha: 5 };
  const whole = await train(job(features, { lora: { r: 4, alpha: 8, dropout: 0.2, target_modules: 'all-linear' } }));
  const half = await train(job({ ...features, micro_batch_size: 4, grad_accum: 2 }, { lora: { r: 4, alpha: 8, dropout: 0.2, target_modules: 'all-linear' } }));
  const limit = Math.floor((whole.stepPeak + half.stepPeak) / 2);
  const split = await train(job(features, { lora: { r: 4, alpha: 8, dropout: 0.2, target_modules: 'all-linear' } }), limit);
  assert.ok(split.outcome.microBatch.splits.length >= 1);
  // The pieces keep the micro-batch's padded length T, which sets NEFTune's noise scale, as the unsplit run's.
  close(split, whole, 'split vs unsplit with dropout 0.2 and NEFTune 5');
});

test('micro_batch_size: auto picks the largest size the budget allows (8 does not fit, 4 does) and trains exactly what micro 4 × 2 trains', async () => {
  const j = job({ micro_batch_size: 'auto', batch_size: 8 });
  // the probe's own peaks, measured the way the job probes (the model in this process, sequences of the longest example)
  const tok = loadTokenizer(j.model), cfg = loadModelConfig(j.model);
  const ds = buildDataset({ trainPath: j.data.train, validationPath: j.data.validation, dedup: j.data.dedup, seed: j.training.seed, maxLength: j.data.max_length, onError: 'throw' }, tok);
  const T = probeLength(j, ds.train);
  const probePeak = (rows: number): number => {
    const be = createCpuBackend({ memoryLimitBytes: 2 ** 40 });
    const ex = InProcessExecutor.open(j, { be, cfg, lora: loraConfigOf(j, cfg), stages: 1, tok, padId: tok.padId!, microBatchSize: rows });
    be.resetPeakMemory();
    assert.equal(ex.autoMicroBatchSize(rows, T).rows, rows);
    return be.peakMemoryInUse;
  };
  const p8 = probePeak(8), p4 = probePeak(4);
  const limit = Math.floor((p8 + p4) / 2);
  const auto = await train(j, limit);
  assert.deepEqual(auto.outcome.microBatch.auto, { rows: 4, probed: true, tried: [{ rows: 8, fits: false, error: auto.outcome.microBatch.auto?.tried?.[0]?.error }, { rows: 4, fits: true }] });
  assert.match(auto.outcome.microBatch.auto!.tried[0].error!, /out of device memory on cpu/);
  assert.ok(auto.printed.some((p) => p.startsWith(`micro_batch_size: auto → 4 (gradient accumulation 2 for batch_size 8; probed with ${T}-token sequences: 8 out of memory, 4 fits)`)), auto.printed.join('\n'));
  assert.deepEqual(auto.events.map((e) => [e.reason, e.rows, e.batchSize]), [['auto', 4, 8]]);
  assert.equal(auto.outcome.microBatch.splits.length, 0, 'what the probe picked fits every step');
  const direct = await train(job({ micro_batch_size: 4, grad_accum: 2 }));
  assert.deepEqual(auto.losses, direct.losses, 'the probe left nothing behind: the same bits as asking for 4 × 2');
  assert.deepEqual(auto.adapter, direct.adapter);
});

test('micro_batch_size: auto on the cpu backend without a budget takes batch_size without probing, and says so', async () => {
  const auto = await train(job({ micro_batch_size: 'auto', batch_size: 4, max_steps: 2 }));
  assert.deepEqual(auto.outcome.microBatch.auto, { rows: 4, probed: false, tried: [] });
  assert.ok(auto.printed.some((p) => /^micro_batch_size: auto → 4 \(gradient accumulation 1 for batch_size 4; the cpu backend without DQLORA_MEM_LIMIT_BYTES is not probed\)/.test(p)));
});

test('job.yaml: bad micro-batch values and unsupported combinations are refused, naming the fields', () => {
  const bad = (training: Record<string, unknown>, re: RegExp, extra: Record<string, unknown> = {}): void => {
    assert.throws(() => job(training, extra), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message), `${JSON.stringify(training)} should fail with ${re}`);
  };
  bad({ micro_batch_size: 0 }, /training\.micro_batch_size: expected a positive integer or 'auto', got 0/);
  bad({ micro_batch_size: 'huge' }, /training\.micro_batch_size: expected a positive integer or 'auto', got "huge"/);
  bad({ micro_batch_size: 2.5 }, /training\.micro_batch_size: expected a positive integer or 'auto', got 2\.5/);
  bad({ micro_batch_size: 'auto' }, /training\.micro_batch_size: auto needs training\.batch_size/);
  bad({ micro_batch_size: 'auto', batch_size: 0 }, /training\.batch_size: Too small/);
  bad({ micro_batch_size: 'auto', batch_size: 16, grad_accum: 4 }, /training\.grad_accum: 4 cannot be combined with training\.micro_batch_size: auto[^]*batch_size: 64/);
  bad({ micro_batch_size: 4, batch_size: 16 }, /training\.batch_size is only read with training\.micro_batch_size: auto/);
  bad({ micro_batch_size: 'auto', batch_size: 16 }, /training\.micro_batch_size: auto is not supported with distributed\.workers: "local"/, { distributed: { workers: 'local' } });
  // what is accepted
  assert.equal(job({ micro_batch_size: 'auto', batch_size: 16, grad_accum: 1 }).training.micro_batch_size, 'auto');
  assert.equal(job({ micro_batch_size: 4 }).training.batch_size, undefined);
});
