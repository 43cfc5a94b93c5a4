// A worker that runs out of device memory in a step: the job ends at once with an error that names the worker, its
// stage and replica, the micro-batch size and what to do — no hang, no roll-back-and-retry of a step that would fail
// the same way. Workers do not split micro-batches (the one-process executor does). The worker process is real
// (bin/worker.js, gRPC on loopback) and so is the refusal: its cpu backend runs under a DQLORA_MEM_LIMIT_BYTES budget
// that holds the model but not a micro-batch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseJob, loraConfigOf } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';
import { InProcessExecutor } from '../../coordinator/in-process.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { BackendError } from '../../common/errors.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';

test('a worker out of device memory ends the job at once, naming the worker, its stage and the micro-batch size', { timeout: 120_000 }, async () => {
  const work = mkdtempSync(join(tmpdir(), 'dqlora-dist-oom-'));
  const { model, trainPath } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  const job = parseJob({
    name: 'dist-oom', model, output_dir: join(work, 'out'), backend: 'cpu', http_port: -1,
    data: { train: trainPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear' },
    training: { max_steps: 3, micro_batch_size: 2, lr: 3e-3, resume: false },
    distributed: { workers: 'local', heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60 },
  }, 'test', work);
  // What the worker holds once its stage is loaded (the same loader): the budget leaves 4 KiB above it.
  const be = createCpuBackend(), cfg = loadModelConfig(model), tok = loadTokenizer(model);
  InProcessExecutor.open(job, { be, cfg, lora: loraConfigOf(job, cfg), stages: 1, tok, padId: tok.padId!, microBatchSize: 2 });
  const before = process.env.DQLORA_MEM_LIMIT_BYTES;
  process.env.DQLORA_MEM_LIMIT_BYTES = String(be.memoryInUse() + 4096);   // the local workers inherit it
  const t0 = performance.now();
  try {
    await assert.rejects(runJob(job, { print: () => {} }), (e: unknown) => {
      assert.ok(e instanceof BackendError, String(e));
      assert.match(e.message, /^step 1: worker w\d+ \(stage 0, replica 0\) ran out of device memory with micro-batches of 2 sequence\(s\) × \d+ tokens \(training\.micro_batch_size: 2\)/);
      assert.match(e.message, /out of device memory on cpu/);
      assert.match(e.message, /hint: lower training\.micro_batch_size \(e\.g\. 1\) and raise training\.grad_accum/);
      return true;
    });
  } finally {
    if (before === undefined) delete process.env.DQLORA_MEM_LIMIT_BYTES; else process.env.DQLORA_MEM_LIMIT_BYTES = before;
  }
  assert.ok(performance.now() - t0 < 60_000, 'no retries, no step timeout');
});
