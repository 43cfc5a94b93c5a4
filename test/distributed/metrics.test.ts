// common/metrics.ts: both registries scraped over HTTP on 127.0.0.1 and checked by `promtool check metrics`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createCoordinatorMetrics, createWorkerMetrics, serveMetrics } from '../../common/metrics.ts';

const promtoolMissing = spawnSync('promtool', ['--version'], { stdio: 'ignore' }).error
  ? 'promtool is not installed (apt-get install prometheus); skipping the promtool check' : undefined;

async function get(port: number, path: string): Promise<{ status: number; type: string; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, type: res.headers.get('content-type') ?? '', body: await res.text() };
}

function promtool(text: string): { code: number | null; out: string } {
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  return { code: r.status, out: (r.stdout + r.stderr).trim() };
}

/** Value of one sample line, e.g. sample(text, 'dqlora_workers{state="ready"}'). */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

test('coordinator metrics: served on /metrics with the values set, and promtool finds no problems', async () => {
  const m = createCoordinatorMetrics();
  m.loss.set(2.5);
  m.evalLoss.set(2.75);
  m.learningRate.set(2e-4);
  m.gradNorm.set(0.125);
  m.tokensPerSecond.set(1234);
  m.tokens.inc(4096);
  m.steps.inc();
  m.stepDuration.observe(1.5);
  m.stageDuration.observe({ stage: '0', phase: 'forward' }, 0.2);
  m.stageDuration.observe({ stage: '1', phase: 'backward' }, 0.4);
  m.allReduceDuration.observe({ stage: '0' }, 0.03);
  m.pipelineBubble.set(0.2);
  m.sentBytes.inc({ transport: 'grpc' }, 1000);
  m.receivedBytes.inc({ transport: 'nats' }, 2000);
  m.setWorkerCounts({ ready: 3, failed: 1 });
  m.checkpointDuration.observe(0.8);
  m.checkpointSize.set(123456);
  m.memoryInUse.set({ device: 'cpu' }, 1 << 20);
  const srv = await serveMetrics(m.registry, 0);
  try {
    assert.ok(srv.port > 0);
    const r = await get(srv.port, '/metrics');
    assert.equal(r.status, 200);
    assert.match(r.type, /^text\/plain; version=0\.0\.4/);
    const t = r.body;
    assert.equal(sample(t, 'dqlora_train_loss'), 2.5);
    assert.equal(sample(t, 'dqlora_eval_loss'), 2.75);
    assert.equal(sample(t, 'dqlora_learning_rate'), 2e-4);
    assert.equal(sample(t, 'dqlora_grad_norm'), 0.125);
    assert.equal(sample(t, 'dqlora_tokens_per_second'), 1234);
    assert.equal(sample(t, 'dqlora_tokens_total'), 4096);
    assert.equal(sample(t, 'dqlora_optimizer_steps_total'), 1);
    assert.equal(sample(t, 'dqlora_step_duration_seconds_count'), 1);
    assert.equal(sample(t, 'dqlora_step_duration_seconds_sum'), 1.5);
    assert.equal(sample(t, 'dqlora_step_duration_seconds_bucket{le="2.5"}'), 1);
    assert.equal(sample(t, 'dqlora_step_duration_seconds_bucket{le="1"}'), 0);
    assert.equal(sample(t, 'dqlora_stage_duration_seconds_count{stage="1",phase="backward"}'), 1);
    assert.equal(sample(t, 'dqlora_allreduce_duration_seconds_sum{stage="0"}'), 0.03);
    assert.equal(sample(t, 'dqlora_pipeline_bubble_ratio'), 0.2);
    assert.equal(sample(t, 'dqlora_sent_bytes_total{transport="grpc"}'), 1000);
    assert.equal(sample(t, 'dqlora_received_bytes_total{transport="nats"}'), 2000);
    assert.equal(sample(t, 'dqlora_workers{state="ready"}'), 3);
    assert.equal(sample(t, 'dqlora_workers{state="failed"}'), 1);
    assert.equal(sample(t, 'dqlora_workers{state="loading"}'), 0);
    assert.equal(sample(t, 'dqlora_checkpoint_size_bytes'), 123456);
    assert.equal(sample(t, 'dqlora_memory_in_use_bytes{device="cpu"}'), 1 << 20);
    assert.ok(sample(t, 'process_resident_memory_bytes')! > 0, 'process default metrics are exported');
    assert.match(t, /^nodejs_heap_size_used_bytes /m);
    const h = await get(srv.port, '/healthz');
    assert.deepEqual([h.status, h.body], [200, 'ok\n']);
    assert.equal((await get(srv.port, '/nope')).status, 404);
    if (!promtoolMissing) {
      const p = promtool(t);
      assert.equal(p.out, '', `promtool reported problems:\n${p.out}`);
      assert.equal(p.code, 0);
    }
  } finally {
    await srv.close();
  }
});

test('worker metrics: own registry with default labels, promtool-clean, independent of the coordinator\'s', async () => {
  const c = createCoordinatorMetrics({ processMetrics: false });
  const w = createWorkerMetrics({ defaultLabels: { worker_id: 'w1', stage: '1' } });
  w.stageDuration.observe({ phase: 'forward' }, 0.05);
  w.allReduceDuration.observe(0.01);
  w.stepDuration.observe(0.3);
  w.step.set(7);
  w.sentBytes.inc({ transport: 'nats' }, 512);
  w.memoryInUse.set({ device: 'cuda:0' }, 5e9);
  c.sentBytes.inc({ transport: 'nats' }, 1);
  const srv = await serveMetrics(w.registry, 0);
  try {
    const t = (await get(srv.port, '/metrics')).body;
    assert.equal(sample(t, 'dqlora_step{worker_id="w1",stage="1"}'), 7);
    assert.equal(sample(t, 'dqlora_sent_bytes_total{transport="nats",worker_id="w1",stage="1"}'), 512);
    assert.equal(sample(t, 'dqlora_memory_in_use_bytes{device="cuda:0",worker_id="w1",stage="1"}'), 5e9);
    assert.equal(sample(t, 'dqlora_stage_duration_seconds_count{worker_id="w1",stage="1",phase="forward"}'), 1);
    assert.doesNotMatch(t, /dqlora_train_loss/);
    if (!promtoolMissing) {
      const p = promtool(t);
      assert.equal(p.out, '', `promtool reported problems:\n${p.out}`);
    }
    // The coordinator's registry did not see the worker's bytes.
    assert.equal(sample(await c.registry.metrics(), 'dqlora_sent_bytes_total{transport="nats"}'), 1);
  } finally {
    await srv.close();
  }
});

test('promtool would catch a misnamed metric (the check above is not vacuous)', { skip: promtoolMissing }, () => {
  const p = promtool('# HELP dqlora_bad A counter without _total.\n# TYPE dqlora_bad counter\ndqlora_bad 1\n');
  assert.match(p.out, /counter metrics should have "_total" suffix/);
});
