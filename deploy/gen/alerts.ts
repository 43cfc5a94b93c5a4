// Prometheus alert rules for a dqlora job. The same groups become the PrometheusRule object (Prometheus
// Operator) and deploy/prometheus/alerts.yml (plain Prometheus, `promtool check rules`).
//
// Label conventions the expressions rely on (set by deploy/gen/k8s.ts's ServiceMonitor / PodMonitor):
//   job        the dqlora job name (jobLabel = the `dqlora.io/job` label of the coordinator Service / worker pods)
//   container  "coordinator" | "worker" (added by Prometheus Operator to every target)
//   role       "worker" on every worker series (the worker registry's default label); absent on the coordinator
// Metric names come from common/metrics.ts; test/deploy/alerts.test.ts checks that each one exists.
import type { DeployConfig } from './config.ts';

export interface AlertRule {
  readonly alert: string;
  readonly expr: string;
  readonly for?: string;
  readonly labels: { readonly severity: 'critical' | 'warning' | 'info' };
  readonly annotations: { readonly summary: string; readonly description: string; readonly runbook?: string };
}

export interface RuleGroup {
  readonly name: string;
  readonly interval?: string;
  readonly rules: readonly AlertRule[];
}

/** Coordinator series: the coordinator's registry has no `role` label, every worker series has role="worker". */
const COORD = 'role!="worker"';
const WORKER = 'role="worker"';

export function alertGroups(c: DeployConfig): RuleGroup[] {
  const a = c.alerts;
  const noProgress = `${a.noProgressMinutes}m`;
  return [
    {
      name: 'dqlora.workers',
      rules: [
        {
          alert: 'DqloraWorkerDown',
          expr: 'up{container="worker"} == 0',
          for: '2m',
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora worker {{ $labels.pod }} is not answering /metrics',
            description: 'Prometheus has failed to scrape worker pod {{ $labels.pod }} (job {{ $labels.job }}) for 2 minutes: the process is down, restarting, or its metrics port is unreachable. The coordinator pauses the job when a worker misses its heartbeats; check `kubectl logs` and `kubectl describe pod {{ $labels.pod }}`.',
          },
        },
        {
          alert: 'DqloraCoordinatorDown',
          expr: 'up{container="coordinator"} == 0',
          for: '2m',
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora coordinator {{ $labels.pod }} is not answering /metrics',
            description: 'The coordinator of job {{ $labels.job }} has not been scraped for 2 minutes. Without it no step runs; on restart it resumes from the newest checkpoint in output_dir.',
          },
        },
        {
          alert: 'DqloraWorkerLost',
          expr: 'sum by (job) (dqlora_workers{state="failed"}) > 0',
          for: '1m',
          labels: { severity: 'critical' },
          annotations: {
            summary: '{{ $value }} dqlora worker(s) of job {{ $labels.job }} lost (heartbeats missing)',
            description: 'The coordinator declared workers lost: no heartbeat within distributed.heartbeat_timeout_s, a closed control stream, or a failed command. The job pauses and resumes from the last checkpoint once a replacement registers (the StatefulSet restarts the pod); it fails after distributed.max_recoveries.',
          },
        },
        {
          alert: 'DqloraWorkerLagging',
          expr: `max by (job) (dqlora_step{${WORKER}}) - on (job) group_right () dqlora_step{${WORKER}} > 2`,
          for: '10m',
          labels: { severity: 'warning' },
          annotations: {
            summary: 'dqlora worker {{ $labels.pod }} is {{ $value }} steps behind the rest of job {{ $labels.job }}',
            description: 'Every worker takes part in every optimizer step, so a worker whose last completed step stays behind the others has stalled or restarted without rejoining. Check its logs; the coordinator declares it lost once its heartbeats stop.',
          },
        },
      ],
    },
    {
      name: 'dqlora.training',
      rules: [
        {
          alert: 'DqloraLossNotFinite',
          // x != x holds only for NaN; abs(x) == +Inf catches both infinities.
          expr: `(dqlora_train_loss{${COORD}} != dqlora_train_loss{${COORD}}) or (abs(dqlora_train_loss{${COORD}}) == +Inf) or (dqlora_grad_norm{${COORD}} != dqlora_grad_norm{${COORD}}) or (abs(dqlora_grad_norm{${COORD}}) == +Inf)`,
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }}: training loss or gradient norm is NaN or infinite',
            description: 'The last optimizer step produced a non-finite loss or gradient norm: the adapter is being corrupted. Stop the job and resume from the last good checkpoint with a lower learning rate, max_grad_norm > 0, or fixed data (empty label spans, overflowing bf16 activations).',
          },
        },
        {
          alert: 'DqloraNoProgress',
          expr: `sum by (job) (increase(dqlora_optimizer_steps_total{${COORD}}[${noProgress}])) == 0 and on (job) sum by (job) (dqlora_workers{state="training"}) > 0`,
          for: '5m',
          labels: { severity: 'critical' },
          annotations: {
            summary: `dqlora job {{ $labels.job }}: no optimizer step for ${a.noProgressMinutes} minutes`,
            description: `Workers are in the training state but no optimizer step completed in ${a.noProgressMinutes} minutes: a hung pipeline stage, a NATS all-reduce that never completes, or a step far slower than expected. Check the coordinator log for the step in flight and distributed.step_timeout_s.`,
          },
        },
        {
          alert: 'DqloraStepTimeRegression',
          expr: `(sum by (job) (rate(dqlora_step_duration_seconds_sum{${COORD}}[15m])) / sum by (job) (rate(dqlora_step_duration_seconds_count{${COORD}}[15m]))) > ${a.stepRegressionFactor} * (sum by (job) (rate(dqlora_step_duration_seconds_sum{${COORD}}[3h] offset 15m)) / sum by (job) (rate(dqlora_step_duration_seconds_count{${COORD}}[3h] offset 15m)))`,
          for: '15m',
          labels: { severity: 'warning' },
          annotations: {
            summary: `dqlora job {{ $labels.job }}: mean step time is over ${a.stepRegressionFactor}× its 3-hour baseline`,
            description: 'The mean optimizer step time of the last 15 minutes is well above that of the 3 hours before: a slow or throttled node, a GPU that fell back to the CPU backend, network congestion on the pipeline or NATS, or memory pressure. Compare per-stage durations and the pipeline bubble on the dashboard.',
          },
        },
        {
          alert: 'DqloraPipelineBubbleHigh',
          expr: `dqlora_pipeline_bubble_ratio{${COORD}} > 0.5`,
          for: '30m',
          labels: { severity: 'info' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }}: stages idle {{ $value | humanizePercentage }} of each step',
            description: 'More than half of every stage\'s step time is spent waiting on other stages. Raise training.grad_accum (more micro-batches per step shrink the bubble (p-1)/(m+p-1)) or rebalance stages.',
          },
        },
      ],
    },
    {
      name: 'dqlora.checkpoints',
      rules: [
        {
          alert: 'DqloraCheckpointStale',
          expr: `sum by (job) (increase(dqlora_checkpoint_duration_seconds_count{${COORD}}[${a.checkpointStaleHours}h])) == 0 and on (job) sum by (job) (increase(dqlora_optimizer_steps_total{${COORD}}[${a.checkpointStaleHours}h])) > 0`,
          for: '10m',
          labels: { severity: 'warning' },
          annotations: {
            summary: `dqlora job {{ $labels.job }}: no checkpoint written in ${a.checkpointStaleHours} hours while training`,
            description: 'Steps complete but no checkpoint was written: either training.save_every is 0 / larger than the steps in this window (then silence this alert), or checkpoint writes fail (see the coordinator log: a full or read-only outputs volume). A failure now loses all progress since the last checkpoint.',
          },
        },
        {
          alert: 'DqloraCheckpointSlow',
          expr: `histogram_quantile(0.9, sum by (job, le) (rate(dqlora_checkpoint_duration_seconds_bucket{${COORD}}[1h]))) > 300`,
          for: '5m',
          labels: { severity: 'warning' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }}: checkpoints take {{ $value | humanizeDuration }} (p90)',
            description: 'Writing a checkpoint (upload of every stage\'s LoRA and optimizer state, fsync, rename) takes over 5 minutes: the outputs volume is slow or nearly full. Steps stall while a checkpoint is written.',
          },
        },
      ],
    },
  ];
}
