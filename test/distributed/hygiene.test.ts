// Server hygiene of the control service (common/grpc-guard.ts), with real gRPC on 127.0.0.1: an
// unauthenticated command stream is ended at once; connections beyond the per-peer limit are closed and
// counted; idle connections are reaped; refusals are logged rate-limited; a worker whose TLS setting differs
// from the coordinator's stops at once with a hint, in both directions.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { ControlPlane } from '../../coordinator/distributed/control.ts';
import { ControlClient } from '../../proto/gen/dqlora/v1/control.ts';
import { RejectionLog, SERVER_HYGIENE, listenGuarded } from '../../common/grpc-guard.ts';
import { createCoordinatorMetrics } from '../../common/metrics.ts';
import type { Logger } from '../../common/log.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const TOKEN = 'hygiene-token';
const metrics = createCoordinatorMetrics({ processMetrics: false });
const plane = new ControlPlane({ jobId: 'hygiene', jobToken: TOKEN, heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 5000, metrics, maxConnectionsPerPeer: 8 });
const address = await plane.listen('127.0.0.1:0');
const port = Number(address.split(':')[1]);
after(async () => { await plane.close(); });

async function rejected(reason: string): Promise<number> {
  const m = (await metrics.rejectedRequests.get()).values.find((v) => v.labels.reason === reason && v.labels.service === 'control');
  return m?.value ?? 0;
}

test('a Commands stream with a wrong token ends at once with UNAUTHENTICATED, and is counted', async () => {
  const client = new ControlClient(address, grpc.credentials.createInsecure());
  try {
    const before = await rejected('unauthenticated');
    const t0 = Date.now();
    const stream = client.commands({ workerId: 'w1', jobToken: 'wrong' }, new grpc.Metadata());
    const err = await new Promise<grpc.ServiceError>((resolve) => { stream.on('error', resolve); stream.on('data', () => {}); });
    assert.equal(err.code, grpc.status.UNAUTHENTICATED);
    assert.match(err.details, /Commands: wrong or missing job token for job "hygiene"/);
    assert.ok(Date.now() - t0 < 2000, `ended after ${Date.now() - t0} ms`);
    assert.equal(await rejected('unauthenticated'), before + 1);
  } finally { client.close(); }
});

test('connections beyond the per-peer limit are closed at once and counted; the others stay usable', async () => {
  const socks: net.Socket[] = [];
  const closed: number[] = [];
  for (let i = 0; i < 20; i++) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    s.on('close', () => closed.push(i));
    socks.push(s);
  }
  await Promise.all(socks.map((s) => new Promise<void>((r) => (s.readyState === 'open' ? r() : s.once('connect', () => r())))));
  const deadline = Date.now() + 3000;
  while (closed.length < 12 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.equal(closed.length, 12, '20 opened, 8 allowed');
  assert.equal(plane.connections().get('127.0.0.1'), 8);
  assert.ok(await rejected('peer-connection-limit') >= 12);
  for (const s of socks) s.destroy();
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(plane.connections().get('127.0.0.1') ?? 0, 0, 'closed connections are counted out');
});

test('an idle connection (HTTP/2 session, no streams) is closed after max_connection_idle', async () => {
  const server = new grpc.Server({ ...SERVER_HYGIENE, 'grpc.max_connection_idle_ms': 300 });
  const log = { warn: () => {} } as unknown as Logger;
  const l = await listenGuarded(server, '127.0.0.1:0', grpc.ServerCredentials.createInsecure(), { service: 'test', rejections: new RejectionLog('test', log) });
  try {
    const s = net.connect(l.port, '127.0.0.1');
    s.on('error', () => {});
    s.resume(); // read (and drop) the server's SETTINGS and GOAWAY, so that its close is seen
    await new Promise((r) => s.once('connect', r));
    s.write('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + '\x00\x00\x00\x04\x00\x00\x00\x00\x00'); // preface + empty SETTINGS
    const t0 = Date.now();
    await new Promise((r) => s.once('close', r));
    const ms = Date.now() - t0;
    assert.ok(ms >= 200 && ms < 5000, `closed after ${ms} ms`);
  } finally { l.close(); server.forceShutdown(); }
});

test('refusals are logged at most 5 times per 10 s per reason, then summarised; every one is counted', () => {
  const lines: string[] = [];
  const log = { warn: (o: object, m: string) => lines.push(`${JSON.stringify(o)} ${m}`) } as unknown as Logger;
  let now = 0, counted = 0;
  const r = new RejectionLog('control', log, { inc: () => { counted++; } }, () => now);
  for (let i = 0; i < 3000; i++) { r.record('unauthenticated', `peer${i}`, 'Register with a wrong or missing job token refused'); now += 1; }
  now += 10_000;
  r.record('unauthenticated', 'late', 'Register with a wrong or missing job token refused');
  assert.equal(counted, 3001);
  // 3000 records over 3 s: 5 lines, then at the next window the summary and that window's first line
  assert.equal(lines.length, 7);
  assert.match(lines[5], /"suppressed":2995.*2995 more unauthenticated rejections were not logged in the last 10 s/);
});

// ---- TLS and plaintext meeting: the worker says so at once instead of retrying for a minute ----
const hasOpenssl = spawnSync('openssl', ['version']).status === 0;
function makePki(dir: string): { ca: string; cert: string; key: string } {
  mkdirSync(dir, { recursive: true });
  const run = (...args: string[]): void => { const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' }); if (r.status !== 0) throw new Error(`openssl ${args[0]}: ${r.stderr}`); };
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=test-ca');
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', 'key.pem', '-out', 'leaf.csr', '-subj', '/CN=127.0.0.1');
  writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
  run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2', '-extfile', 'ext.cnf', '-out', 'cert.pem');
  return { ca: join(dir, 'ca.pem'), cert: join(dir, 'cert.pem'), key: join(dir, 'key.pem') };
}

/** Runs `worker start` against `coordinator` with `env`; resolves with its exit status, stderr and run time. */
function worker(coordinator: string, env: Record<string, string>): Promise<{ code: number | null; stderr: string; ms: number }> {
  const t0 = Date.now();
  const p = spawn(process.execPath, [join(ROOT, 'bin', 'worker.js'), 'start', '--coordinator', coordinator, '--device', 'cpu'], {
    stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DQLORA_LOG_LEVEL: 'error', DQLORA_JOB_TOKEN: TOKEN, ...env },
  });
  let stderr = '';
  p.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  return new Promise((resolve) => p.on('exit', (code) => resolve({ code, stderr, ms: Date.now() - t0 })));
}

test('a plaintext worker at a TLS coordinator, and a TLS worker at a plaintext one, stop at once with a hint', { skip: !hasOpenssl && 'openssl is not installed', timeout: 60_000 }, async () => {
  const pki = makePki(join(mkdtempSync(join(tmpdir(), 'dqlora-hyg-')), 'pki'));
  const tlsEnv = { DQLORA_TLS_CA: pki.ca, DQLORA_TLS_CERT: pki.cert, DQLORA_TLS_KEY: pki.key };
  const saved = { ...process.env };
  Object.assign(process.env, tlsEnv);
  const tlsPlane = new ControlPlane({ jobId: 'tls', jobToken: TOKEN, heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 5000 });
  let tlsAddress: string;
  try { tlsAddress = await tlsPlane.listen('127.0.0.1:0'); } finally {
    for (const k of Object.keys(tlsEnv)) { if (saved[k] === undefined) delete process.env[k]; else process.env[k] = saved[k]; }
  }
  try {
    const plain = await worker(tlsAddress, { DQLORA_TLS_CA: '', DQLORA_TLS_CERT: '', DQLORA_TLS_KEY: '' });
    assert.equal(plain.code, 1, plain.stderr);
    assert.match(plain.stderr, /TLS and plaintext do not meet\n\s+hint: 127\.0\.0\.1:\d+ speaks TLS but this process has no TLS configuration: set DQLORA_TLS_CA, DQLORA_TLS_CERT and DQLORA_TLS_KEY/);
    assert.ok(plain.ms < 20_000, `took ${plain.ms} ms`);
    const secure = await worker(address, tlsEnv);
    assert.equal(secure.code, 1, secure.stderr);
    assert.match(secure.stderr, /hint: 127\.0\.0\.1:\d+ speaks plaintext but this process is configured for mutual TLS/);
    assert.ok(secure.ms < 20_000, `took ${secure.ms} ms`);
  } finally { await tlsPlane.close(); }
});
