// The live status page in a real browser. A tiny job really trains (runJob) with the reporting observers and the
// HTTP server of startReporting; headless Chromium loads the page: the numbers it shows must equal /status and the
// Prometheus scrape exactly, the charts must have drawn (pixels of the series colours on the canvas), the page
// must load nothing but this server (CSP 'self': a violation is a console error); a screenshot is kept in
// test-artifacts/. The run's recorded events are then replayed into a fresh observer to see the page follow a run
// half-way and to the end (training blocks this process's event loop, so the page cannot be polled mid-step here).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { recorder, replay, tinyReportingJob, type RecordedEvent } from '../helpers/recorded-run.ts';
import { Browser, chromiumPath } from '../helpers/chromium.ts';
import { StatusObserver, type StatusSnapshot } from '../../coordinator/status/state.ts';
import { notify } from '../../coordinator/observers.ts';
import { jobMetricsObserver } from '../../coordinator/metrics-observer.ts';
import { startReporting, type Reporting } from '../../coordinator/status/index.ts';
import { runJob, type RunOutcome } from '../../coordinator/run.ts';
import { listCheckpoints, type TrainerState } from '../../common/checkpoint.ts';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import type { JobConfig } from '../../coordinator/job.ts';import { startStatusServer, type StatusServer } from '../../coordinator/status/server.ts';
import { createCoordinatorMetrics } from '../../common/metrics.ts';
import type { StepEvent } from '../../coordinator/events.ts';

const ARTIFACTS = join(import.meta.dirname, '..', '..', 'test-artifacts');
const exe = chromiumPath();
const skip = exe ? false : 'chromium not installed (apt-get install chromium; .ci/run does)';

let rec: { job: JobConfig; outcome: RunOutcome; events: RecordedEvent[]; state: TrainerState }, browser: Browser, reporting: Reporting;
let stepsSeenLive: number[] = [];
before(async () => {
  if (skip) return;
  const job = tinyReportingJob(mkdtempSync(join(tmpdir(), 'dqlora-page-')), { report: ['tensorboard'] });
  reporting = await startReporting(job, { terminal: 'none', print: () => {} });   // http_port 0: OS-assigned
  const events: RecordedEvent[] = [];
  // A poller on another thread asks /status every few ms while this thread trains (in one process the steps compute
  // here and never yield mid-step): the steps it saw prove the page is served live, not only after the run.
  const seen = new Int32Array(new SharedArrayBuffer(4 * 64));
  const poller = new Worker(`const { workerData: { url, seen } } = require('node:worker_threads');
    (async () => { for (;;) { try { const s = await (await fetch(url + '/status')).json();
      if (s.state === 'training' && s.step > 0 && !seen.slice(1, 1 + Atomics.load(seen, 0)).includes(s.step)) seen[1 + Atomics.add(seen, 0, 1)] = s.step; } catch {}
      await new Promise((r) => setTimeout(r, 5)); } })();`, { eval: true, workerData: { url: reporting.server!.url, seen } });
  const outcome = await runJob(job, { progress: false, print: () => {}, observers: [recorder(events)], reporting });
  await poller.terminate();
  stepsSeenLive = Array.from(seen.slice(1, 1 + seen[0]));
  const state = JSON.parse(readFileSync(join(listCheckpoints(job.output_dir).at(-1)!.dir, 'trainer_state.json'), 'utf8')) as TrainerState;
  rec = { job, outcome, events, state };
  browser = await Browser.launch(exe!);
}, { timeout: 120_000 });
after(async () => { await browser?.close(); await reporting?.close(); }, { timeout: 30_000 });

/** `name{job="tiny"} value` from a Prometheus text scrape. */
function scrape(text: string, name: string): number {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text);
  assert.ok(m, `${name} in the scrape`);
  return Number(m[1]);
}

const CARDS = ['loss', 'evalLoss', 'lr', 'gradNorm', 'tokensPerSecond'] as const;
const SHOWN: Record<(typeof CARDS)[number], (v: number) => string> = {
  loss: (v) => v.toFixed(4), evalLoss: (v) => v.toFixed(4), lr: (v) => v.toExponential(3), gradNorm: (v) => v.toFixed(4), tokensPerSecond: (v) => v.toFixed(0),
};
const METRIC: Record<(typeof CARDS)[number], string> = {
  loss: 'dqlora_train_loss', evalLoss: 'dqlora_eval_loss', lr: 'dqlora_learning_rate', gradNorm: 'dqlora_grad_norm', tokensPerSecond: 'dqlora_tokens_per_second',
};

/** Count of canvas pixels near an RGB colour in the chart under `sel`. */
const pixels = (sel: string, rgb: [number, number, number]): string => `(() => {
  const c = document.querySelector('${sel} canvas'); if (!c) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 200 && Math.abs(d[i] - ${rgb[0]}) < 40 && Math.abs(d[i + 1] - ${rgb[1]}) < 40 && Math.abs(d[i + 2] - ${rgb[2]}) < 40) n++;
  return n; })()`;

async function checkPageAgainstServer(server: StatusServer, step: number): Promise<StatusSnapshot> {
  await browser.waitFor(`document.body.dataset.drawn === '${step}' && document.querySelector('#progress-text').dataset.step === '${step}'`, 15_000, `the page to draw step ${step}`);
  const status = await (await fetch(`${server.url}/status`)).json() as StatusSnapshot;
  const prom = await (await fetch(`${server.url}/metrics`)).text();
  const shown = await browser.eval<Record<string, { value: string | null; text: string }>>(`Object.fromEntries([...document.querySelectorAll('.value[data-k]')].map((n) => [n.dataset.k, { value: n.dataset.value ?? null, text: n.textContent }]))`);
  for (const k of CARDS) {
    const v = status[k];
    assert.ok(v !== null, `/status has ${k} at step ${step}`);
    assert.equal(Number(shown[k].value), v, `page ${k} = /status ${k}`);
    assert.equal(shown[k].text, SHOWN[k](v), `page shows ${k} as ${SHOWN[k](v)}`);
    assert.equal(scrape(prom, METRIC[k]), v, `${METRIC[k]} = /status ${k}`);
  }
  assert.equal(scrape(prom, 'dqlora_optimizer_steps_total'), step);
  // The numbers are the run's own: the last recorded step's loss, lr and grad norm.
  const h = rec.state.history[step - 1];
  assert.deepEqual([status.loss, status.lr, status.gradNorm], [h.loss, h.lr, h.gradNorm]);
  assert.ok(await browser.eval<number>(pixels('#chart-loss', [59, 130, 246])) > 50, 'the train loss line is drawn');
  { const n = await browser.eval<number>(pixels('#chart-loss', [239, 68, 68])); if (!(n > 20)) writeFileSync('/tmp/i12-shot.png', await browser.screenshot()); assert.ok(n > 20, `the eval loss points are drawn (${n})`); }
  assert.ok(await browser.eval<number>(pixels('#chart-lr', [139, 92, 246])) > 50, 'the lr line is drawn');
  assert.ok(await browser.eval<number>(pixels('#chart-grad', [245, 158, 11])) > 50, 'the grad norm line is drawn');
  return status;
}

test('a real tiny job with startReporting: its page, /status and /metrics agree, and output_dir holds the reports', { skip, timeout: 120_000 }, async () => {
  const server = reporting.server!;
  assert.equal(readFileSync(join(rec.job.output_dir, 'status-url'), 'utf8').trim(), server.url);
  assert.ok(stepsSeenLive.some((x) => x > 0 && x < 8), `/status answered during the training steps (steps seen: ${stepsSeenLive})`);
  await browser.navigate(server.url);
  const end = await checkPageAgainstServer(server, 8);
  await browser.waitFor(`document.querySelector('#run-state').textContent === 'succeeded'`, 10_000);
  assert.equal(end.state, 'succeeded');
  assert.equal(end.evalLoss, rec.outcome.evalLoss);
  assert.equal(end.job!.trainExamples > 0 && end.job!.executor, 'in-process');
  const answers = await browser.eval<string[][]>(`[...document.querySelectorAll('#answers tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent))`);
  assert.deepEqual(answers, rec.outcome.answers.map((a) => [a.prompt, a.base || '(empty)', a.tuned || '(empty)']));
  assert.deepEqual(browser.consoleErrors, [], 'no script errors and nothing blocked by the page\'s CSP (everything served locally)');
  for (const f of ['train_log.jsonl', 'loss.svg']) assert.ok(existsSync(join(rec.job.output_dir, f)), f);
  assert.equal(readdirSync(join(rec.job.output_dir, 'tensorboard')).filter((f) => f.startsWith('events.out.tfevents.')).length, 1);
  mkdirSync(ARTIFACTS, { recursive: true });
  writeFileSync(join(ARTIFACTS, 'status-page.png'), await browser.screenshot());
});

test('the status page follows a real run live and ends with the before/after answers; its numbers equal /status and /metrics', { skip, timeout: 120_000 }, async () => {
  const status = new StatusObserver();
  const metrics = createCoordinatorMetrics({ defaultLabels: { job: 'tiny' } });
  const server = await startStatusServer({ status, registry: metrics.registry, port: 0, host: '127.0.0.1' });
  try {
    const observers = [status, jobMetricsObserver(metrics, { replicas: 1, microBatches: 1, saveEvery: 4 })];
    const cut = rec.events.findIndex((r) => r.kind === 'step' && r.e.step === 6);
    replay(rec.events.slice(0, cut), observers);            // steps 1..5, the eval and checkpoint at step 4
    await browser.navigate(server.url);
    const mid = await checkPageAgainstServer(server, 5);
    assert.equal(mid.state, 'training');
    assert.ok(mid.etaSeconds !== null && mid.etaSeconds > 0, 'an ETA while training');
    assert.equal(await browser.eval<string>(`document.querySelector('#run-state').textContent`), 'training');
    assert.equal(await browser.eval<boolean>(`document.querySelector('#answers-section').hidden`), true);

    replay(rec.events.slice(cut), observers);               // the rest: steps 6..8, final eval, end with answers
    const end = await checkPageAgainstServer(server, 8);
    await browser.waitFor(`document.querySelector('#run-state').textContent === 'succeeded'`, 10_000);
    assert.equal(end.state, 'succeeded');
    assert.equal(end.evalLoss, rec.outcome.evalLoss);
    const answers = await browser.eval<string[][]>(`[...document.querySelectorAll('#answers tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent))`);
    assert.deepEqual(answers, rec.outcome.answers.map((a) => [a.prompt, a.base || '(empty)', a.tuned || '(empty)']));
    assert.match(await browser.eval<string>(`document.querySelector('#checkpoint').textContent`), /^step 8: .*step-000008/);
    assert.deepEqual(end.evals.map((e) => e.step), [4, 8]);
    assert.deepEqual(browser.consoleErrors, []);
  } finally { await server.close(); }
});

test('closing the server at the end of a run first lets a watching page fetch the final state (the answers)', { skip, timeout: 60_000 }, async () => {
  const status = new StatusObserver();
  const server = await startStatusServer({ status, registry: createCoordinatorMetrics().registry, port: 0, host: '127.0.0.1' });
  const cut = rec.events.findIndex((r) => r.kind === 'step' && r.e.step === 6);
  replay(rec.events.slice(0, cut), [status]);
  await browser.navigate(server.url);
  await browser.waitFor(`document.body.dataset.drawn === '5'`, 15_000, 'the page at step 5');
  replay(rec.events.slice(cut), [status]);
  const t0 = Date.now();
  await server.close({ lingerMs: 15_000 });
  assert.ok(Date.now() - t0 < 14_000, 'closed as soon as the page (polling every second) had fetched the end, not at the linger\'s limit');
  await browser.waitFor(`document.querySelector('#run-state').textContent === 'succeeded' && !document.querySelector('#answers-section').hidden`, 10_000, 'the final state on the page');
  const answers = await browser.eval<string[][]>(`[...document.querySelectorAll('#answers tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent))`);
  assert.deepEqual(answers, rec.outcome.answers.map((a) => [a.prompt, a.base || '(empty)', a.tuned || '(empty)']));
});

test('the last step\'s pipeline timeline: one bar per recorded span, placed and sized by its times', { skip, timeout: 60_000 }, async () => {
  const status = new StatusObserver();
  const metrics = createCoordinatorMetrics();
  const server = await startStatusServer({ status, registry: metrics.registry, port: 0, host: '127.0.0.1' });
  try {
    // A 2-stage 1F1B step with 2 micro-batches, as a workers executor would report it (seconds from step start).
    const stageTimings: StepEvent['stageTimings'] = [
      { stage: 0, replica: 0, forwardSeconds: 0.2, backwardSeconds: 0.4, idleSeconds: 0.3, allreduceSeconds: 0.05, pipelineSeconds: 0.9, spans: [
        { kind: 'forward', micro: 0, start: 0, end: 0.1 }, { kind: 'forward', micro: 1, start: 0.1, end: 0.2 }, { kind: 'wait', micro: -1, start: 0.2, end: 0.5 },
        { kind: 'backward', micro: 0, start: 0.5, end: 0.7 }, { kind: 'backward', micro: 1, start: 0.7, end: 0.9 }, { kind: 'allreduce', micro: -1, start: 0.9, end: 0.95 }] },
      { stage: 1, replica: 0, forwardSeconds: 0.2, backwardSeconds: 0.4, idleSeconds: 0.1, allreduceSeconds: 0.05, pipelineSeconds: 0.8, spans: [
        { kind: 'wait', micro: -1, start: 0, end: 0.1 }, { kind: 'forward', micro: 0, start: 0.1, end: 0.2 }, { kind: 'backward', micro: 0, start: 0.2, end: 0.4 },
        { kind: 'forward', micro: 1, start: 0.4, end: 0.5 }, { kind: 'backward', micro: 1, start: 0.5, end: 0.7 }, { kind: 'allreduce', micro: -1, start: 0.7, end: 0.75 }, { kind: 'optimizer', micro: -1, start: 0.75, end: 0.8 }] },
    ];
    status.onStart({ name: 'timeline', outputDir: '/tmp/x', totalSteps: 10, startStep: 0, stepsPerEpoch: 10, stages: 2, replicas: 1, executor: 'workers', backend: 'cpu', trainExamples: 80, validationExamples: 8 });
    status.onWorkers([{ id: 'w0', stage: 0, replica: 0, state: 'training' }, { id: 'w1', stage: 1, replica: 0, state: 'training' }]);
    status.onStep({ step: 1, totalSteps: 10, loss: 3, lr: 1e-3, gradNorm: 1, tokens: 640, labelTokens: 320, epoch: 0.1, seconds: 0.95, tokensPerSecond: 673, bubble: 0.25, stageTimings });
    await browser.navigate(server.url);
    await browser.waitFor(`document.querySelectorAll('#timeline rect.bar').length === 13`, 15_000, 'the 13 timeline bars');
    const bars = await browser.eval<{ kind: string; stage: number; start: number; end: number; x: number; w: number }[]>(`[...document.querySelectorAll('#timeline rect.bar')].map((r) => ({ kind: r.dataset.kind, stage: +r.dataset.stage, start: +r.dataset.start, end: +r.dataset.end, x: +r.getAttribute('x'), w: +r.getAttribute('width') }))`);
    const want = stageTimings.flatMap((t) => t.spans!.map((s) => ({ kind: s.kind, stage: t.stage, start: s.start, end: s.end })));
    assert.deepEqual(bars.map(({ kind, stage, start, end }) => ({ kind, stage, start, end })), want);
    const pxPerSecond = bars[0].w / (bars[0].end - bars[0].start), x0 = bars[0].x;
    for (const b of bars) {
      assert.ok(Math.abs(b.w - (b.end - b.start) * pxPerSecond) < 0.01, `${b.kind} width ∝ duration`);
      assert.ok(Math.abs(b.x - (x0 + b.start * pxPerSecond)) < 0.01, `${b.kind} starts at its time`);
    }
    const rows = await browser.eval<string[][]>(`[...document.querySelectorAll('#workers tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent))`);
    assert.deepEqual(rows, [['w0', '0', '0', 'training', '0.200', '0.400', '0.300', '0.050'], ['w1', '1', '0', 'training', '0.200', '0.400', '0.100', '0.050']]);
    assert.equal(await browser.eval<string>(`document.querySelector('.value[data-k="bubble"]').textContent`), '25.0 %');
    mkdirSync(ARTIFACTS, { recursive: true });
    writeFileSync(join(ARTIFACTS, 'status-page-timeline.png'), await browser.screenshot());
  } finally { await server.close(); }
});

test('a real 2-stage run on local worker processes: the page draws each stage\'s recorded timeline and the bubble, equal to /status and /metrics', { skip, timeout: 180_000 }, async () => {
  const job = tinyReportingJob(mkdtempSync(join(tmpdir(), 'dqlora-page-dist-')), {
    distributed: { stages: 2, replicas: 1, workers: 'local', heartbeat_timeout_s: 5, step_timeout_s: 60, wait_timeout_s: 60 },
  });
  job.training.max_steps = 3; job.training.eval_every = 0; job.training.save_every = 0; job.compare.prompts = [];
  const rep = await startReporting(job, { terminal: 'none', print: () => {} });
  try {
    const tables: string[][] = [];
    await runJob(job, { progress: false, print: () => {}, reporting: rep, onWorkers: (ws) => {
      tables.push(ws.map((w) => `${w.id}:${w.stage}/${w.replica}:${w.state}`));
    } });
    // the worker table as the control plane saw it change: registered, assigned a stage each, stopped at the end
    assert.deepEqual(tables[0], ['w1:-1/-1:registered'], JSON.stringify(tables));
    assert.ok(tables.some((t) => t.length === 2 && t.map((x) => x.split(':')[1]).sort().join() === '0/0,1/0'), `both stages assigned: ${JSON.stringify(tables)}`);
    assert.deepEqual(tables.at(-1)!.map((x) => x.split(':')[2]), ['stopped', 'stopped']);
    const server = rep.server!;
    await browser.navigate(server.url);
    await browser.waitFor(`document.querySelectorAll('#timeline rect.bar').length > 0 && document.querySelector('#run-state').textContent === 'succeeded'`, 15_000, 'the timeline of the last step');
    const status = await (await fetch(`${server.url}/status`)).json() as StatusSnapshot;
    const timings = status.lastStep!.stageTimings;
    assert.deepEqual(timings.map((t) => [t.stage, t.replica]), [[0, 0], [1, 0]]);
    assert.ok(timings.every((t) => t.forwardSeconds > 0 && t.backwardSeconds > 0), 'measured by the workers');
    // The workers record each phase's intervals (TimelineSpan): the page draws exactly those, and they add up to
    // the phase totals the workers report beside them.
    const bars = await browser.eval<{ kind: string; stage: number; start: number; end: number; micro: number }[]>(`[...document.querySelectorAll('#timeline rect.bar')].map((r) => ({ kind: r.dataset.kind, stage: +r.dataset.stage, start: +r.dataset.start, end: +r.dataset.end, micro: +r.dataset.micro }))`);
    for (const t of timings) {
      assert.ok(t.spans && t.spans.length >= 2, `stage ${t.stage} recorded its timeline`);
      assert.deepEqual(bars.filter((b) => b.stage === t.stage).map(({ kind, start, end, micro }) => ({ kind, micro, start, end })), t.spans!.map(({ kind, micro, start, end }) => ({ kind, micro, start, end })));
      const total = (k: string): number => t.spans!.filter((x) => x.kind === k).reduce((a, x) => a + (x.end - x.start), 0);
      assert.equal(total('forward'), t.forwardSeconds);
      assert.equal(total('backward'), t.backwardSeconds);
      assert.ok(Math.abs(total('wait') - t.idleSeconds) <= 1e-4 * (t.spans!.length + 1), 'waits shorter than 0.1 ms are not recorded as spans');
    }
    const rows = await browser.eval<string[][]>(`[...document.querySelectorAll('#workers tbody tr')].map((tr) => [...tr.children].map((td) => td.textContent))`);
    const byStage = [...status.workers].sort((a, b) => a.stage - b.stage);
    assert.deepEqual(byStage.map((w) => [w.stage, w.replica, w.state]), [[0, 0, 'stopped'], [1, 0, 'stopped']]);
    assert.deepEqual(rows, status.workers.map((w) => {
      const t = timings.find((x) => x.stage === w.stage && x.replica === w.replica)!;
      return [w.id, String(w.stage), String(w.replica), w.state, ...[t.forwardSeconds, t.backwardSeconds, t.idleSeconds, t.allreduceSeconds].map((x) => x.toFixed(3))];
    }));
    const prom = await (await fetch(`${server.url}/metrics`)).text();
    assert.equal(/^dqlora_workers\{[^}]*state="stopped"[^}]*\} (\d+)$/m.exec(prom)?.[1], '2', `dqlora_workers{state} from the same table:\n${prom.split('\n').filter((l) => l.startsWith('dqlora_workers')).join('\n')}`);
    assert.equal(scrape(prom, 'dqlora_pipeline_bubble_ratio'), status.bubble);
    assert.equal(await browser.eval<string>(`document.querySelector('.value[data-k="bubble"]').dataset.value`), String(status.bubble));
    assert.equal(scrape(prom, 'dqlora_train_loss'), status.loss);
    mkdirSync(ARTIFACTS, { recursive: true });
    writeFileSync(join(ARTIFACTS, 'status-page-workers.png'), await browser.screenshot());
  } finally { await rep.close(); }
});
