// A worker that runs out of device memory in a step. Micro-batches of more than one row: the coordinator halves the
// rows per micro-batch, says so, re-assigns the stages and goes on from the last checkpoint — the run completes with
// the losses and adapter of the smaller micro-batch asked directly. One row that does not fit: the job ends at once
// with an error that names the worker, its stage and replica, the size and what to do — no hang, no retries. The
// worker process is real (bin/worker.js, gRPC on loopback) and so is the refusal: its cpu backend runs under a
// DQLORA_MEM_LIMIT_BYTES budget (the local workers inherit it).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseJob, loraConfigOf, type JobConfig } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';
import { InProcessExecutor } from '../../coordinator/in-process.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadAdapter } from '../../core/model/adapter.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { BackendError } from '../../common/errors.ts';
import { relErr } from '../engine/helpers.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';

const work = mkdtempSync(join(tmpdir(), 'dqlora-dist-oom-'));
const { model, trainPath } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
let runs = 0;
function job(training: Record<string, unknown>, distributed: Record<string, unknown>): JobConfig {
  return parseJob({
    name: 'dist-oom', model, output_dir: join(work, `out-${runs++}`), backend: 'cpu', http_port: -1,
    data: { train: trainPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear' },
    training: { max_steps: 3, lr: 3e-3, resume: false, ...training },
    distributed: { heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60, ...distributed },
  }, 'test', work);
}
const LOCAL = { workers: 'local' };

async function withBudget<T>(bytes: number, f: () => Promise<T>): Promise<T> {
  const before = process.env.DQLORA_MEM_LIMIT_BYTES;
  process.env.DQLORA_MEM_LIMIT_BYTES = String(bytes); // the local workers inherit it
  try { return await f(); } finally {
    if (before === undefined) delete process.env.DQLORA_MEM_LIMIT_BYTES; else process.env.DQLORA_MEM_LIMIT_BYTES = before;
  }
}

/** One-process run: losses, adapter, and the peak live bytes of its steps (the model included). */
async function inProcess(j: JobConfig): Promise<{ losses: number[]; adapter: Float32Array; peak: number }> {
  const be = createCpuBackend();
  const losses: number[] = [];
  const out = await runJob(j, { backend: be, print: () => {}, observers: [{ onStart: () => be.resetPeakMemory(), onStep: (e) => losses.push(e.loss) }] });
  const ad = loadAdapter(out.adapterDir);
  return { losses, adapter: Float32Array.from(ad.modules.flatMap((m) => [...m.A, ...m.B])), peak: be.peakMemoryInUse };
}

test('micro-batches of 2 do not fit a worker: split to 1, the stages re-assigned, and the run ends with the losses and adapter of micro 1 × 2 asked directly', { timeout: 240_000 }, async () => {
  const two = await inProcess(job({ micro_batch_size: 2 }, {}));
  const one = await inProcess(job({ micro_batch_size: 1, grad_accum: 2 }, {}));
  assert.ok(two.peak > one.peak, `peaks ${two.peak} vs ${one.peak}`);
  const printed: string[] = [];
  const splits: number[][] = [];
  const j = job({ micro_batch_size: 2 }, LOCAL);
  const losses: number[] = [];
  const out = await withBudget(Math.floor((two.peak + one.peak) / 2), () => runJob(j, {
    print: (s) => printed.push(s),
    observers: [{ onStep: (e) => losses.push(e.loss), onMicroBatch: (e) => { if (e.reason === 'out-of-memory') splits.push([e.previousRows!, e.rows]); } }],
  }));
  assert.deepEqual(splits, [[2, 1]]);
  assert.ok(printed.some((p) => /^step 1: out of device memory with micro-batches of 2 sequence\(s\); running it again with micro-batches of 1 \(1 → 2 micro-batches per step/.test(p)), printed.join('\n'));
  assert.ok(printed.some((p) => /^re-assigning the stages; going on from the initial state \(step 0\) with micro-batches of 1/.test(p)), printed.join('\n'));
  assert.equal(out.recoveries, 0, 'a split is not a recovery');
  assert.equal(out.microBatch.rows, 1);
  // the steps that ran: 3 (the failed attempt of step 1 reports no step)
  const tail = losses.slice(-3);
  tail.forEach((l, i) => assert.ok(Math.abs(l - one.losses[i]) / one.losses[i] < 1e-5, `step ${i + 1}: ${l} vs ${one.losses[i]}`));
  const ad = loadAdapter(out.adapterDir);
  const adapter = Float32Array.from(ad.modules.flatMap((m) => [...m.A, ...m.B]));
  assert.ok(relErr(adapter, one.adapter) < 1e-5, `adapters differ by ${relErr(adapter, one.adapter)}`);
});

test('a worker that cannot hold even one sequence ends the job at once, naming the worker, its stage and the size', { timeout: 120_000 }, async () => {
  const j = job({ micro_batch_size: 1 }, LOCAL);
  // What the worker holds once its stage is loaded (the same loader): the budget leaves 4 KiB above it.
  const be = createCpuBackend(), cfg = loadModelConfig(model), tok = loadTokenizer(model);
  InProcessExecutor.open(j, { be, cfg, lora: loraConfigOf(j, cfg), stages: 1, tok, padId: tok.padId!, microBatchSize: 1 });
  const t0 = performance.now();
  await withBudget(be.memoryInUse() + 4096, () => assert.rejects(runJob(j, { print: () => {} }), (e: unknown) => {
    assert.ok(e instanceof BackendError, String(e));
    assert.match(e.message, /^step 1: worker w\d+ \(stage 0, replica 0\) ran out of device memory with micro-batches of 1 sequence\(s\) × \d+ tokens \(training\.micro_batch_size: 1\), which cannot be split further/);
    assert.match(e.message, /out of device memory on cpu/);
    assert.match(e.message, /hint: lower data\.max_length/);
    return true;
  }));
  assert.ok(performance.now() - t0 < 60_000, 'no retries, no step timeout');
});
