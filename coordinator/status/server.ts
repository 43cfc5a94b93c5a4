// The coordinator's HTTP server, in every mode (one process or workers):
//   GET /            the live status page (page/index.html + app.js; charts by uPlot, served from node_modules)
//   GET /status      StatusSnapshot as JSON (what `coordinator status` prints)
//   GET /history     the step series, ?since=N for the steps after N (the page pulls it incrementally)
//   GET /metrics     Prometheus text format (the coordinator's registry, common/metrics.ts)
//   GET /healthz     "ok"
// Everything the page needs comes from this server (CSP default-src 'self'), so it works offline.
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import { metricsHost } from '../../common/metrics.ts';
import { ConfigError } from '../../common/errors.ts';
import type { StatusObserver } from './state.ts';

const here = dirname(fileURLToPath(import.meta.url));
const uplotDist = join(dirname(createRequire(import.meta.url).resolve('uplot/package.json')), 'dist');

/** Static files: URL path → [file, content type]. Read once, on first request. */
const STATIC: Record<string, [string, string]> = {
  '/': [join(here, 'page', 'index.html'), 'text/html; charset=utf-8'],
  '/app.js': [join(here, 'page', 'app.js'), 'text/javascript; charset=utf-8'],
  '/app.css': [join(here, 'page', 'app.css'), 'text/css; charset=utf-8'],
  '/favicon.svg': [join(here, 'page', 'favicon.svg'), 'image/svg+xml'],
  '/favicon.ico': [join(here, 'page', 'favicon.svg'), 'image/svg+xml'],
  '/vendor/uPlot.iife.min.js': [join(uplotDist, 'uPlot.iife.min.js'), 'text/javascript; charset=utf-8'],
  '/vendor/uPlot.min.css': [join(uplotDist, 'uPlot.min.css'), 'text/css; charset=utf-8'],
};
const cache = new Map<string, Buffer>();

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

/** A page polls /status every second; one seen this recently is still watching. */
const WATCHING_MS = 5000;

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
  let lastStatusAt = -Infinity, servedFinal = false;
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const head = req.method === 'HEAD';
    const send = (code: number, type: string, body: string | Buffer, extra: Record<string, string> = {}): void => {
      res.writeHead(code, { 'content-type': type, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', ...extra }).end(head ? undefined : body);
    };
    if (req.method !== 'GET' && !head) { res.writeHead(405, { allow: 'GET, HEAD' }).end(); return; }
    const json = (v: unknown): void => send(200, 'application/json; charset=utf-8', JSON.stringify(v));
    switch (url.pathname) {
      case '/status': {
        const snap = o.status.snapshot();
        lastStatusAt = performance.now();
        servedFinal = snap.state !== 'training' && snap.state !== 'waiting';
        json(snap);
        return;
      }
      case '/history': {
        const since = Number(url.searchParams.get('since') ?? 0);
        if (!Number.isInteger(since) || since < 0) { send(400, 'text/plain', 'since must be a non-negative integer step\n'); return; }
        json(o.status.history(since));
        return;
      }
      case '/metrics':
        o.registry.metrics().then(
          (text) => send(200, o.registry.contentType, text),
          (err: unknown) => send(500, 'text/plain', `collecting metrics failed: ${String(err)}\n`),
        );
        return;
      case '/healthz': send(200, 'text/plain', 'ok\n'); return;
    }
    const file = STATIC[url.pathname === '/index.html' ? '/' : url.pathname];
    if (!file) { send(404, 'text/plain', 'not found: try /, /status, /history, /metrics or /healthz\n'); return; }
    let body = cache.get(file[0]);
    if (!body) { body = readFileSync(file[0]); cache.set(file[0], body); }
    send(200, file[1], body, { 'content-security-policy': CSP });
  });
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(e.code === 'EADDRINUSE'
      ? new ConfigError(`http_port: ${host}:${o.port} is already in use`, { hint: 'pick another http_port / --http-port, or 0 for an OS-assigned one' })
      : e));
    server.listen(o.port, host, () => {
      const port = (server.address() as AddressInfo).port;
      const shown = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;
      resolve({
        port, url: `http://${shown}:${port}`,
        close: async (c = {}) => {
          const t0 = performance.now();
          if (c.lingerMs && t0 - lastStatusAt < WATCHING_MS) {
            while (!servedFinal && performance.now() - t0 < c.lingerMs) await new Promise((r) => setTimeout(r, 50));
          }
          await new Promise<void>((res, rej) => { server.close((e) => (e ? rej(e) : res())); server.closeAllConnections(); });
        },
      });
    });
  });
}
