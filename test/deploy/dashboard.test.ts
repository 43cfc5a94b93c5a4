// deploy/grafana/dqlora-dashboard.json: equals the generator's output, has the panels the brief lists and a `job`
// variable every query uses, and every PromQL expression reads only metrics (and labels) that
// createCoordinatorMetrics() / createWorkerMetrics() register. Plus a fuzz of the PromQL name extractor.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { dashboardJson, DASHBOARD_UID } from '../../deploy/grafana/dashboard.ts';
import { registeredSeries, seriesInPromql } from './helpers.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const committed = fs.readFileSync(path.join(root, 'deploy', 'grafana', 'dqlora-dashboard.json'), 'utf8');

interface Panel { type: string; title: string; id?: number; gridPos?: { x: number; y: number; w: number; h: number }; targets?: { expr: string; legendFormat?: string; datasource?: { uid: string } }[] }
const dash = JSON.parse(committed) as { uid: string; panels: Panel[]; templating: { list: { name: string; type: string; query: unknown }[] } };
const panels = dash.panels.filter((p) => p.type !== 'row');
const exprs = panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr })));

/** Labels on every series scraped through Prometheus Operator, and `role` (worker registry default label). */
const TARGET_LABELS = new Set(['job', 'instance', 'pod', 'namespace', 'container', 'service', 'endpoint', 'role']);

test('the committed dashboard JSON equals the generator output', () => {
  assert.equal(committed, dashboardJson(), 'stale: run node --import tsx scripts/gen-deploy.ts');
  assert.equal(dash.uid, DASHBOARD_UID);
});

test('dashboard: the panels the job is watched by, a job variable, every query scoped to $job', () => {
  const titles = panels.map((p) => p.title);
  for (const t of ['Loss', 'Learning rate', 'Gradient norm', 'Tokens / s', 'Step duration', 'Stage compute per step (p50)', 'Pipeline bubble',
    'All-reduce duration', 'Bytes per second by transport', 'Workers by state', 'Memory in use by device', 'Checkpoint duration', 'Checkpoint size']) {
    assert.ok(titles.includes(t), `has a "${t}" panel`);
  }
  const job = dash.templating.list.find((v) => v.name === 'job');
  assert.ok(job && job.type === 'query', 'has a job query variable');
  assert.match(JSON.stringify(job.query), /label_values\(dqlora_optimizer_steps_total, job\)/);
  assert.ok(dash.templating.list.some((v) => v.name === 'datasource' && v.type === 'datasource'));
  assert.ok(exprs.length >= 25, `${exprs.length} queries`);
  for (const { panel, expr } of exprs) assert.match(expr, /job="\$job"/, `${panel}: scoped to the chosen job`);
  for (const p of panels) for (const t of p.targets ?? []) assert.equal(t.datasource?.uid, '${datasource}', `${p.title}: uses the datasource variable`);
  // Panels do not overlap on the grid.
  const cells = new Set<string>();
  for (const p of dash.panels) {
    const g = p.gridPos!;
    for (let x = g.x; x < g.x + g.w; x++) for (let y = g.y; y < g.y + g.h; y++) {
      assert.ok(!cells.has(`${x},${y}`), `${p.title} overlaps another panel at ${x},${y}`);
      cells.add(`${x},${y}`);
    }
    assert.ok(g.x + g.w <= 24, `${p.title} fits the 24-column grid`);
  }
});

test('every metric a dashboard query reads is registered by common/metrics.ts, with the labels it uses', () => {
  const reg = registeredSeries();
  const used = new Set<string>();
  for (const { panel, expr } of exprs) {
    const series = seriesInPromql(expr);
    assert.ok(series.length > 0, `${panel}: ${expr} reads a metric`);
    for (const s of series) {
      const m = reg.get(s.name);
      assert.ok(m, `${panel}: ${s.name} is not registered by createCoordinatorMetrics() / createWorkerMetrics()`);
      used.add(m.base);
      for (const l of s.labels) assert.ok(m.labels.has(l) || TARGET_LABELS.has(l), `${panel}: ${s.name} has no label ${l}`);
    }
    // Labels in `by (...)` clauses exist on the metrics aggregated.
    for (const by of expr.matchAll(/by \(([^)]*)\)/g)) {
      for (const l of by[1].split(',').map((x) => x.trim())) {
        assert.ok(series.some((s) => reg.get(s.name)!.labels.has(l)) || TARGET_LABELS.has(l), `${panel}: grouping label ${l} exists`);
      }
    }
  }
  // Every dqlora_ metric the processes export is on the dashboard.
  const exported = new Set([...reg.values()].map((m) => m.base).filter((b) => b.startsWith('dqlora_')));
  assert.deepEqual([...exported].filter((b) => !used.has(b)), [], 'every dqlora_ metric has a panel');
});

test('seriesInPromql: names, label matchers, and what it leaves out', () => {
  assert.deepEqual(seriesInPromql('histogram_quantile(0.9, sum by (le, stage) (rate(dqlora_x_bucket{job="$job", role!="worker"}[$__rate_interval])))'),
    [{ name: 'dqlora_x_bucket', labels: ['job', 'role'] }]);
  assert.deepEqual(seriesInPromql('max by (job) (a) - on (job) group_right () b{c=~"x|y"} > 2'), [{ name: 'a', labels: [] }, { name: 'b', labels: ['c'] }]);
  assert.deepEqual(seriesInPromql('(x != x) or (abs(x) == +Inf) and rate(y[5m] offset 1h) > 1e-5 unless z{s="by (q)"}'),
    ['x', 'x', 'x', 'y', 'z'].map((name) => ({ name, labels: name === 'z' ? ['s'] : [] })));
  assert.deepEqual(seriesInPromql('sum(increase(a_sum[1h])) / sum(increase(a_count[1h]))').map((s) => s.name), ['a_sum', 'a_count']);
});

test('fuzz: seriesInPromql returns names for any input (random and mutated queries), never throws', () => {
  // Deterministic LCG: the same cases on every run.
  let seed = 0x2545f491;
  const rnd = (n: number) => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed % n; };
  const alphabet = 'abz_:{}[]()"\'`=~!,.$ 0123456789+-*/^%<>\\\n';
  const ident = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
  for (let i = 0; i < 3000; i++) {
    let s: string;
    if (i % 2 === 0) {
      s = Array.from({ length: rnd(80) }, () => alphabet[rnd(alphabet.length)]).join('');
    } else {
      const base = exprs[rnd(exprs.length)].expr.split('');
      for (let k = rnd(6); k >= 0; k--) base.splice(rnd(base.length + 1), rnd(3), alphabet[rnd(alphabet.length)]);
      s = base.join('');
    }
    const out = seriesInPromql(s);
    for (const r of out) assert.match(r.name, ident, `fuzz case ${i}: ${JSON.stringify(s)}`);
  }
  // Long pathological input stays linear.
  assert.ok(seriesInPromql('{'.repeat(20000) + 'a' + '}'.repeat(20000)).length <= 1);
});
