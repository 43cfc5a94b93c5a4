// The distributed path end to end, with real processes: worker processes (bin/worker.js) talk gRPC on
// 127.0.0.1 (OS-assigned ports) to the coordinator and to each other, and all-reduce over a real
// nats-server. A tiny model with the example's tokenizer and data is trained by the coordinator (run in this
// process through runJob, as `coordinator start -c job.yaml` does) and compared with the single-process run.
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAdapter } from '../../core/model/adapter.ts';
import { parseJob, type JobConfig } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';

import { natsServerMissing, startNatsServer, type NatsServerHandle } from '../helpers/nats.ts';

const skip = natsServerMissing();
const ROOT = join(import.meta.dirname, '..', '..');
const work = mkdtempSync(join(tmpdir(), 'dqlora-dist-'));
const { model, trainPath, validationPath } = tinyExampleSetup(work);

const STEPS = 5;
/** One job, laid out as given. The step's samples are the same for (R = 1, grad_accum 4) and (R = 2, grad_accum 2). */
function job(out: string, dist: Record<string, unknown>, gradAccum: number): JobConfig {
  return parseJob({
    name: 'dist-test', model, output_dir: out, backend: 'cpu',
    data: { train: trainPath, validation: validationPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear' },
    training: { max_steps: STEPS, micro_batch_size: 2, grad_accum: gradAccum, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, save_every: 2, max_grad_norm: 0.05 },
    distributed: { heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60, ...dist },
  }, 'test', work);
}

const quiet = (): void => {};
const adapterBytes = (dir: string): Buffer => readFileSync(join(dir, 'adapter_model.safetensors'));

/** Largest |a − b| / max|a| over each LoRA tensor. */
function maxRelDiff(a: string, b: string): number {
  const A = loadAdapter(a), B = loadAdapter(b);
  assert.deepEqual(A.modules.map((m) => m.path).sort(), B.modules.map((m) => m.path).sort());
  let worst = 0;
  for (const m of A.modules) {
    const n = B.modules.find((x) => x.path === m.path)!;
    for (const k of ['A', 'B'] as const) {
      let diff = 0, scale = 0;
      for (let i = 0; i < m[k].length; i++) { diff = Math.max(diff, Math.abs(m[k][i] - n[k][i])); scale = Math.max(scale, Math.abs(m[k][i])); }
      worst = Math.max(worst, diff / (scale || 1));
    }
  }
  return worst;
}

let nats: NatsServerHandle | undefined;
let reference: string | undefined;   // single process
let twoByTwo: string | undefined;    // 2 stages × 2 replicas, uninterrupted
before(async () => { if (!skip) nats = await startNatsServer(); });
after(async () => { await nats?.stop(); });

test('2 stages × 2 replicas: the adapter matches the single-process run within 1e-5 and is bit-identical across repeats', { skip, timeout: 120_000 }, async () => {
  const single = await runJob(job(join(work, 'single'), {}, 4), { print: quiet });
  reference = single.adapterDir;
  const a = await runJob(job(join(work, 'dist-a'), { stages: 2, replicas: 2, workers: 'local', nats_url: nats!.url }, 2), { print: quiet });
  const b = await runJob(job(join(work, 'dist-b'), { stages: 2, replicas: 2, workers: 'local', nats_url: nats!.url }, 2), { print: quiet });
  twoByTwo = a.adapterDir;
  assert.equal(a.steps, STEPS);
  assert.ok(Math.abs(a.lastLoss - single.lastLoss) <= 1e-5 * Math.abs(single.lastLoss), `loss ${a.lastLoss} vs ${single.lastLoss}`);
  assert.ok(a.evalLoss !== null && Math.abs(a.evalLoss - single.evalLoss!) <= 1e-5 * single.evalLoss!, `eval loss ${a.evalLoss} vs ${single.evalLoss}`);
  const rel = maxRelDiff(reference, a.adapterDir);
  assert.ok(rel <= 1e-5, `adapter differs from the single-process one by ${rel} (relative)`);
  assert.ok(loadAdapter(a.adapterDir).modules.some((m) => m.B.some((x) => x !== 0)), 'the adapter was trained');
  assert.ok(adapterBytes(a.adapterDir).equals(adapterBytes(b.adapterDir)), 'two runs of the same layout give the same bytes');
  // The checkpoint format is the single-process one (manifest, adapter, optimizer, trainer state).
  for (const f of ['manifest.json', 'optimizer.safetensors', 'trainer_state.json', 'adapter/adapter_config.json']) {
    assert.ok(existsSync(join(work, 'dist-a', 'checkpoints', `step-${String(STEPS).padStart(6, '0')}`, f)), f);
  }
  const summary = JSON.parse(readFileSync(join(work, 'dist-a', 'summary.json'), 'utf8'));
  assert.deepEqual(summary.distributed, { stages: 2, replicas: 2, recoveries: 0 });
});

test('2 stages × 1 replica (no NATS): bit-identical to the single-process adapter', { skip, timeout: 60_000 }, async () => {
  const prompts = ['拓数派#openpie#数据库'];
  const withCompare = (j: JobConfig): JobConfig => ({ ...j, compare: { prompts, max_new_tokens: 4 } });
  const single = await runJob(withCompare(job(join(work, 'single-ga2'), {}, 2)), { print: quiet });
  const p = await runJob(withCompare(job(join(work, 'pipe'), { stages: 2, replicas: 1, workers: 'local' }, 2)), { print: quiet });
  assert.ok(adapterBytes(single.adapterDir).equals(adapterBytes(p.adapterDir)));
  // Local mode answers compare.prompts after the workers exit, with the same answers as the one-process run.
  assert.deepEqual(p.answers, single.answers);
  assert.equal(p.answers.length, 1);
});

test('stop after 2 steps and resume from the checkpoint: bit-identical adapter', { skip, timeout: 120_000 }, async () => {
  assert.ok(twoByTwo, 'needs the first test');
  const out = join(work, 'dist-resume');
  const lines: string[] = [];
  const first = await runJob(job(out, { stages: 2, replicas: 2, workers: 'local', nats_url: nats!.url }, 2), { print: (s) => lines.push(s), stopAfter: 2 });
  assert.equal(first.steps, 2);
  assert.match(lines.join('\n'), /stopped at step 2\/5/);
  const second = await runJob(job(out, { stages: 2, replicas: 2, workers: 'local', nats_url: nats!.url }, 2), { print: (s) => lines.push(s) });
  assert.match(lines.join('\n'), /resumed from .*step-000002 at step 2\/5/);
  assert.equal(second.steps, STEPS);
  assert.ok(adapterBytes(second.adapterDir).equals(adapterBytes(twoByTwo!)), 'resumed run = uninterrupted run, bit for bit');
});

test('a worker killed (SIGKILL) mid-step is reported with its id and stage; the job resumes when a replacement joins', { skip, timeout: 150_000 }, async () => {
  assert.ok(twoByTwo, 'needs the first test');
  const procs: ChildProcess[] = [];
  const startWorker = (address: string, token: string, env: Record<string, string> = {}): void => {
    procs.push(spawn(process.execPath, [join(ROOT, 'bin', 'worker.js'), 'start', '--coordinator', address, '--device', 'cpu'], {
      stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DQLORA_JOB_TOKEN: token, DQLORA_LOG_LEVEL: 'error', ...env },
    }));
  };
  const lines: string[] = [];
  let address = '', token = '';
  const out = join(work, 'dist-kill');
  try {
    const res = await runJob(job(out, { stages: 2, replicas: 2, workers: 4, nats_url: nats!.url, heartbeat_timeout_s: 3 }, 2), {
      jobToken: 'test-token-kill',
      onListening: (a, tk) => {
        address = a; token = tk;
        // One of the four dies when step 3 (0-based) arrives: after the step-2 checkpoint, mid-step for the others.
        startWorker(a, tk, { DQLORA_FAULT_KILL_AT_STEP: '3' });
        for (let i = 0; i < 3; i++) startWorker(a, tk);
      },
      print: (s) => {
        lines.push(s);
        if (s.startsWith('paused;')) startWorker(address, token); // the replacement
      },
    });
    const text = lines.join('\n');
    assert.match(text, /worker failure at step 3: worker w\d+ \(stage [01], replica [01]\) lost: its command stream closed/);
    assert.match(text, /resuming from .*step-000002 \(step 2\)/);
    assert.equal(res.recoveries, 1);
    assert.equal(res.steps, STEPS);
    assert.ok(adapterBytes(res.adapterDir).equals(adapterBytes(twoByTwo!)), 'a crash and a replaced worker change nothing: same bytes');
  } finally {
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  }
});
