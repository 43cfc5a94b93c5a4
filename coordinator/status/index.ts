// Watching a run: everything that reports on a job, behind one entry point for the job loop.
//   const reporting = await startReporting(job, { print });   // starts the HTTP server (status page, /metrics)
//   ... the loop calls reporting.observers (JobObserver) ...
//   await reporting.close();
// The observers: the live state (/status, the page), Prometheus series, train_log.jsonl, loss.svg, TensorBoard
// files (report: [tensorboard]) and the terminal (bar + log lines).
import { writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { JobConfig } from '../job.ts';
import type { JobObserver } from '../events.ts';
import { createCoordinatorMetrics, type CoordinatorMetrics } from '../../common/metrics.ts';
import { jobLayout } from '../job.ts';
import { jobMetricsObserver } from '../metrics-observer.ts';
import { ConfigError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import { StatusObserver } from './state.ts';
import { TrainLogObserver } from './train-log.ts';
import { LossPlotObserver } from './loss-plot.ts';
import { TensorBoardObserver } from './tensorboard.ts';
import { TerminalObserver } from './terminal.ts';
import { startStatusServer, type StatusServer } from './server.ts';

export { StatusObserver, type StatusSnapshot, type StepHistory } from './state.ts';
export { TrainLogObserver, readTrainLog, TRAIN_LOG } from './train-log.ts';
export { LossPlotObserver, renderLossSvg, LOSS_PLOT } from './loss-plot.ts';
export { TensorBoardObserver, readEventFile } from './tensorboard.ts';
export { TerminalObserver } from './terminal.ts';
export { startStatusServer, type StatusServer } from './server.ts';

/** The file in output_dir holding the running job's status URL (read by `coordinator status --output DIR`). */
export const STATUS_URL_FILE = 'status-url';
/** The last /status of a finished invocation, written by close() (what `coordinator status --output DIR` shows then). */
export const STATUS_FILE = 'status.json';
/** How long close() waits for a watching page to fetch the final state. */
const LINGER_MS = 2500;

export interface Reporting {
  readonly observers: readonly JobObserver[];
  readonly status: StatusObserver;
  readonly metrics: CoordinatorMetrics;
  readonly server: StatusServer | null;
  close(): Promise<void>;
}

export interface ReportingOptions {
  /** The coordinator's registry when the loop already has one (the control plane counts bytes and workers in it). */
  readonly metrics?: CoordinatorMetrics;
  /** Set the Prometheus series from the events (default true; false while a caller still sets them itself). */
  readonly metricsFromEvents?: boolean;
  /** Overrides job.http_port (default: $DQLORA_HTTP_PORT, which `start --http-port` sets, else job.http_port). */
  readonly httpPort?: number;
  /** Show the training bar (default: stderr is a terminal); false = log lines. */
  readonly progress?: boolean;
  /** The terminal observer: 'full' (bar or step lines, eval/checkpoint/recovery lines; default), 'bar' (the bar only,
   *  when another observer writes the lines), 'none'. */
  readonly terminal?: 'full' | 'bar' | 'none';
  readonly print?: (s: string) => void;
}

/** The HTTP port to serve: an explicit option, $DQLORA_HTTP_PORT, or job.http_port; −1 = none. */
export function httpPortOf(job: JobConfig, explicit?: number, env: NodeJS.ProcessEnv = process.env): number {
  if (explicit !== undefined) return explicit;
  const e = env.DQLORA_HTTP_PORT?.trim();
  if (e) {
    const n = Number(e);
    if (!Number.isInteger(n) || n < -1 || n > 65535) throw new ConfigError(`DQLORA_HTTP_PORT=${e} (or --http-port) is not a port`, { hint: 'use 0..65535 (0 = OS-assigned) or -1 for no HTTP server' });
    return n;
  }
  return job.http_port;
}

export async function startReporting(job: JobConfig, o: ReportingOptions = {}): Promise<Reporting> {
  const port = httpPortOf(job, o.httpPort);
  const metrics = o.metrics ?? createCoordinatorMetrics({ defaultLabels: { job: job.name } });
  const status = new StatusObserver();
  const observers: JobObserver[] = [status];
  if (o.metricsFromEvents ?? true) {
    observers.push(jobMetricsObserver(metrics, { replicas: jobLayout(job).replicas, microBatches: job.training.grad_accum, saveEvery: job.training.save_every }));
  }
  observers.push(new TrainLogObserver(job.training.log_every), new LossPlotObserver());
  if (job.report.includes('tensorboard')) observers.push(new TensorBoardObserver());
  const term = o.terminal ?? 'full';
  if (term !== 'none') observers.push(new TerminalObserver({ tty: o.progress, logEvery: job.training.log_every, barOnly: term === 'bar' }));
  let server: StatusServer | null = null;
  if (port >= 0) {
    server = await startStatusServer({ status, registry: metrics.registry, port });
    mkdirSync(job.output_dir, { recursive: true });
    writeFileSync(join(job.output_dir, STATUS_URL_FILE), server.url + '\n');
    logger('status').debug({ url: server.url }, 'status page');
    o.print?.(`status page: ${server.url}  (also /status, /metrics; in another terminal: npx coordinator status --url ${server.url})`);
  }
  return {
    observers, status, metrics, server,
    close: async () => {
      const snap = status.snapshot();
      if (snap.job) { // the run started (a config or data error before that leaves no status behind)
        mkdirSync(job.output_dir, { recursive: true });
        writeFileSync(join(job.output_dir, STATUS_FILE), JSON.stringify(snap, null, 1) + '\n');
      }
      if (!server) return;
      await server.close({ lingerMs: LINGER_MS });
      rmSync(join(job.output_dir, STATUS_URL_FILE), { force: true });
    },
  };
}
