// The status server's HTTP side, on a thread of its own. In one process the training step computes on the main
// thread and yields to the event loop only between steps (minutes apart on a real model): a server there would
// leave the page, /status and Prometheus' scrapes hanging. This thread answers from a mirror the main thread
// keeps current (server.ts posts every change: the snapshot as JSON, new history rows, the metrics text).
// Plain JavaScript: it loads in any thread however the process was started (no TypeScript loader needed).
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';

/** workerData: { port, host, files: { [urlPath]: [file, contentType] }, csp } */
const { port, host, files, csp } = workerData;
const WATCHING_MS = 5000; // a page polls /status every second; one seen this recently is still watching

let statusJson = '{}', statusFinal = false;
let history = { step: [], loss: [], lr: [], gradNorm: [], tokensPerSecond: [] };
let metrics = { text: '', contentType: 'text/plain; version=0.0.4; charset=utf-8' };
let lastStatusAt = -Infinity, servedFinal = false;
const cache = new Map();

parentPort.on('message', (m) => {
  if (m.t === 'status') { statusJson = m.json; statusFinal = m.final; }
  else if (m.t === 'history') {
    if (m.reset) history = { step: [], loss: [], lr: [], gradNorm: [], tokensPerSecond: [] };
    for (const k of Object.keys(history)) for (const v of m.rows[k]) history[k].push(v);
  } else if (m.t === 'metrics') metrics = { text: m.text, contentType: m.contentType };
  else if (m.t === 'close') void close(m.lingerMs);
});

const server = http.createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://x');
  const head = req.method === 'HEAD';
  const send = (code, type, body, extra = {}) => {
    res.writeHead(code, { 'content-type': type, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', ...extra }).end(head ? undefined : body);
  };
  if (req.method !== 'GET' && !head) { res.writeHead(405, { allow: 'GET, HEAD' }).end(); return; }
  switch (url.pathname) {
    case '/status':
      lastStatusAt = performance.now();
      servedFinal = statusFinal;
      send(200, 'application/json; charset=utf-8', statusJson);
      return;
    case '/history': {
      const since = Number(url.searchParams.get('since') ?? 0);
      if (!Number.isInteger(since) || since < 0) { send(400, 'text/plain', 'since must be a non-negative integer step\n'); return; }
      let i = 0;
      while (i < history.step.length && history.step[i] <= since) i++;
      send(200, 'application/json; charset=utf-8', JSON.stringify(Object.fromEntries(Object.entries(history).map(([k, v]) => [k, v.slice(i)]))));
      return;
    }
    case '/metrics': send(200, metrics.contentType, metrics.text); return;
    case '/healthz': send(200, 'text/plain', 'ok\n'); return;
  }
  const file = files[url.pathname === '/index.html' ? '/' : url.pathname];
  if (!file) { send(404, 'text/plain', 'not found: try /, /status, /history, /metrics or /healthz\n'); return; }
  let body = cache.get(file[0]);
  if (!body) { body = readFileSync(file[0]); cache.set(file[0], body); }
  send(200, file[1], body, { 'content-security-policy': csp });
});

async function close(lingerMs) {
  const t0 = performance.now();
  if (lingerMs && t0 - lastStatusAt < WATCHING_MS) {
    while (!servedFinal && performance.now() - t0 < lingerMs) await new Promise((r) => setTimeout(r, 50));
  }
  await new Promise((r) => { server.close(() => r()); server.closeAllConnections(); });
  parentPort.postMessage({ t: 'closed' });
  parentPort.close();
}

server.once('error', (e) => parentPort.postMessage({ t: 'error', code: e.code, message: e.message }));
server.listen(port, host, () => parentPort.postMessage({ t: 'listening', port: server.address().port }));
