// Prometheus metrics for the coordinator and the workers (prom-client), each in its own Registry — never
// the global default one, so tests and a coordinator + local workers in one process do not collide.
//
// Naming follows the Prometheus conventions: `dqlora_` prefix, base units in the name (seconds, bytes),
// `_total` on counters only, `_ratio` for fractions; the process/Node.js default metrics keep their
// standard names (process_*, nodejs_*) so stock dashboards work. Checked by `promtool check metrics`
// in test/distributed/metrics.test.ts. The series each metric carries:
//   loss, eval loss, learning rate, grad norm, tokens/s          gauges, set once per optimizer step
//   step / stage (forward, backward) / all-reduce durations        histograms, seconds
//   pipeline bubble                                                 gauge, fraction of step time idle
//   bytes over gRPC and NATS                                        counters, label transport=grpc|nats
//   workers by state                                                gauge, label state
//   checkpoint duration / size                                      histogram, seconds / gauge, bytes
//   memory in use                                                   gauge, bytes, label device
//   job state                                                       gauge, label state (one is 1, the others 0)
//   recoveries                                                      counter
// Gauges of values that arrive later (loss, eval loss, checkpoint size, …) have no sample until their first
// value: a 0 before the first evaluation would read as a perfect loss. The `job` label belongs to Prometheus
// (the scrape job; the ServiceMonitor sets it to the dqlora job name): a registry label of that name would be
// renamed `exported_job`, so the job name goes in `dqlora_job`.
//   refused connections / calls                                     counter, labels service, reason
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Durations of whole optimizer steps: 10 ms … ~11 min. */
const STEP_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 650];
/** Durations of per-stage work and all-reduces: 1 ms … 2 min. */
const FAST_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120];
/** Checkpoint writes: 10 ms … 10 min. */
const CHECKPOINT_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600];

export type Transport = 'grpc' | 'nats';
export type Phase = 'forward' | 'backward';
/** Worker states as the coordinator counts them (mirrors proto WorkerState, lower-case). */
export const WORKER_STATES = ['registered', 'loading', 'ready', 'training', 'checkpointing', 'failed', 'stopped'] as const;
export type WorkerStateLabel = (typeof WORKER_STATES)[number];
/** The job's state, as the coordinator's dqlora_job_state gauge shows it. */
export const JOB_STATES = ['starting', 'running', 'recovering', 'stopping', 'succeeded', 'failed', 'stopped'] as const;
export type JobStateLabel = (typeof JOB_STATES)[number];

/** Metrics both roles export. */
interface CommonMetrics {
  registry: Registry;
  sentBytes: Counter<'transport'>;
  receivedBytes: Counter<'transport'>;
  checkpointDuration: Histogram<never>;
  checkpointSize: Gauge<never>;
  memoryInUse: Gauge<'device'>;
  /** Connections and calls refused before reaching a handler (common/grpc-guard.ts), by service and reason. */
  rejectedRequests: Counter<'service' | 'reason'>;
}

export interface CoordinatorMetrics extends CommonMetrics {
  loss: Gauge<never>;
  evalLoss: Gauge<never>;
  learningRate: Gauge<never>;
  gradNorm: Gauge<never>;
  tokensPerSecond: Gauge<never>;
  tokens: Counter<never>;
  steps: Counter<never>;
  stepDuration: Histogram<never>;
  /** Per stage, from the workers' step reports. */
  stageDuration: Histogram<'stage' | 'phase'>;
  allReduceDuration: Histogram<'stage'>;
  pipelineBubble: Gauge<never>;
  workers: Gauge<'state'>;
  /** Sets the worker-count gauge for every state (states absent from `counts` become 0). */
  setWorkerCounts(counts: Partial<Record<WorkerStateLabel, number>>): void;
  /** 1 for the job's current state, 0 for the others. */
  jobState: Gauge<'state'>;
  setJobState(state: JobStateLabel): void;
  /** Recoveries: a lost worker or failed step rolled back to the last checkpoint. */
  recoveries: Counter<never>;
  /** Sequences per micro-batch the steps run with (requested, auto's pick, or after an out-of-memory split). */
  microBatchSize: Gauge<never>;
  /** Out-of-memory splits: a micro-batch did not fit, the step ran again with half the rows. */
  microBatchSplits: Counter<never>;
  /** (p−1)/(m+p−1) of the layout: the bubble a perfect 1F1B/GPipe schedule has. */
  pipelineBubbleTheoretical: Gauge<never>;
  /** training.save_every (0 = a checkpoint only at the end): alerts on stale checkpoints need it. */
  checkpointIntervalSteps: Gauge<never>;
  /** Unix time the last optimizer step completed. */
  lastStepTimestamp: Gauge<never>;
}

export interface WorkerMetrics extends CommonMetrics {
  stageDuration: Histogram<'phase'>;
  allReduceDuration: Histogram<never>;
  stepDuration: Histogram<never>;
  /** This worker's current step (−1 before the first). */
  step: Gauge<never>;
}

export interface MetricsOptions {
  /** Labels added to every series of this registry, e.g. { worker_id: 'w3', stage: '1' }. */
  defaultLabels?: Record<string, string>;
  /** Also export process_* and nodejs_* metrics (default true). */
  processMetrics?: boolean;
}

function newRegistry(opts: MetricsOptions): Registry {
  const registry = new Registry();
  if (opts.defaultLabels) {
    // `job` is Prometheus' own target label: exported as-is it becomes `exported_job` (see the header).
    const { job, ...rest } = opts.defaultLabels;
    registry.setDefaultLabels(job === undefined ? rest : { ...rest, dqlora_job: job });
  }
  if (opts.processMetrics ?? true) {
    collectDefaultMetrics({ register: registry });
    // prom-client exports these totals as gauges with a `_total` suffix, which breaks the naming rules
    // (promtool flags them); the same numbers remain available as nodejs_active_{handles,requests,resources}.
    for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) {
      registry.removeSingleMetric(name);
    }
  }
  return registry;
}

/** A gauge without a sample until its first set() (prom-client starts unlabelled gauges at 0). */
function unsetGauge<T extends string>(g: Gauge<T>): Gauge<T> {
  const reset = g.reset.bind(g);
  const clear = (): void => { (g as unknown as { hashMap: Record<string, unknown> }).hashMap = {}; };
  g.reset = () => { reset(); clear(); };
  clear();
  return g;
}

function common(registry: Registry, role: string): CommonMetrics {
  const registers = [registry];
  return {
    registry,
    sentBytes: new Counter({ name: 'dqlora_sent_bytes_total', help: `Bytes this ${role} sent, by transport (gRPC pipeline/control, NATS all-reduce).`, labelNames: ['transport'] as const, registers }),
    receivedBytes: new Counter({ name: 'dqlora_received_bytes_total', help: `Bytes this ${role} received, by transport.`, labelNames: ['transport'] as const, registers }),
    checkpointDuration: new Histogram({ name: 'dqlora_checkpoint_duration_seconds', help: `Time to write a checkpoint (${role === 'worker' ? 'this worker\'s shard' : 'manifest and all shards'}).`, buckets: CHECKPOINT_BUCKETS, registers }),
    checkpointSize: unsetGauge(new Gauge({ name: 'dqlora_checkpoint_size_bytes', help: `Size of the last checkpoint written (${role === 'worker' ? 'this worker\'s shard' : 'all shards'}).`, registers })),
    memoryInUse: new Gauge({ name: 'dqlora_memory_in_use_bytes', help: 'Memory in use by model state, by device (cpu, cuda:N).', labelNames: ['device'] as const, registers }),
    rejectedRequests: new Counter({ name: 'dqlora_rejected_requests_total', help: `Connections and calls this ${role} refused (wrong job token, per-peer connection limit, TLS/plaintext mismatch, silent connection), by service and reason.`, labelNames: ['service', 'reason'] as const, registers }),
  };
}

export function createCoordinatorMetrics(opts: MetricsOptions = {}): CoordinatorMetrics {
  const registry = newRegistry(opts);
  const registers = [registry];
  const workers = new Gauge({ name: 'dqlora_workers', help: 'Registered workers by state.', labelNames: ['state'] as const, registers });
  for (const s of WORKER_STATES) workers.set({ state: s }, 0);
  const jobState = new Gauge({ name: 'dqlora_job_state', help: 'The job\'s state: 1 for the current one (starting, running, recovering, stopping, succeeded, failed, stopped), 0 for the others.', labelNames: ['state'] as const, registers });
  for (const s of JOB_STATES) jobState.set({ state: s }, s === 'starting' ? 1 : 0);
  return {
    ...common(registry, 'coordinator'),
    loss: unsetGauge(new Gauge({ name: 'dqlora_train_loss', help: 'Training loss of the last optimizer step (mean over label tokens).', registers })),
    evalLoss: unsetGauge(new Gauge({ name: 'dqlora_eval_loss', help: 'Loss on the validation split at the last evaluation.', registers })),
    learningRate: unsetGauge(new Gauge({ name: 'dqlora_learning_rate', help: 'Learning rate of the last optimizer step.', registers })),
    gradNorm: unsetGauge(new Gauge({ name: 'dqlora_grad_norm', help: 'Global L2 norm of the LoRA gradients of the last step (before clipping).', registers })),
    tokensPerSecond: unsetGauge(new Gauge({ name: 'dqlora_tokens_per_second', help: 'Training throughput of the last optimizer step, tokens per second.', registers })),
    tokens: new Counter({ name: 'dqlora_tokens_total', help: 'Training tokens processed (including padding-free prompt tokens).', registers }),
    steps: new Counter({ name: 'dqlora_optimizer_steps_total', help: 'Optimizer steps completed.', registers }),
    stepDuration: new Histogram({ name: 'dqlora_step_duration_seconds', help: 'Wall time of one optimizer step, schedule start to last update.', buckets: STEP_BUCKETS, registers }),
    stageDuration: new Histogram({ name: 'dqlora_stage_duration_seconds', help: 'Compute time of one stage per step, by phase, as reported by the workers.', labelNames: ['stage', 'phase'] as const, buckets: FAST_BUCKETS, registers }),
    allReduceDuration: new Histogram({ name: 'dqlora_allreduce_duration_seconds', help: 'LoRA gradient all-reduce time per step, by stage, as reported by the workers.', labelNames: ['stage'] as const, buckets: FAST_BUCKETS, registers }),
    pipelineBubble: unsetGauge(new Gauge({ name: 'dqlora_pipeline_bubble_ratio', help: 'Fraction of the last step\'s stage time spent idle waiting on other stages (0..1).', registers })),
    workers,
    setWorkerCounts(counts) {
      for (const s of WORKER_STATES) workers.set({ state: s }, counts[s] ?? 0);
    },
    jobState,
    setJobState(state) {
      for (const s of JOB_STATES) jobState.set({ state: s }, s === state ? 1 : 0);
    },
    recoveries: new Counter({ name: 'dqlora_recoveries_total', help: 'Recoveries: the job paused, rolled back to its last checkpoint and resumed (lost worker, failed step).', registers }),
    microBatchSize: unsetGauge(new Gauge({ name: 'dqlora_micro_batch_size', help: 'Sequences per micro-batch the steps run with: as requested, what micro_batch_size: auto picked, or smaller after an out-of-memory split.', registers })),
    microBatchSplits: new Counter({ name: 'dqlora_micro_batch_splits_total', help: 'Out-of-memory splits: a micro-batch did not fit in device memory and the step (or evaluation) ran again with half as many sequences per micro-batch.', registers }),
    pipelineBubbleTheoretical: unsetGauge(new Gauge({ name: 'dqlora_pipeline_bubble_theoretical_ratio', help: 'Bubble of an ideal pipeline schedule for this layout: (stages-1)/(micro-batches+stages-1).', registers })),
    checkpointIntervalSteps: unsetGauge(new Gauge({ name: 'dqlora_checkpoint_interval_steps', help: 'training.save_every: optimizer steps between checkpoints (0 = only at the end).', registers })),
    lastStepTimestamp: unsetGauge(new Gauge({ name: 'dqlora_last_step_timestamp_seconds', help: 'Unix time the last optimizer step completed.', registers })),
  };
}

export function createWorkerMetrics(opts: MetricsOptions = {}): WorkerMetrics {
  const registry = newRegistry(opts);
  const registers = [registry];
  return {
    ...common(registry, 'worker'),
    stageDuration: new Histogram({ name: 'dqlora_stage_duration_seconds', help: 'Compute time of this worker\'s stage per micro-batch, by phase.', labelNames: ['phase'] as const, buckets: FAST_BUCKETS, registers }),
    allReduceDuration: new Histogram({ name: 'dqlora_allreduce_duration_seconds', help: 'LoRA gradient all-reduce time per step over NATS.', buckets: FAST_BUCKETS, registers }),
    stepDuration: new Histogram({ name: 'dqlora_step_duration_seconds', help: 'Wall time of this worker\'s part of one optimizer step.', buckets: STEP_BUCKETS, registers }),
    step: new Gauge({ name: 'dqlora_step', help: 'Last optimizer step this worker completed (-1 before the first).', registers }),
  };
}

export interface MetricsServer {
  port: number;
  close(): Promise<void>;
}

/** One probe's answer: ok → 200, else 503; `detail` is the response body (what a `kubectl describe` shows). */
export interface HealthStatus { readonly ok: boolean; readonly detail: string }

/**
 * What the probes mean (Kubernetes): liveness (`/healthz`) = the process answers and need not be restarted;
 * readiness (`/readyz`) = it can do its job now (a worker: its stage is loaded and it can take a step). A check
 * that throws counts as not ok. Without checks both answer "ok" while the process serves HTTP.
 */
export interface HealthChecks {
  live?(): HealthStatus;
  ready?(): HealthStatus;
}

/** Host the /metrics server binds: DQLORA_METRICS_HOST (0.0.0.0 in Kubernetes, so probes and Prometheus reach it), else loopback. */
export function metricsHost(env: NodeJS.ProcessEnv = process.env): string {
  return env.DQLORA_METRICS_HOST?.trim() || '127.0.0.1';
}

function probe(health: HealthChecks, which: 'live' | 'ready'): HealthStatus {
  const name = which === 'ready' && !health.ready ? 'live' : which;
  if (!health[name]) return { ok: true, detail: 'ok' };
  try { return health[name](); } catch (e) { return { ok: false, detail: `health check failed: ${(e as Error).message}` }; }
}

/**
 * Serves `GET /metrics` (Prometheus text format), `GET /healthz` (liveness) and `GET /readyz` (readiness) on
 * host:port (port 0 = any free port; the bound one is returned). Binds 127.0.0.1 unless told otherwise: exposing
 * it is a deployment choice.
 */
export function serveMetrics(registry: Registry, port: number, host = metricsHost(), health: HealthChecks = {}): Promise<MetricsServer> {
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
    } else if (path === '/metrics') {
      registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
        (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`collecting metrics failed: ${String(err)}\n`),
      );
    } else if (path === '/healthz' || path === '/readyz') {
      const h = probe(health, path === '/healthz' ? 'live' : 'ready');
      res.writeHead(h.ok ? 200 : 503, { 'content-type': 'text/plain' }).end(`${h.detail}\n`);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics, /healthz or /readyz\n');
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve({
        port: (server.address() as AddressInfo).port,
        close: () => new Promise<void>((res, rej) => {
          server.close((e) => (e ? rej(e) : res()));
          server.closeAllConnections();
        }),
      });
    });
  });
}
