// `coordinator status` as a user runs it (a real process) against a real status server; bad invocations fail
// with a message that says what to do, never a stack trace.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createServer, type AddressInfo } from 'node:net';
import { StatusObserver } from '../../coordinator/status/state.ts';
import { startStatusServer } from '../../coordinator/status/server.ts';
import { formatStatus } from '../../coordinator/status/cli.ts';
import { httpPortOf, startReporting } from '../../coordinator/status/index.ts';
import { parseJob } from '../../coordinator/job.ts';
import { createCoordinatorMetrics } from '../../common/metrics.ts';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'coordinator.js');
const run = async (args: string[]): Promise<{ code: number; out: string; err: string }> => {
  try {
    const r = await promisify(execFile)(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 60_000 });
    return { code: 0, out: r.stdout, err: r.stderr };
  } catch (e) {
    const x = e as { code: number; stdout: string; stderr: string };
    return { code: x.code, out: x.stdout, err: x.stderr };
  }
};

/** A port nothing listens on (bound, then closed). */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

function fedStatus(t = { now: 1_000_000 }): StatusObserver {
  const s = new StatusObserver(() => t.now);
  s.onStart({ name: 'kb', outputDir: '/runs/kb', totalSteps: 100, startStep: 0, stepsPerEpoch: 50, stages: 2, replicas: 1, executor: 'workers', backend: 'cuda', trainExamples: 400, validationExamples: 20 });
  s.onWorkers([{ id: 'w-a', stage: 0, replica: 0, state: 'training' }, { id: 'w-b', stage: 1, replica: 0, state: 'training' }]);
  for (let i = 1; i <= 40; i++) {
    t.now += 2000;
    s.onStep({ step: i, totalSteps: 100, loss: 3 - i / 40, lr: 2e-4, gradNorm: 0.75, tokens: 4096, labelTokens: 2000, epoch: i / 50, seconds: i <= 20 ? 1 : 2, tokensPerSecond: 3000, bubble: 0.125,
      stageTimings: [0, 1].map((stage) => ({ stage, replica: 0, forwardSeconds: 0.5, backwardSeconds: 1, idleSeconds: 0.25, allreduceSeconds: 0, pipelineSeconds: 1.75 })) });
  }
  s.onEval({ step: 40, loss: 2.5, perplexity: Math.exp(2.5), tokens: 1000 });
  s.onCheckpoint({ step: 40, dir: '/runs/kb/checkpoints/step-000040', bytes: 3 * 2 ** 20, seconds: 0.5 });
  return s;
}

test('the status snapshot: ETA from the last 20 steps\' mean time, tokens/s, the last step\'s stage timings', () => {
  const snap = fedStatus().snapshot();
  assert.equal(snap.step, 40);
  assert.equal(snap.etaSeconds, 60 * 2, '60 steps left × 2 s (the mean of the last 20 steps)');
  assert.equal(snap.tokensPerSecond, 2048);
  assert.equal(snap.meanTokensPerSecond, (40 * 4096) / 60);
  assert.equal(snap.elapsedSeconds, 80);
  assert.equal(snap.lastStep!.stageTimings.length, 2);
  assert.equal(snap.evalLoss, 2.5);
});

test('coordinator status --url prints the running job; --output DIR finds the URL; bad calls say what to do', async () => {
  const status = fedStatus();
  const server = await startStatusServer({ status, registry: createCoordinatorMetrics().registry, port: 0, host: '127.0.0.1' });
  try {
    const r = await run(['status', '--url', server.url]);
    assert.equal(r.code, 0, r.err);
    assert.equal(r.out.trimEnd(), formatStatus(status.snapshot(), server.url));
    assert.match(r.out, /^job kb — training \(2 stage\(s\) × 1 replica\(s\) of workers, backend cuda\)/);
    assert.match(r.out, /step 40\/100 \(40 %\)  epoch 0\.80  elapsed 1m20s  ETA 2m00s/);
    assert.match(r.out, /loss 2\.0000  eval loss 2\.5000 \(perplexity 12\.18\)  lr 2\.000e-4  grad norm 0\.7500/);
    assert.match(r.out, /tokens\/s 2048 \(mean 2731\)  pipeline bubble 12\.5 %/);
    assert.match(r.out, /last checkpoint: step 40 → \/runs\/kb\/checkpoints\/step-000040 \(3\.00 MiB/);
    assert.match(r.out, /\n  w-b\s+1\s+0\s+training\s+0\.500\s+1\.000\s+0\.250\s+0\.000\n/);
    const j = await run(['status', '--url', server.url + '/', '--json']);
    assert.equal(JSON.parse(j.out).step, 40);
    const dir = mkdtempSync(join(tmpdir(), 'dqlora-status-'));
    writeFileSync(join(dir, 'status-url'), server.url + '\n');
    assert.match((await run(['status', '--output', dir])).out, /^job kb/);
  } finally { await server.close(); }
  const closed = await freePort();
  // exit 2: the invocation is wrong (README "Exit codes"); exit 1: the job cannot be reached
  for (const [args, msg, code] of [
    [['status'], /error: which job\? give --url URL/, 2],
    [['status', '--url', 'localhost:1234'], /error: --url localhost:1234: expected http:\/\/ or https:\/\//, 2],
    [['status', '--url', `http://127.0.0.1:${closed}`], new RegExp(`error: cannot reach http://127\\.0\\.0\\.1:${closed}/status \\(ECONNREFUSED\\)\n  hint: is the job still running\\?`), 1],
    [['status', '--output', '/nonexistent/run'], /error: neither \/nonexistent\/run\/status-url nor \/nonexistent\/run\/status\.json exists\n  hint: /, 2],
    [['start', '--http-port', '70000', '-c', 'x.yaml'], /--http-port.*expected a port 0\.\.65535/, 2],
  ] as const) {
    const r = await run([...args]);
    assert.equal(r.code, code, `${args.join(' ')}: ${r.err}`);
    assert.match(r.err, msg);
    assert.doesNotMatch(r.err, /\n\s+at /, 'no stack trace');
  }
});

test('after the run, status-url is gone and status.json holds the final status, which coordinator status --output prints', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-status-end-'));
  const job = parseJob({ name: 'kb', model: 'm', output_dir: 'run', data: { train: 't.jsonl' } }, 'job.yaml', dir);
  const rep = await startReporting(job, { terminal: 'none' });
  assert.equal(readFileSync(join(job.output_dir, 'status-url'), 'utf8').trim(), rep.server!.url);
  const fed = fedStatus();
  for (const o of rep.observers) o.onStart?.({ ...fed.snapshot().job!, outputDir: job.output_dir });
  for (const o of rep.observers) o.onEnd?.({ status: 'succeeded', step: 40, totalSteps: 40, firstLoss: 3, lastLoss: 2, evalLoss: null, seconds: 9, tokensPerSecond: 100, answers: [{ prompt: 'p', base: 'b', tuned: 't' }] });
  await rep.close();
  assert.equal(existsSync(join(job.output_dir, 'status-url')), false);
  const r = await run(['status', '--output', job.output_dir]);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /^job kb — succeeded .*\(ended; .*status\.json\)\n/);
  assert.match(r.out, /━━ p\n  base model : b\n  fine-tuned : t/);
});

test('the server answers while this thread is busy computing a step (one process: the HTTP side has its own thread)', async () => {
  const status = fedStatus();
  const server = await startStatusServer({ status, registry: createCoordinatorMetrics().registry, port: 0, host: '127.0.0.1' });
  try {
    const out = join(mkdtempSync(join(tmpdir(), 'dqlora-busy-')), 'got.json');
    // another process asks for /status and /metrics while this thread is blocked (as in a long in-process step)
    const child = spawn(process.execPath, ['-e', `Promise.all([fetch('${server.url}/status').then((r) => r.json()), fetch('${server.url}/metrics').then((r) => r.text())])
      .then(([s, m]) => require('node:fs').writeFileSync(${JSON.stringify(out)}, JSON.stringify({ at: Date.now(), step: s.step, metrics: m.length })))`], { stdio: 'ignore' });
    const t0 = Date.now();
    const blockUntil = t0 + 15_000;
    while (!existsSync(out) && Date.now() < blockUntil) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50); // blocked: no event loop turn
    const got = JSON.parse(readFileSync(out, 'utf8')) as { at: number; step: number; metrics: number };
    assert.equal(got.step, 40);
    assert.ok(got.metrics > 100, 'the metrics text was served too');
    assert.ok(got.at < blockUntil, 'answered while this thread was still blocked');
    await new Promise((r) => child.once('exit', r));
  } finally { await server.close(); }
});

test('a port already in use is a config error that names http_port and what to do', async () => {
  const taken = await startStatusServer({ status: new StatusObserver(), registry: createCoordinatorMetrics().registry, port: 0, host: '127.0.0.1' });
  try {
    await assert.rejects(startStatusServer({ status: new StatusObserver(), registry: createCoordinatorMetrics().registry, port: taken.port, host: '127.0.0.1' }),
      { name: 'ConfigError', message: `http_port: 127.0.0.1:${taken.port} is already in use\n  hint: pick another http_port / --http-port, or 0 for an OS-assigned one` });
    assert.throws(() => startStatusServer({ status: new StatusObserver(), registry: createCoordinatorMetrics().registry, port: 70000 }), /http_port: 70000 is not a port/);
  } finally { await taken.close(); }
});

test('http_port: job.yaml default 0 (OS-assigned), -1 off; DQLORA_HTTP_PORT (set by --http-port) overrides; bad values name the field', () => {
  const job = parseJob({ model: 'm', output_dir: 'o', data: { train: 't.jsonl' } }, 'job.yaml', '/tmp');
  assert.equal(job.http_port, 0);
  assert.deepEqual(job.report, []);
  assert.equal(httpPortOf(job, undefined, { DQLORA_HTTP_PORT: '8470' }), 8470);
  assert.equal(httpPortOf(job, -1, { DQLORA_HTTP_PORT: '8470' }), -1);
  assert.throws(() => httpPortOf(job, undefined, { DQLORA_HTTP_PORT: 'abc' }), /DQLORA_HTTP_PORT=abc \(or --http-port\) is not a port/);
  assert.throws(() => parseJob({ model: 'm', output_dir: 'o', data: { train: 't' }, http_port: 70000 }, 'job.yaml', '/tmp'), /job\.yaml: http_port: Too big/);
  assert.throws(() => parseJob({ model: 'm', output_dir: 'o', data: { train: 't' }, report: ['wandb'] }, 'job.yaml', '/tmp'), /job\.yaml: report\.0: Invalid input: expected "tensorboard"/);
});
