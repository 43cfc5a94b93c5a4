// The dqlora Grafana dashboard, built with @grafana/grafana-foundation-sdk. scripts/gen-deploy.ts writes it to
// deploy/grafana/dqlora-dashboard.json (import it in Grafana: Dashboards → New → Import).
//
// Series conventions (see deploy/gen/alerts.ts): `job` = the dqlora job name on every series; coordinator series
// have no `role` label, worker series have role="worker"; `pod` comes from the Prometheus Operator targets.
// test/deploy/dashboard.test.ts checks that every metric named here is registered by common/metrics.ts.
import { DashboardBuilder, DatasourceVariableBuilder, QueryVariableBuilder, RowBuilder, VariableRefresh, VariableSort, DashboardCursorSync } from '@grafana/grafana-foundation-sdk/dashboard';
import type { Dashboard } from '@grafana/grafana-foundation-sdk/dashboard';
import { DataqueryBuilder } from '@grafana/grafana-foundation-sdk/prometheus';
import { PanelBuilder as TimeSeries } from '@grafana/grafana-foundation-sdk/timeseries';
import { PanelBuilder as Stat } from '@grafana/grafana-foundation-sdk/stat';
import { StackingConfigBuilder, StackingMode, VizLegendOptionsBuilder, LegendDisplayMode, LegendPlacement } from '@grafana/grafana-foundation-sdk/common';

export const DASHBOARD_UID = 'dqlora-training';
const DS = { type: 'prometheus', uid: '${datasource}' };
/** Selectors of coordinator and worker series of the chosen job. */
const C = 'job="$job", role!="worker"';
const W = 'job="$job", role="worker"';

const q = (expr: string, legend: string) => new DataqueryBuilder().datasource(DS).expr(expr).legendFormat(legend).range();
const quantiles = (metric: string, sel: string, by: string, legendPrefix: string) => [0.5, 0.9, 0.99].map((p) =>
  q(`histogram_quantile(${p}, sum by (${by}) (rate(${metric}_bucket{${sel}}[$__rate_interval])))`, `${legendPrefix}p${p * 100}`));

function ts(title: string, unit: string, description: string, targets: DataqueryBuilder[], w = 12): TimeSeries {
  const p = new TimeSeries().title(title).description(description).datasource(DS).unit(unit).span(w).height(8)
    .legend(new VizLegendOptionsBuilder().displayMode(LegendDisplayMode.List).placement(LegendPlacement.Bottom).showLegend(true))
    .lineWidth(1).fillOpacity(10);
  for (const t of targets) p.withTarget(t);
  return p;
}

function stat(title: string, unit: string, description: string, target: DataqueryBuilder | DataqueryBuilder[]): Stat {
  const s = new Stat().title(title).description(description).datasource(DS).unit(unit).span(4).height(4);
  for (const t of Array.isArray(target) ? target : [target]) s.withTarget(t);
  return s;
}

export function buildDashboard(): Dashboard {
  const d = new DashboardBuilder('dqlora — QLoRA training')
    .uid(DASHBOARD_UID)
    .description('Distributed QLoRA fine-tuning: loss, throughput, pipeline stages, all-reduce, workers, checkpoints (metrics from common/metrics.ts).')
    .tags(['dqlora', 'training', 'generated'])
    .editable()
    .tooltip(DashboardCursorSync.Crosshair)
    .refresh('30s')
    .time({ from: 'now-6h', to: 'now' })
    .timezone('browser')
    .withVariable(new DatasourceVariableBuilder('datasource').label('Data source').type('prometheus'))
    .withVariable(new QueryVariableBuilder('job').label('Job').datasource(DS)
      .query({ query: 'label_values(dqlora_optimizer_steps_total, job)', refId: 'PrometheusVariableQueryEditor-VariableQuery' })
      .definition('label_values(dqlora_optimizer_steps_total, job)')
      .refresh(VariableRefresh.OnTimeRangeChanged).sort(VariableSort.AlphabeticalAsc));

  d.withRow(new RowBuilder('Overview'))
    .withPanel(stat('Job state', 'none', 'The coordinator\'s job state (starting, running, recovering, stopping, succeeded, failed, stopped); the last value stays after the job ends.', q(`max by (state) (last_over_time(dqlora_job_state{${C}}[1h])) == 1`, '{{state}}')))
    .withPanel(stat('Recoveries', 'none', 'Times the job rolled back to its last checkpoint after losing a worker (a counter: lost workers between two scrapes still count).', q(`max(dqlora_recoveries_total{${C}})`, 'recoveries')))
    .withPanel(stat('Optimizer steps', 'none', 'Optimizer steps completed.', q(`max(dqlora_optimizer_steps_total{${C}})`, 'steps')))
    .withPanel(stat('Train loss', 'none', 'Loss of the last optimizer step.', q(`max(dqlora_train_loss{${C}})`, 'loss')))
    .withPanel(stat('Tokens / s', 'none', 'Throughput of the last optimizer step.', q(`max(dqlora_tokens_per_second{${C}})`, 'tokens/s')))
    .withPanel(stat('Workers training', 'none', 'Workers the coordinator counts in the training state.', q(`sum(dqlora_workers{${C}, state="training"})`, 'training')))
    .withPanel(stat('Workers failed', 'none', 'Workers declared lost (missed heartbeats, closed stream, failed command).', q(`sum(dqlora_workers{${C}, state="failed"})`, 'failed')))
    .withPanel(stat('Pipeline bubble', 'percentunit', 'Fraction of the last step each stage spent idle, averaged over workers.', q(`max(dqlora_pipeline_bubble_ratio{${C}})`, 'bubble')))
    .withPanel(stat('Micro-batch size', 'none', 'Sequences per micro-batch the steps run with (as requested, or what micro_batch_size: auto picked), and how many times a micro-batch that did not fit in device memory was split in halves (the step ran again with the same examples).', [
      q(`max(dqlora_micro_batch_size{${C}})`, 'sequences'), q(`max(dqlora_micro_batch_splits_total{${C}})`, 'out-of-memory splits'),
    ]));

  d.withRow(new RowBuilder('Training'))
    .withPanel(ts('Loss', 'none', 'Training loss per optimizer step (mean over label tokens) and validation loss at each evaluation.', [
      q(`dqlora_train_loss{${C}}`, 'train'), q(`dqlora_eval_loss{${C}}`, 'eval'),
    ]))
    .withPanel(ts('Learning rate', 'none', 'Scheduled learning rate of the last step.', [q(`dqlora_learning_rate{${C}}`, 'lr')]))
    .withPanel(ts('Gradient norm', 'none', 'Global L2 norm of the LoRA gradients before clipping.', [q(`dqlora_grad_norm{${C}}`, 'grad norm')]))
    .withPanel(ts('Tokens / s', 'none', 'Training throughput: the last step, and the rate of the token counter.', [
      q(`dqlora_tokens_per_second{${C}}`, 'last step'), q(`sum(rate(dqlora_tokens_total{${C}}[$__rate_interval]))`, 'rate'),
    ]));

  d.withRow(new RowBuilder('Pipeline'))
    .withPanel(ts('Step duration', 's', 'Wall time of one optimizer step (coordinator histogram), quantiles.', quantiles('dqlora_step_duration_seconds', C, 'le', '')))
    .withPanel(ts('Stage compute per step (p50)', 's', 'Forward and backward compute time of each stage per step, as the workers report it.', [
      q(`histogram_quantile(0.5, sum by (le, stage, phase) (rate(dqlora_stage_duration_seconds_bucket{${C}}[$__rate_interval])))`, 'stage {{stage}} {{phase}}'),
    ]))
    .withPanel(ts('Pipeline bubble', 'percentunit', 'Fraction of the step each stage waits on others, and the theory for this layout (p stages, m micro-batches): (p-1)/(m+p-1).', [
      q(`dqlora_pipeline_bubble_ratio{${C}}`, 'bubble'), q(`dqlora_pipeline_bubble_theoretical_ratio{${C}}`, 'theory'),
    ]))
    .withPanel(ts('All-reduce duration', 's', 'LoRA gradient all-reduce over NATS per step, by stage (p50, p90).', [
      q(`histogram_quantile(0.5, sum by (le, stage) (rate(dqlora_allreduce_duration_seconds_bucket{${C}}[$__rate_interval])))`, 'stage {{stage}} p50'),
      q(`histogram_quantile(0.9, sum by (le, stage) (rate(dqlora_allreduce_duration_seconds_bucket{${C}}[$__rate_interval])))`, 'stage {{stage}} p90'),
    ]));

  d.withRow(new RowBuilder('Workers and transport'))
    .withPanel(ts('Workers by state', 'none', 'Registered workers counted by the coordinator, by state.', [q(`sum by (state) (dqlora_workers{${C}})`, '{{state}}')])
      .stacking(new StackingConfigBuilder().mode(StackingMode.Normal)))
    .withPanel(ts('Last step per worker', 'none', 'The last optimizer step each worker completed: a worker left behind has stalled.', [q(`dqlora_step{${W}}`, '{{pod}}')]))
    .withPanel(ts('Seconds since the last step', 's', 'Time since the coordinator completed an optimizer step: a flat sawtooth while training, a ramp when stalled.', [
      q(`time() - dqlora_last_step_timestamp_seconds{${C}}`, 'since last step'),
    ]))
    .withPanel(ts('Bytes per second by transport', 'Bps', 'Bytes sent and received by all processes of the job: gRPC (pipeline + control) and NATS (all-reduce).', [
      q(`sum by (transport) (rate(dqlora_sent_bytes_total{job="$job"}[$__rate_interval]))`, 'sent {{transport}}'),
      q(`sum by (transport) (rate(dqlora_received_bytes_total{job="$job"}[$__rate_interval]))`, 'received {{transport}}'),
    ]))
    .withPanel(ts('Refused connections and calls', 'reqps', 'Refused before a handler by the control and pipeline servers: wrong job token, per-peer connection limit, invalid uploads. A steady rate is a misconfigured worker or a probe.', [
      q(`sum by (service, reason) (rate(dqlora_rejected_requests_total{job="$job"}[$__rate_interval]))`, '{{service}} {{reason}}'),
    ]))
    .withPanel(ts('Memory in use by device', 'bytes', 'Model state memory per worker and device (cpu, cuda:N).', [
      q(`dqlora_memory_in_use_bytes{${W}}`, '{{pod}} {{device}}'),
    ]))
    .withPanel(ts('Process resident memory', 'bytes', 'Resident set size of every coordinator and worker process.', [
      q(`process_resident_memory_bytes{job="$job"}`, '{{pod}}'),
    ]))
    .withPanel(ts('Event loop lag (p99)', 's', 'Node.js event loop lag: long synchronous kernels delay heartbeats and /healthz.', [
      q(`nodejs_eventloop_lag_p99_seconds{job="$job"}`, '{{pod}}'),
    ]));

  d.withRow(new RowBuilder('Checkpoints'))
    .withPanel(ts('Checkpoint duration', 's', 'Mean time to write a checkpoint over the last hour (manifest and every stage shard, atomically).', [
      q(`sum(increase(dqlora_checkpoint_duration_seconds_sum{${C}}[1h])) / sum(increase(dqlora_checkpoint_duration_seconds_count{${C}}[1h]))`, 'mean (1h)'),
    ]))
    .withPanel(ts('Checkpoint size', 'bytes', 'Size of the last checkpoint written (no value before the first).', [q(`dqlora_checkpoint_size_bytes{${C}}`, 'size')]))
    .withPanel(stat('Checkpoint interval', 'none', 'training.save_every: steps between checkpoints (0 = only at the end; CheckpointStale stays quiet then).', q(`max(dqlora_checkpoint_interval_steps{${C}})`, 'steps')));

  return d.build();
}

/** The dashboard as committed: stable key order from the builder, two-space indent, trailing newline. */
export function dashboardJson(): string {
  return JSON.stringify(buildDashboard(), null, 2) + '\n';
}
