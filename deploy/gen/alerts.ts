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

/**
 * Series of a job that has ended (succeeded, failed or stopped by a signal): the coordinator's last scraped job
 * state (it serves its final metrics for DQLORA_METRICS_LINGER_S after the end). `unless on (job)` this, the
 * Down alerts stay quiet after a job finished and its pods are gone or completed.
 */
const ENDED = `(max by (job) (last_over_time(dqlora_job_state{${COORD}, state=~"succeeded|failed|stopped"}[1h])) == 1)`;

export function alertGroups(c: DeployConfig): RuleGroup[] {
  const a = c.alerts;
  const noProgress = `${a.noProgressMinutes}m`;
  const lag = `${a.lagMinutes}m`;
  const stale = `${a.checkpointStaleHours}h`;
  return [
    {
      name: 'dqlora.workers',
      rules: [
        {
          alert: 'DqloraWorkerDown',
          expr: `up{container="worker"} == 0 unless on (job) ${ENDED}`,
          for: '2m',
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora worker {{ $labels.pod }} is not answering /metrics',
            description: 'Prometheus has failed to scrape worker pod {{ $labels.pod }} (job {{ $labels.job }}) for 2 minutes while the job has not ended: the process is down, restarting, or its metrics port is unreachable. The coordinator pauses the job when a worker misses its heartbeats; check `kubectl logs` and `kubectl describe pod {{ $labels.pod }}`.',
          },
        },
        {
          alert: 'DqloraCoordinatorDown',
          expr: `up{container="coordinator"} == 0 unless on (job) ${ENDED}`,
          for: '2m',
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora coordinator {{ $labels.pod }} is not answering /metrics',
            description: 'The coordinator of job {{ $labels.job }} has not been scraped for 2 minutes and the job has not ended. Without it no step runs; its Job replaces the pod, which resumes from the newest checkpoint in output_dir.',
          },
        },
        {
          alert: 'DqloraWorkerLost',
          // The recoveries counter keeps what a gauge sampled every 15 s can miss (a worker lost and replaced
          // between two scrapes); the gauge still catches a job waiting for a replacement.
          expr: `sum by (job) (increase(dqlora_recoveries_total{${COORD}}[10m])) > 0 or sum by (job) (dqlora_workers{${COORD}, state="failed"}) > 0`,
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }} lost worker(s) and is recovering',
            description: 'The coordinator declared workers lost (no heartbeat within distributed.heartbeat_timeout_s, a closed control stream, or a failed command) and rolled back to the last checkpoint; `event: "recover"` lines in its log name the worker and the reason. The job fails after distributed.max_recoveries.',
          },
        },
        {
          alert: 'DqloraWorkerLagging',
          // By time, not by step numbers sampled at different moments: every worker takes part in every step,
          // so a worker whose step has not changed for the whole window while the job's steps went on is stuck.
          expr: `changes(dqlora_step{${WORKER}}[${lag}]) == 0 and on (job) (sum by (job) (increase(dqlora_optimizer_steps_total{${COORD}}[${lag}])) > 0)`,
          for: '5m',
          labels: { severity: 'warning' },
          annotations: {
            summary: `dqlora worker {{ $labels.pod }} completed no step in ${a.lagMinutes} minutes while job {{ $labels.job }} advanced`,
            description: 'Every worker takes part in every optimizer step, so a worker whose last completed step stays the same while the job advances has stalled, or restarted without rejoining. Check its logs; the coordinator declares it lost once its heartbeats stop.',
          },
        },
      ],
    },
    {
      name: 'dqlora.job',
      rules: [
        {
          alert: 'DqloraJobFailed',
          expr: `last_over_time(dqlora_job_state{${COORD}, state="failed"}[15m]) == 1`,
          labels: { severity: 'critical' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }} failed',
            description: 'The coordinator ended the job with a fatal error (bad input, or recoveries exhausted): its log\'s `event: "fatal"` line says what and what to do. The Kubernetes Job is marked failed and is not retried.',
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
          expr: `sum by (job) (increase(dqlora_optimizer_steps_total{${COORD}}[${noProgress}])) == 0 and on (job) sum by (job) (dqlora_workers{${COORD}, state="training"}) > 0`,
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
          // Relative to the layout's own theory: a 2-stage job with 4 micro-batches idles 20 % by design.
          expr: `dqlora_pipeline_bubble_ratio{${COORD}} - on (job) dqlora_pipeline_bubble_theoretical_ratio{${COORD}} > ${a.bubbleExcess}`,
          for: '30m',
          labels: { severity: 'info' },
          annotations: {
            summary: 'dqlora job {{ $labels.job }}: stages idle {{ $value | humanizePercentage }} of each step beyond the pipeline\'s theoretical bubble',
            description: 'Stages wait on each other more than an ideal schedule of this layout would ((p-1)/(m+p-1)): unbalanced stages, slow transfers between them, or a straggler. Compare per-stage durations; raise training.grad_accum or rebalance stages.',
          },
        },
      ],
    },
    {
      name: 'dqlora.checkpoints',
      rules: [
        {
          alert: 'DqloraCheckpointStale',
          // Only when checkpoints are configured (save_every > 0) and overdue: more than two intervals' worth of
          // steps in the window without one.
          expr: `sum by (job) (increase(dqlora_checkpoint_duration_seconds_count{${COORD}}[${stale}])) == 0 and on (job) sum by (job) (increase(dqlora_optimizer_steps_total{${COORD}}[${stale}])) > on (job) 2 * max by (job) (dqlora_checkpoint_interval_steps{${COORD}}) and on (job) max by (job) (dqlora_checkpoint_interval_steps{${COORD}}) > 0`,
          for: '10m',
          labels: { severity: 'warning' },
          annotations: {
            summary: `dqlora job {{ $labels.job }}: no checkpoint in ${a.checkpointStaleHours} hours though two were due`,
            description: 'More than 2 × training.save_every steps completed without a checkpoint: checkpoint writes fail (see the coordinator log: a full or read-only outputs volume, a worker that cannot upload its state). A failure now loses all progress since the last checkpoint.',
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
