// A job's life outside its steps (coordinator/lifecycle.ts, coordinator/metrics-observer.ts), as specifications:
// a finished output_dir (made by a real run) is recognised and left alone; SIGTERM / SIGINT ask for a checkpoint
// and a second signal or the grace period exits at once; back-off grows to a cap; a short outage of a real TCP
// server is ridden out and a long one names the address; recover / fatal events are one JSON line each; the
// metrics tell the job's state and stay unset until their first value.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { loadJob } from '../../coordinator/job.ts';
import { runJob } from '../../coordinator/run.ts';
import { EXIT, finishedRun, installStopSignals, logFatal, logRecover, resumeCommand, startDecision, stoppedMessage } from '../../coordinator/lifecycle.ts';
import { Backoff, ConnectionError, isConnectionError, rideOut } from '../../common/connection.ts';
import { jobMetricsObserver, theoreticalBubble } from '../../coordinator/metrics-observer.ts';
import { createCoordinatorMetrics } from '../../common/metrics.ts';
import { ConfigError } from '../../common/errors.ts';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { freePort } from '../helpers/nats.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

function tinyJob(dir: string, maxSteps: number): string {
  const s = tinyExampleSetup(dir, { shape: { numLayers: 2 } });
  const file = path.join(dir, 'job.yaml');
  fs.writeFileSync(file, [
    `model: ${s.model}`, `output_dir: ${path.join(dir, 'out')}`, 'backend: cpu',
    `data: { train: ${s.trainPath}, validation: ${s.validationPath}, max_length: 32 }`,
    `training: { max_steps: ${maxSteps}, micro_batch_size: 2, grad_accum: 1, save_every: 0 }`, '',
  ].join('\n'));
  return file;
}

test('a finished output_dir: recognised from its files, "done" leaves it alone; --fresh and --max-steps above it run', { timeout: 120_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-finished-'));
  try {
    const job = loadJob(tinyJob(dir, 2));
    assert.equal(finishedRun(job.output_dir), null, 'nothing there yet');
    assert.deepEqual(startDecision(job.output_dir), { action: 'run' });
    await runJob(job, { print: () => {} });
    const f = finishedRun(job.output_dir);
    assert.ok(f);
    assert.equal(f.step, 2);
    assert.equal(f.totalSteps, 2);
    assert.equal(f.adapterDir, path.join(job.output_dir, 'adapter'));
    assert.match(f.checkpointDir, /step-000002$/);

    const done = startDecision(job.output_dir);
    assert.equal(done.action, 'done');
    assert.match((done as { message: string }).message, /already holds a finished run: 2\/2 steps.*Nothing to do; nothing was changed.*--fresh.*--max-steps N with N above 2/s);
    const notAbove = startDecision(job.output_dir, { maxSteps: 2 });
    assert.equal(notAbove.action, 'done');
    assert.match((notAbove as { message: string }).message, /--max-steps 2 is not above the 2 steps done/);
    const ext = startDecision(job.output_dir, { maxSteps: 5 });
    assert.equal(ext.action, 'extend');
    assert.match((ext as { message: string }).message, /resuming from .*step-000002 to train 3 more/);
    assert.equal(startDecision(job.output_dir, { fresh: true }).action, 'fresh');

    // A run stopped before its end is not finished: its newest checkpoint has fewer steps than the total.
    fs.rmSync(path.join(job.output_dir, 'summary.json'));
    assert.equal(finishedRun(job.output_dir), null, 'no summary: not finished');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('SIGTERM asks for a checkpoint (abort signal, state), a second signal exits 130; the grace period too', async () => {
  const proc = new EventEmitter();
  const exits: number[] = [];
  const lines: string[] = [];
  const l = pino({ level: 'info' }, new Writable({ write(c, _e, cb) { lines.push(String(c)); cb(); } }));
  const s = installStopSignals({ proc: proc as unknown as NodeJS.Process, exit: (c) => exits.push(c), graceMs: 60_000, log: l });
  assert.equal(s.requested, false);
  assert.equal(s.abort.aborted, false);
  proc.emit('SIGTERM', 'SIGTERM');
  assert.equal(await s.whenRequested, 'SIGTERM');
  assert.equal(s.requested, true);
  assert.equal(s.signalName, 'SIGTERM');
  assert.equal(s.abort.aborted, true);
  assert.deepEqual(exits, [], 'the first signal does not exit: the loop checkpoints first');
  proc.emit('SIGINT', 'SIGINT');
  assert.deepEqual(exits, [EXIT.interrupted]);
  s.dispose();
  assert.equal(proc.listenerCount('SIGTERM') + proc.listenerCount('SIGINT'), 0, 'dispose removes the handlers');
  const ev = lines.map((x) => JSON.parse(x) as { event: string; signal: string; forced?: boolean });
  assert.deepEqual(ev.map((e) => [e.event, e.signal, e.forced ?? false]), [['stop', 'SIGTERM', false], ['stop', 'SIGINT', true]]);

  const p2 = new EventEmitter();
  const exits2: number[] = [];
  const s2 = installStopSignals({ proc: p2 as unknown as NodeJS.Process, exit: (c) => exits2.push(c), graceMs: 50, log: pino({ level: 'silent' }) });
  p2.emit('SIGINT', 'SIGINT');
  await new Promise((r) => setTimeout(r, 120));
  assert.deepEqual(exits2, [EXIT.interrupted], 'no checkpoint within the grace period: exit without one');
  s2.dispose();
});

test('a real process: SIGTERM reaches the handler, the loop finishes its checkpoint and exits 75 with the resume command', { timeout: 30_000 }, async () => {
  const script = `
    import { installStopSignals, stoppedMessage, EXIT } from ${JSON.stringify(path.join(root, 'coordinator', 'lifecycle.ts'))};
    const stop = installStopSignals({ graceMs: 10000 });
    let step = 0;
    const t = setInterval(() => { step++; }, 5);
    process.stdout.write('ready\\n');
    const sig = await stop.whenRequested;
    clearInterval(t);
    process.stdout.write(stoppedMessage({ signalName: sig, step: 7, totalSteps: 40, checkpointDir: 'out/checkpoints/step-000007', argv: ['node', 'cli', 'start', '-c', 'job.yaml', '--stop-after', '3'] }) + '\\n');
    process.exit(EXIT.stopped);
  `;
  const p = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: root, env: { ...process.env, DQLORA_LOG_LEVEL: 'silent' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  p.stdout!.on('data', (d: Buffer) => { out += d; });
  while (!out.includes('ready')) await new Promise((r) => setTimeout(r, 20));
  p.kill('SIGTERM');
  const code = await new Promise<number | null>((r) => p.once('exit', r));
  assert.equal(code, 75);
  assert.match(out, /stopped by SIGTERM at step 7\/40; checkpoint out\/checkpoints\/step-000007\nresume with: npx coordinator start -c job.yaml\n\(exit code 75/);
});

test('the resume command drops --stop-after and --fresh and quotes what the shell needs', () => {
  assert.equal(resumeCommand(['node', 'c', 'start', '-c', 'my job.yaml', '--fresh', '--stop-after', '5', '--max-steps', '9']), "npx coordinator start -c 'my job.yaml' --max-steps 9");
  assert.equal(resumeCommand(['node', 'c', 'start']), 'npx coordinator start');
});

test('back-off doubles from its start to the cap, jitter within ±20 %, reset starts over; bad settings are refused', () => {
  const b = new Backoff({ initialMs: 100, factor: 2, maxMs: 1000, jitter: 0 });
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => b.next()), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(b.attempt, 6);
  b.reset();
  assert.equal(b.next(), 100);
  const lo = new Backoff({ initialMs: 1000, jitter: 0.2, random: () => 0 });
  const hi = new Backoff({ initialMs: 1000, jitter: 0.2, random: () => 0.999999 });
  assert.equal(lo.next(), 800);
  assert.equal(hi.next(), 1200);
  assert.throws(() => new Backoff({ initialMs: 0 }), /initialMs > 0/);
  assert.throws(() => new Backoff({ initialMs: 10, maxMs: 5 }), /maxMs ≥ initialMs/);
});

const dial = (port: number) => () => new Promise<string>((resolve, reject) => {
  const s = net.connect(port, '127.0.0.1');
  s.once('connect', () => { s.end(); resolve('connected'); });
  s.once('error', reject);
});

test('an outage shorter than the window is ridden out (a real server that comes up late); a longer one names the address', { timeout: 30_000 }, async () => {
  const port = await freePort();
  const lines: string[] = [];
  const l = pino({ level: 'info' }, new Writable({ write(c, _e, cb) { lines.push(String(c)); cb(); } }));
  const server = net.createServer((s) => s.end());
  const up = setTimeout(() => server.listen(port, '127.0.0.1'), 400);
  try {
    const r = await rideOut(dial(port), { what: 'NATS', address: `nats://127.0.0.1:${port}`, windowMs: 10_000, backoff: new Backoff({ initialMs: 50, maxMs: 200, jitter: 0 }), log: l });
    assert.equal(r, 'connected');
    const ev = lines.map((x) => JSON.parse(x) as { event: string; address: string });
    assert.ok(ev.filter((e) => e.event === 'outage').length >= 2, 'retried while down');
    assert.equal(ev.at(-1)!.event, 'reconnected');
    assert.equal(ev[0].address, `nats://127.0.0.1:${port}`);
  } finally {
    clearTimeout(up);
    server.close();
  }

  const dead = await freePort();
  const t0 = Date.now();
  await assert.rejects(
    rideOut(dial(dead), { what: 'the coordinator', address: `127.0.0.1:${dead}`, windowMs: 300, backoff: new Backoff({ initialMs: 50, maxMs: 100, jitter: 0 }), log: pino({ level: 'silent' }) }),
    (e: unknown) => {
      assert.ok(e instanceof ConnectionError);
      assert.match(e.message, new RegExp(`cannot reach the coordinator at 127\\.0\\.0\\.1:${dead} \\(unreachable for \\d+ s\\): .*ECONNREFUSED`));
      assert.match(e.message, /hint: check that the coordinator is running/);
      return true;
    },
  );
  assert.ok(Date.now() - t0 < 2000, 'gives up once the window is spent');
  // Anything else is not an outage: thrown at once, no retry.
  let calls = 0;
  await assert.rejects(rideOut(async () => { calls++; throw new ConfigError('bad'); }, { what: 'x', address: 'y', windowMs: 10_000 }), /bad/);
  assert.equal(calls, 1);
  assert.equal(isConnectionError({ code: 14, details: 'No connection established' }), true, 'gRPC UNAVAILABLE');
  assert.equal(isConnectionError(new Error('x', { cause: Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }) })), true);
});

test('recover and fatal are one structured JSON line each; a user mistake carries its hint and no stack', () => {
  const lines: string[] = [];
  const l = pino({ level: 'info' }, new Writable({ write(c, _e, cb) { lines.push(String(c)); cb(); } }));
  logRecover({ step: 12, attempt: 2, maxRecoveries: 3, reason: 'worker w3 (stage 1) lost: no heartbeat for 10 s', resumeFrom: 'out/checkpoints/step-000010', backoffMs: 2000, worker: 'w3', stage: 1 }, l);
  logFatal(new ConfigError('training.lr: must be > 0', { hint: 'set a positive learning rate' }), { step: 0 }, l);
  logFatal(new TypeError('x is undefined'), {}, l);
  const [rec, fatal, bug] = lines.map((x) => JSON.parse(x) as Record<string, unknown>);
  assert.deepEqual({ ...rec, time: undefined, pid: undefined, hostname: undefined, msg: undefined }, {
    level: 40, event: 'recover', step: 12, attempt: 2, maxRecoveries: 3, reason: 'worker w3 (stage 1) lost: no heartbeat for 10 s',
    resumeFrom: 'out/checkpoints/step-000010', backoffMs: 2000, worker: 'w3', stage: 1, time: undefined, pid: undefined, hostname: undefined, msg: undefined,
  });
  assert.equal(fatal.event, 'fatal');
  assert.equal(fatal.kind, 'ConfigError');
  assert.equal(fatal.error, 'training.lr: must be > 0');
  assert.equal(fatal.hint, 'set a positive learning rate');
  assert.equal(fatal.stack, undefined);
  assert.equal(bug.kind, 'TypeError');
  assert.match(String(bug.stack), /TypeError: x is undefined/, 'a bug keeps its stack');
});

test('metrics from the job events: unset until the first value, job state, recoveries, theoretical bubble, no `job` label clash', async () => {
  const m = createCoordinatorMetrics({ defaultLabels: { job: 'kb' }, processMetrics: false });
  const text = async () => m.registry.metrics();
  const sample = (t: string, name: string) => t.split('\n').filter((x) => x.startsWith(name + '{') || x.startsWith(name + ' '));
  let t = await text();
  for (const name of ['dqlora_train_loss', 'dqlora_eval_loss', 'dqlora_checkpoint_size_bytes', 'dqlora_grad_norm', 'dqlora_pipeline_bubble_ratio']) {
    assert.deepEqual(sample(t, name), [], `${name} has no sample before its first value`);
  }
  assert.ok(sample(t, 'dqlora_job_state').includes('dqlora_job_state{state="starting",dqlora_job="kb"} 1'));
  assert.ok(!/[{,]job="/.test(t), 'no `job` label (Prometheus would rename it exported_job)');

  const obs = jobMetricsObserver(m, { replicas: 2, microBatches: 4, saveEvery: 0, now: () => 1234 });
  obs.onStart!({ name: 'kb', outputDir: 'o', totalSteps: 10, startStep: 0, stepsPerEpoch: 10, stages: 2, replicas: 2, executor: 'workers', backend: 'cpu', trainExamples: 1, validationExamples: 1 });
  obs.onStep!({ step: 1, totalSteps: 10, loss: 2.5, lr: 1e-4, gradNorm: 0.5, tokens: 100, labelTokens: 50, epoch: 0.1, seconds: 2, tokensPerSecond: 50, bubble: 0.3, stageTimings: [
    { stage: 0, replica: 0, forwardSeconds: 0.1, backwardSeconds: 0.2, idleSeconds: 0.1, allreduceSeconds: 0.05, pipelineSeconds: 1 },
    { stage: 0, replica: 1, forwardSeconds: 0.1, backwardSeconds: 0.2, idleSeconds: 0.1, allreduceSeconds: 0.05, pipelineSeconds: 1 },
  ] });
  obs.onRecovery!({ step: 1, attempt: 1, reason: 'lost', resumeFrom: '' });
  t = await text();
  assert.ok(sample(t, 'dqlora_job_state').includes('dqlora_job_state{state="recovering",dqlora_job="kb"} 1'));
  assert.ok(sample(t, 'dqlora_job_state').includes('dqlora_job_state{state="running",dqlora_job="kb"} 0'));
  assert.deepEqual(sample(t, 'dqlora_recoveries_total'), ['dqlora_recoveries_total{dqlora_job="kb"} 1']);
  assert.deepEqual(sample(t, 'dqlora_pipeline_bubble_theoretical_ratio'), [`dqlora_pipeline_bubble_theoretical_ratio{dqlora_job="kb"} ${1 / 5}`]);
  assert.deepEqual(sample(t, 'dqlora_checkpoint_interval_steps'), ['dqlora_checkpoint_interval_steps{dqlora_job="kb"} 0']);
  assert.deepEqual(sample(t, 'dqlora_train_loss'), ['dqlora_train_loss{dqlora_job="kb"} 2.5']);
  assert.deepEqual(sample(t, 'dqlora_last_step_timestamp_seconds'), ['dqlora_last_step_timestamp_seconds{dqlora_job="kb"} 1234']);
  assert.deepEqual(sample(t, 'dqlora_eval_loss'), [], 'still no evaluation');
  assert.ok(t.includes('dqlora_allreduce_duration_seconds_count{dqlora_job="kb",stage="0"} 2'));
  obs.onEnd!({ status: 'succeeded', step: 10, totalSteps: 10, firstLoss: 2.5, lastLoss: 1, evalLoss: 1.2, seconds: 1, tokensPerSecond: 1, answers: [] });
  t = await text();
  assert.ok(sample(t, 'dqlora_job_state').includes('dqlora_job_state{state="succeeded",dqlora_job="kb"} 1'));
  assert.equal(sample(t, 'dqlora_job_state').filter((x) => x.endsWith(' 1')).length, 1, 'exactly one state is 1');
  assert.deepEqual(sample(t, 'dqlora_eval_loss'), ['dqlora_eval_loss{dqlora_job="kb"} 1.2']);
  assert.equal(theoreticalBubble(1, 8), 0);
  assert.equal(theoreticalBubble(4, 4), 3 / 7);
});

test('a job that fails before its first step (a missing data file) shows state "failed" on /metrics during the linger', { timeout: 60_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-fail-metrics-'));
  const saved = process.env.DQLORA_METRICS_LINGER_S;
  process.env.DQLORA_METRICS_LINGER_S = '3';
  try {
    const job = loadJob(tinyJob(dir, 2));
    job.data.train = path.join(dir, 'missing.jsonl');
    const port = await freePort();
    job.distributed.metrics_port = port;
    const run = runJob(job, { print: () => {} });
    const failed = run.then(() => undefined, (e: Error) => e);
    let text = '';
    const t0 = Date.now();
    while (Date.now() - t0 < 20_000 && !/dqlora_job_state\{state="failed"[^}]*\} 1/.test(text)) {
      text = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text(), () => '');
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.match(text, /dqlora_job_state\{state="failed",dqlora_job="job"\} 1/);
    const e = await failed;
    assert.ok(e instanceof Error);
    assert.match(e.message, /missing\.jsonl/);
  } finally {
    if (saved === undefined) delete process.env.DQLORA_METRICS_LINGER_S; else process.env.DQLORA_METRICS_LINGER_S = saved;
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
