// deploy/prometheus/alerts.yml: promtool accepts it, the alerts fire on the situations they name (promtool test
// rules on synthetic series) and stay quiet otherwise, every metric they read is registered by common/metrics.ts,
// and the PrometheusRule object carries the same groups.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, stringify } from 'yaml';
import { alertGroups } from '../../deploy/gen/alerts.ts';
import { buildK8s } from '../../deploy/gen/k8s.ts';
import { defaultDeployConfig as cfg, names } from '../../deploy/gen/config.ts';
import { registeredSeries, seriesInPromql } from './helpers.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const alertsPath = path.join(root, 'deploy', 'prometheus', 'alerts.yml');
const promtoolMissing = spawnSync('promtool', ['--version'], { stdio: 'ignore' }).error ? 'promtool is not installed (apt-get install prometheus)' : undefined;
const groups = alertGroups(cfg);
const rules = groups.flatMap((g) => g.rules);

/** Labels Prometheus Operator puts on every scraped series (target labels), and `role`: the worker registry's
 *  default label, matched as role!="worker" to select coordinator series. */
const TARGET_LABELS = new Set(['job', 'instance', 'pod', 'namespace', 'container', 'service', 'endpoint', 'role']);

test('alerts.yml holds the generated groups, the PrometheusRule the same, every alert named, sized and described', () => {
  const file = parseYaml(fs.readFileSync(alertsPath, 'utf8')) as { groups: unknown };
  assert.deepEqual(file.groups, JSON.parse(JSON.stringify(groups)));
  const pr = buildK8s(cfg).rendered.get('gpu')!.find((o) => o.kind === 'PrometheusRule' && o.metadata.name === names(cfg).alerts)!;
  assert.deepEqual((pr.spec as { groups: unknown }).groups, file.groups);
  const alertNames = rules.map((r) => r.alert);
  assert.equal(new Set(alertNames).size, alertNames.length, 'alert names are unique');
  for (const want of ['DqloraWorkerDown', 'DqloraWorkerLost', 'DqloraJobFailed', 'DqloraLossNotFinite', 'DqloraStepTimeRegression', 'DqloraNoProgress', 'DqloraCheckpointStale']) {
    assert.ok(alertNames.includes(want), `has ${want}`);
  }
  for (const r of rules) {
    assert.match(r.alert, /^Dqlora[A-Z]\w+$/);
    assert.ok(['critical', 'warning', 'info'].includes(r.labels.severity));
    assert.ok(r.annotations.summary.length > 10 && r.annotations.description.length > 40, `${r.alert} is described`);
  }
});

test('every metric an alert reads is registered by the coordinator or worker registry, with the labels it matches on', () => {
  const reg = registeredSeries();
  let refs = 0;
  for (const r of rules) {
    const series = seriesInPromql(r.expr);
    assert.ok(series.length > 0, `${r.alert} reads a metric`);
    for (const s of series) {
      refs++;
      if (s.name === 'up') {
        for (const l of s.labels) assert.ok(TARGET_LABELS.has(l), `${r.alert}: up{${l}} is a target label`);
        continue;
      }
      const m = reg.get(s.name);
      assert.ok(m, `${r.alert}: ${s.name} is registered by common/metrics.ts`);
      for (const l of s.labels) assert.ok(m.labels.has(l) || TARGET_LABELS.has(l), `${r.alert}: ${s.name} has label ${l}`);
    }
  }
  assert.ok(refs >= 20, `${refs} metric references checked`);
});

test('promtool check rules accepts deploy/prometheus/alerts.yml', { skip: promtoolMissing }, () => {
  const r = spawnSync('promtool', ['check', 'rules', alertsPath], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout + r.stderr, new RegExp(`SUCCESS: ${rules.length} rules found`));
});

test('promtool test rules: each alert fires on its failure and not on a healthy job', { skip: promtoolMissing }, () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-alerts-'));
  try {
    // Annotations are templates promtool would require verbatim in every expectation; `check rules` above
    // validates them. Here the expressions, `for` durations and labels are under test.
    const bare = { groups: groups.map((g) => ({ name: g.name, rules: g.rules.map((r) => ({ alert: r.alert, expr: r.expr, ...(r.for ? { for: r.for } : {}), labels: r.labels })) })) };
    fs.writeFileSync(path.join(tmp, 'rules.yml'), stringify(bare));
    const alert = (name: string, labels: Record<string, string>) => ({ exp_labels: { ...labels, severity: rules.find((r) => r.alert === name)!.labels.severity } });
    const tests = {
      rule_files: ['rules.yml'],
      evaluation_interval: '1m',
      tests: [
        {
          interval: '1m',
          input_series: [
            // job j: loss turns NaN at minute 2; job k: +Inf grad norm; job ok: finite.
            { series: 'dqlora_train_loss{job="j"}', values: '2.5 2.4 NaN NaN NaN' },
            { series: 'dqlora_grad_norm{job="k"}', values: '1 1 1 +Inf +Inf' },
            { series: 'dqlora_train_loss{job="ok"}', values: '2.5 2.4 2.3 2.2 2.1' },
            { series: 'dqlora_job_state{job="j", state="running"}', values: '1x10' },
            { series: 'up{job="j", container="worker", pod="dqlora-worker-1"}', values: '1 0 0 0 0 0' },
            { series: 'up{job="j", container="worker", pod="dqlora-worker-0"}', values: '1 1 1 1 1 1' },
            // A worker lost and replaced between two scrapes: the failed-workers gauge never shows it, the
            // recoveries counter does.
            { series: 'dqlora_workers{job="j", state="failed"}', values: '0 0 0 0 0 0' },
            { series: 'dqlora_recoveries_total{job="j"}', values: '0 0 1 1 1 1' },
            { series: 'dqlora_recoveries_total{job="ok"}', values: '0 0 0 0 0 0' },
            { series: 'dqlora_workers{job="w", state="failed"}', values: '0 0 1 1 1 1' },
          ],
          alert_rule_test: [
            { eval_time: '1m', alertname: 'DqloraLossNotFinite', exp_alerts: [] },
            { eval_time: '3m', alertname: 'DqloraLossNotFinite', exp_alerts: [alert('DqloraLossNotFinite', { job: 'j' }), alert('DqloraLossNotFinite', { job: 'k' })] },
            { eval_time: '2m', alertname: 'DqloraWorkerDown', exp_alerts: [] },
            { eval_time: '4m', alertname: 'DqloraWorkerDown', exp_alerts: [alert('DqloraWorkerDown', { job: 'j', container: 'worker', pod: 'dqlora-worker-1' })] },
            { eval_time: '1m', alertname: 'DqloraWorkerLost', exp_alerts: [] },
            { eval_time: '3m', alertname: 'DqloraWorkerLost', exp_alerts: [alert('DqloraWorkerLost', { job: 'j' }), alert('DqloraWorkerLost', { job: 'w' })] },
          ],
        },
        {
          // After success: the pods complete and their targets go down or vanish; nothing is down that matters.
          // NATS outage that used up the recoveries within seconds: the job failed; one alert says so, no Down
          // alerts pile up after it.
          interval: '1m',
          input_series: [
            { series: 'dqlora_job_state{job="done", state="succeeded"}', values: '0 0 0 1 1 _ _ _ _ _ _ _ _ _ _' },
            { series: 'dqlora_job_state{job="done", state="running"}', values: '1 1 1 0 0 _ _ _ _ _ _ _ _ _ _' },
            { series: 'up{job="done", container="coordinator", pod="dqlora-coordinator-x"}', values: '1 1 1 1 1 0 0 0 0 0 0 0 0 0 0' },
            { series: 'up{job="done", container="worker", pod="dqlora-worker-0-x"}', values: '1 1 1 1 0 0 0 0 0 0 0 0 0 0 0' },
            { series: 'dqlora_job_state{job="nats", state="failed"}', values: '0 0 1 1 _ _ _ _ _ _ _ _ _ _ _' },
            { series: 'dqlora_recoveries_total{job="nats"}', values: '0 0 3 3 _ _ _ _ _ _ _ _ _ _ _' },
            { series: 'up{job="nats", container="worker", pod="dqlora-worker-1-y"}', values: '1 1 1 0 0 0 0 0 0 0 0 0 0 0 0' },
          ],
          alert_rule_test: [
            { eval_time: '10m', alertname: 'DqloraWorkerDown', exp_alerts: [] },
            { eval_time: '10m', alertname: 'DqloraCoordinatorDown', exp_alerts: [] },
            { eval_time: '3m', alertname: 'DqloraWorkerLost', exp_alerts: [alert('DqloraWorkerLost', { job: 'nats' })] },
            { eval_time: '3m', alertname: 'DqloraJobFailed', exp_alerts: [alert('DqloraJobFailed', { job: 'nats', state: 'failed' })] },
            { eval_time: '10m', alertname: 'DqloraJobFailed', exp_alerts: [alert('DqloraJobFailed', { job: 'nats', state: 'failed' })] },
          ],
        },
        {
          interval: '1m',
          input_series: [
            // Steps stop at minute 10 while 4 workers stay in the training state; job "done" also stops but has no training workers.
            { series: 'dqlora_optimizer_steps_total{job="j"}', values: '0+1x10 10x40' },
            { series: 'dqlora_workers{job="j", state="training"}', values: '4x50' },
            { series: 'dqlora_optimizer_steps_total{job="done"}', values: '0+1x10 10x40' },
            { series: 'dqlora_workers{job="done", state="training"}', values: '0x50' },
            // Job h is healthy: 6 steps a minute, its two workers scraped at different phases of a step (w1 always
            // reads 3 steps ahead of w0), which a step-difference rule mistook for lag. Worker w2 of job s is stuck.
            { series: 'dqlora_optimizer_steps_total{job="h"}', values: '0+6x50' },
            { series: 'dqlora_step{job="h", role="worker", pod="w0"}', values: '0+6x50' },
            { series: 'dqlora_step{job="h", role="worker", pod="w1"}', values: '3+6x50' },
            { series: 'dqlora_optimizer_steps_total{job="s"}', values: '0+1x50' },
            { series: 'dqlora_step{job="s", role="worker", pod="w0"}', values: '0+1x50' },
            { series: 'dqlora_step{job="s", role="worker", pod="w2"}', values: '0+1x5 5x45' },
            // Bubble against the layout's theory (2 stages, 4 micro-batches: 0.2): 0.3 is fine, 0.7 is not.
            { series: 'dqlora_pipeline_bubble_ratio{job="j"}', values: '0.7x50' },
            { series: 'dqlora_pipeline_bubble_theoretical_ratio{job="j"}', values: '0.2x50' },
            { series: 'dqlora_pipeline_bubble_ratio{job="ok"}', values: '0.3x50' },
            { series: 'dqlora_pipeline_bubble_theoretical_ratio{job="ok"}', values: '0.2x50' },
          ],
          alert_rule_test: [
            { eval_time: '12m', alertname: 'DqloraNoProgress', exp_alerts: [] },
            { eval_time: '35m', alertname: 'DqloraNoProgress', exp_alerts: [alert('DqloraNoProgress', { job: 'j' })] },
            { eval_time: '12m', alertname: 'DqloraWorkerLagging', exp_alerts: [] },
            { eval_time: '25m', alertname: 'DqloraWorkerLagging', exp_alerts: [alert('DqloraWorkerLagging', { job: 's', role: 'worker', pod: 'w2' })] },
            { eval_time: '45m', alertname: 'DqloraWorkerLagging', exp_alerts: [alert('DqloraWorkerLagging', { job: 's', role: 'worker', pod: 'w2' })] },
            { eval_time: '20m', alertname: 'DqloraPipelineBubbleHigh', exp_alerts: [] },
            { eval_time: '40m', alertname: 'DqloraPipelineBubbleHigh', exp_alerts: [alert('DqloraPipelineBubbleHigh', { job: 'j' })] },
          ],
        },
        {
          interval: '1m',
          input_series: [
            // One step a minute; 1 s each for 200 minutes, then 3 s each.
            { series: 'dqlora_step_duration_seconds_sum{job="j"}', values: '0+1x200 203+3x100' },
            { series: 'dqlora_step_duration_seconds_count{job="j"}', values: '0+1x300' },
            // Job j should checkpoint every 50 steps and never does; job z has save_every 0 (only at the end):
            // nothing is due; job k checkpoints every minute.
            { series: 'dqlora_optimizer_steps_total{job="j"}', values: '0+1x300' },
            { series: 'dqlora_checkpoint_duration_seconds_count{job="j"}', values: '0x300' },
            { series: 'dqlora_checkpoint_interval_steps{job="j"}', values: '50x300' },
            { series: 'dqlora_optimizer_steps_total{job="z"}', values: '0+1x300' },
            { series: 'dqlora_checkpoint_duration_seconds_count{job="z"}', values: '0x300' },
            { series: 'dqlora_checkpoint_interval_steps{job="z"}', values: '0x300' },
            { series: 'dqlora_optimizer_steps_total{job="k"}', values: '0+1x300' },
            { series: 'dqlora_checkpoint_duration_seconds_count{job="k"}', values: '0+1x300' },
            { series: 'dqlora_checkpoint_interval_steps{job="k"}', values: '1x300' },
          ],
          alert_rule_test: [
            { eval_time: '150m', alertname: 'DqloraStepTimeRegression', exp_alerts: [] },
            { eval_time: '240m', alertname: 'DqloraStepTimeRegression', exp_alerts: [alert('DqloraStepTimeRegression', { job: 'j' })] },
            { eval_time: '5m', alertname: 'DqloraCheckpointStale', exp_alerts: [] },
            { eval_time: '130m', alertname: 'DqloraCheckpointStale', exp_alerts: [alert('DqloraCheckpointStale', { job: 'j' })] },
          ],
        },
        {
          interval: '1m',
          input_series: [
            // p90 of checkpoint writes: job slow takes 10 min each, job fast 1 s.
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="slow", le="300"}', values: '0x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="slow", le="600"}', values: '0+1x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="slow", le="+Inf"}', values: '0+1x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="fast", le="1"}', values: '0+1x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="fast", le="300"}', values: '0+1x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="fast", le="600"}', values: '0+1x90' },
            { series: 'dqlora_checkpoint_duration_seconds_bucket{job="fast", le="+Inf"}', values: '0+1x90' },
          ],
          alert_rule_test: [
            { eval_time: '60m', alertname: 'DqloraCheckpointSlow', exp_alerts: [alert('DqloraCheckpointSlow', { job: 'slow' })] },
          ],
        },
      ],
    };
    // Every alert is exercised by at least one case above.
    const tested = new Set(tests.tests.flatMap((t) => t.alert_rule_test.map((a) => a.alertname)));
    for (const r of rules) assert.ok(tested.has(r.alert), `${r.alert} has a promtool test`);
    const testFile = path.join(tmp, 'alerts_test.yml');
    fs.writeFileSync(testFile, stringify(tests));
    const r = spawnSync('promtool', ['test', 'rules', testFile], { encoding: 'utf8', cwd: tmp });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stdout + r.stderr, /SUCCESS/);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});
