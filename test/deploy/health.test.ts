// Liveness and readiness mean different things: /healthz answers while the process serves HTTP, /readyz only
// once the worker can take a step (a stage loaded). Checked over real HTTP, and on a real `worker start` process
// whose coordinator is not up yet (alive, not ready).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Registry } from 'prom-client';
import { serveMetrics } from '../../common/metrics.ts';
import { WorkerHealth } from '../../worker/health.ts';
import { WorkerState } from '../../proto/gen/dqlora/v1/control.ts';
import { freePort } from '../helpers/nats.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

async function get(port: number, p: string): Promise<{ status: number; body: string }> {
  const r = await fetch(`http://127.0.0.1:${port}${p}`);
  return { status: r.status, body: await r.text() };
}

test('a worker is alive from the start and ready only in the states where it can take a step', async () => {
  const health = new WorkerHealth();
  const srv = await serveMetrics(new Registry(), 0, '127.0.0.1', health);
  try {
    let r = await get(srv.port, '/readyz');
    assert.equal(r.status, 503);
    assert.match(r.body, /not ready: registering with the coordinator/);
    assert.equal((await get(srv.port, '/healthz')).status, 200);

    let state = WorkerState.WORKER_STATE_REGISTERED;
    health.track(() => state);
    const expect: [WorkerState, number, RegExp][] = [
      [WorkerState.WORKER_STATE_REGISTERED, 503, /waiting for a stage assignment/],
      [WorkerState.WORKER_STATE_LOADING, 503, /loading and quantizing its stage/],
      [WorkerState.WORKER_STATE_READY, 200, /^ready: stage loaded, idle/],
      [WorkerState.WORKER_STATE_TRAINING, 200, /^ready: running a step/],
      [WorkerState.WORKER_STATE_CHECKPOINTING, 200, /^ready: uploading its state/],
      [WorkerState.WORKER_STATE_FAILED, 503, /failed/],
      [WorkerState.WORKER_STATE_STOPPED, 503, /stopped/],
    ];
    for (const [s, status, body] of expect) {
      state = s;
      r = await get(srv.port, '/readyz');
      assert.equal(r.status, status, `readiness in state ${WorkerState[s]}`);
      assert.match(r.body, body);
      const live = await get(srv.port, '/healthz');
      assert.equal(live.status, 200, `alive in state ${WorkerState[s]}`);
      assert.match(live.body, /^alive for \d+ s/);
    }
    // A check that throws is "not ok", never a 500 with a stack trace.
    health.track(() => { throw new Error('boom'); });
    r = await get(srv.port, '/readyz');
    assert.equal(r.status, 503);
    assert.equal(r.body, 'health check failed: boom\n');
  } finally {
    await srv.close();
  }
});

test('without checks both probes answer ok (the coordinator), unknown paths name the endpoints', async () => {
  const srv = await serveMetrics(new Registry(), 0, '127.0.0.1');
  try {
    assert.deepEqual(await get(srv.port, '/healthz'), { status: 200, body: 'ok\n' });
    assert.deepEqual(await get(srv.port, '/readyz'), { status: 200, body: 'ok\n' });
    assert.deepEqual(await get(srv.port, '/x'), { status: 404, body: 'not found: try /metrics, /healthz or /readyz\n' });
  } finally {
    await srv.close();
  }
});

test('a real worker process waiting for its coordinator: /healthz 200, /readyz 503 "registering"', { timeout: 60_000 }, async () => {
  const [metrics, deadCoordinator] = [await freePort(), await freePort()];
  const p = spawn(process.execPath, [path.join(root, 'bin', 'worker.js'), 'start', '--coordinator', `127.0.0.1:${deadCoordinator}`, '--device', 'cpu', '--metrics-port', String(metrics)], {
    cwd: root, env: { PATH: process.env.PATH ?? '', DQLORA_JOB_TOKEN: 'health-test-token', DQLORA_LOG_LEVEL: 'warn' }, stdio: 'ignore',
  });
  try {
    let live = { status: 0, body: '' };
    for (let t = 0; t < 400 && live.status !== 200; t++) {
      live = await get(metrics, '/healthz').catch(() => ({ status: 0, body: '' }));
      if (live.status !== 200) await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(live.status, 200, 'liveness answers while the worker retries its registration');
    const ready = await get(metrics, '/readyz');
    assert.equal(ready.status, 503);
    assert.match(ready.body, /not ready: registering with the coordinator/);
  } finally {
    p.kill('SIGKILL');
  }
});
