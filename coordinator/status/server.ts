// The coordinator's HTTP server, in every mode (one process or workers):
//   GET /            the live status page (page/index.html + app.js; charts by uPlot, served from node_modules)
//   GET /status      StatusSnapshot as JSON (what `coordinator status` prints)
//   GET /history     the step series, ?since=N for the steps after N (the page pulls it incrementally)
//   GET /metrics     Prometheus text format (the coordinator's registry, common/metrics.ts)
//   GET /healthz     "ok"
// Everything the page needs comes from this server (CSP default-src 'self'), so it works offline.
// The HTTP side runs on a thread of its own (http-thread.mjs): a one-process run computes its steps on this
// thread, and a server here would not answer until the step ends. This side posts every change to it.
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Registry } from 'prom-client';
import { metricsHost } from '../../common/metrics.ts';
import { ConfigError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import type { StatusObserver } from './state.ts';

const log = logger('status');

const here = dirname(fileURLToPath(import.meta.url));
const uplotDist = join(dirname(createRequire(import.meta.url).resolve('uplot/package.json')), 'dist');

/** Static files: URL path → [file, content type]. */
const STATIC: Record<string, [string, string]> = {
  '/': [join(here, 'page', 'index.html'), 'text/html; charset=utf-8'],
  '/app.js': [join(here, 'page', 'app.js'), 'text/javascript; charset=utf-8'],
  '/app.css': [join(here, 'page', 'app.css'), 'text/css; charset=utf-8'],
  '/favicon.svg': [join(here, 'page', 'favicon.svg'), 'image/svg+xml'],
  '/favicon.ico': [join(here, 'page', 'favicon.svg'), 'image/svg+xml'],
  '/vendor/uPlot.iife.min.js': [join(uplotDist, 'uPlot.iife.min.js'), 'text/javascript; charset=utf-8'],
  '/vendor/uPlot.min.css': [join(uplotDist, 'uPlot.min.css'), 'text/css; charset=utf-8'],
};

/** How often the metrics text is re-collected for the HTTP thread when no event came (ms). */
const METRICS_REFRESH_MS = 2000;

const CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'";

export interface StatusServer {
  readonly port: number;
  /** http://HOST:PORT (a wildcard bind is shown as 127.0.0.1). */
  readonly url: string;
  /**
   * Stops serving. With `lingerMs`, a page that was watching (it fetched /status in the last few seconds) and has not
   * yet been served the run's end first gets up to that long to fetch it — the end of a run (its before/after
   * answers) would otherwise never reach the page.
   */
  close(opts?: { lingerMs?: number }): Promise<void>;
}

export interface StatusServerOptions {
  readonly status: StatusObserver;
  readonly registry: Registry;
  /** 0 = OS-assigned. */
  readonly port: number;
  /** Default: DQLORA_METRICS_HOST, else 127.0.0.1 (exposing it is a deployment choice). */
  readonly host?: string;
}

export function startStatusServer(o: StatusServerOptions): Promise<StatusServer> {
  if (!Number.isInteger(o.port) || o.port < 0 || o.port > 65535) throw new ConfigError(`http_port: ${o.port} is not a port`, { hint: 'use 0..65535 (0 = OS-assigned), or -1 to serve no HTTP' });
  const host = o.host ?? metricsHost();
  const thread = new Worker(new URL('./http-thread.mjs', import.meta.url), { workerData: { port: o.port, host, files: STATIC, csp: CSP } });
  // The mirror: the snapshot on every change, the history rows not sent yet (all of them after a rollback), and the
  // metrics text once the registry has collected it (a few microtasks later).
  let sentVersion = -1, sentStep = 0, closed = false, metricsQueued = false;
  const publish = (): void => {
    if (closed) return;
    const snap = o.status.snapshot();
    thread.postMessage({ t: 'status', json: JSON.stringify(snap), final: snap.state !== 'training' && snap.state !== 'waiting' });
    const reset = snap.historyVersion !== sentVersion;
    const rows = o.status.history(reset ? 0 : sentStep);
    if (reset || rows.step.length) {
      thread.postMessage({ t: 'history', reset, rows });
      sentVersion = snap.historyVersion;
      if (rows.step.length) sentStep = rows.step[rows.step.length - 1];
    }
    // Collected once the current notification is through (every observer of the event, the metrics one included,
    // has run): a microtask. (In one process the loop yields to microtasks only at its next await; the
    // metrics text may then trail /status by one step, never the other way round.)
    if (!metricsQueued) { metricsQueued = true; queueMicrotask(() => { metricsQueued = false; publishMetrics(); }); }
  };
  const publishMetrics = (): void => {
    o.registry.metrics().then(
      (text) => { if (!closed) thread.postMessage({ t: 'metrics', text, contentType: o.registry.contentType }); },
      (e: unknown) => log.warn({ err: String(e) }, 'collecting metrics for /metrics failed'),
    );
  };
  const unsubscribe = o.status.subscribe(publish);
  // Series that change without an event (bytes over gRPC/NATS, process_*): refreshed whenever this thread is free.
  const refresh = setInterval(publishMetrics, METRICS_REFRESH_MS).unref();
  publish();
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => { unsubscribe(); clearInterval(refresh); reject(e); };
    thread.once('error', onError);
    thread.on('message', function first(m: { t: string; port?: number; code?: string; message?: string }) {
      if (m.t === 'error') {
        thread.off('message', first); thread.off('error', onError); unsubscribe(); clearInterval(refresh);
        void thread.terminate();
        reject(m.code === 'EADDRINUSE'
          ? new ConfigError(`http_port: ${host}:${o.port} is already in use`, { hint: 'pick another http_port / --http-port, or 0 for an OS-assigned one' })
          : new ConfigError(`http_port: cannot serve on ${host}:${o.port}: ${m.message}`));
      } else if (m.t === 'listening') {
        thread.off('message', first); thread.off('error', onError);
        thread.on('error', (e) => log.warn({ err: e.message }, 'the status server thread failed'));
        thread.unref(); // never what keeps the process alive
        const port = m.port!;
        const shown = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;
        resolve({
          port, url: `http://${shown}:${port}`,
          close: async (c = {}) => {
            if (closed) return;
            publish();
            closed = true;
            unsubscribe();
            clearInterval(refresh);
            thread.ref();
            await new Promise<void>((res) => {
              thread.once('exit', () => res());
              thread.once('message', (x: { t: string }) => { if (x.t === 'closed') void thread.terminate(); });
              thread.postMessage({ t: 'close', lingerMs: c.lingerMs ?? 0 });
            });
          },
        });
      }
    });
  });
}
