// The private nats-server of a local job, with a real nats-server on 127.0.0.1: it requires the per-job
// credentials (a process without them — a would-be gradient forger — cannot even connect), it is restarted on
// the same port when it dies, and a client following the connection state (watchNatsConnection) sees the
// outage and the return, or an outage error once the window has passed. natsConnectOptions (common/nats-options.ts)
// refuses conflicting or malformed credential settings before connecting.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { startLocalNats, type LocalNats } from '../../coordinator/distributed/local.ts';
import { NatsOutageError, watchNatsConnection, type NatsLinkState } from '../../common/nats-link.ts';
import { natsConnectOptions } from '../../common/nats-options.ts';
import { ConfigError } from '../../common/errors.ts';
import { natsServerMissing } from '../helpers/nats.ts';

const skip = natsServerMissing();
const open: (LocalNats | NatsConnection)[] = [];
after(async () => { for (const x of open.reverse()) await ('drain' in x ? x.close() : x.stop()).catch(() => {}); });

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) { if (Date.now() > end) throw new Error(`timed out waiting for ${what}`); await new Promise((r) => setTimeout(r, 20)); }
}

async function roundTrip(nc: NatsConnection, subject: string): Promise<string> {
  const sub = nc.subscribe(subject, { max: 1 });
  await nc.flush();
  nc.publish(subject, 'ping');
  for await (const m of sub) return m.string();
  return '';
}

test('the private nats-server requires the per-job credentials: none or a wrong password cannot connect', { skip, timeout: 30_000 }, async () => {
  const nats = await startLocalNats();
  open.push(nats);
  await assert.rejects(connect({ servers: nats.url, timeout: 3000, reconnect: false }), /authorization|Authorization Violation|auth/i);
  await assert.rejects(connect({ servers: nats.url, timeout: 3000, reconnect: false, user: nats.workerEnv.DQLORA_NATS_USER, pass: 'guess' }), /authorization|auth/i);
  const nc = await connect({ servers: nats.url, name: 'test', maxReconnectAttempts: -1, reconnectTimeWait: 250, ...natsConnectOptions({ ...nats.workerEnv }) });
  open.push(nc);
  assert.equal(await roundTrip(nc, 'dqlora.test.a'), 'ping');
  assert.match(nats.workerEnv.DQLORA_NATS_PASSWORD, /^[0-9a-f]{48}$/);
});

test('kill -9 of the private nats-server: it is restarted on the same port; a watching client sees down then up', { skip, timeout: 30_000 }, async () => {
  const nats = await startLocalNats();
  open.push(nats);
  const nc = await connect({ servers: nats.url, name: 'test', maxReconnectAttempts: -1, reconnectTimeWait: 250, ...natsConnectOptions({ ...nats.workerEnv }) });
  open.push(nc);
  const seen: NatsLinkState[] = [];
  const link = watchNatsConnection(nc, { outageWindowMs: 20_000, onChange: (s) => seen.push(s) });
  const pid = nats.pid();
  assert.ok(pid && pid > 0, 'the nats-server pid is known');
  process.kill(pid, 'SIGKILL');
  await waitFor(() => seen.includes('down'), 5000, 'the client to see the outage');
  assert.equal(link.state === 'down' || link.state === 'up', true);
  assert.equal(await link.waitUp(15_000), true, 'reconnected');
  assert.deepEqual(seen.slice(0, 2), ['down', 'up']);
  assert.equal(nats.restarts(), 1);
  assert.notEqual(nats.pid(), pid);
  assert.equal(await roundTrip(nc, 'dqlora.test.b'), 'ping');
  link.stop();
});

test('an outage longer than the window is reported once as a NatsOutageError naming the server', { skip, timeout: 30_000 }, async () => {
  const nats = await startLocalNats();
  const nc = await connect({ servers: nats.url, name: 'test', maxReconnectAttempts: -1, reconnectTimeWait: 250, ...natsConnectOptions({ ...nats.workerEnv }) });
  open.push(nc);
  const outages: NatsOutageError[] = [];
  const link = watchNatsConnection(nc, { outageWindowMs: 500, onOutage: (e) => outages.push(e) });
  const t0 = Date.now();
  await nats.stop(); // gone for good
  await waitFor(() => outages.length > 0, 10_000, 'the outage error');
  assert.ok(Date.now() - t0 >= 450, 'not before the window');
  assert.ok(outages[0] instanceof NatsOutageError);
  assert.match(outages[0].message, /NATS at 127\.0\.0\.1:\d+ has been unreachable for 0\.5 s/);
  assert.equal(await link.waitUp(200), false);
  await new Promise((r) => setTimeout(r, 700));
  assert.equal(outages.length, 1, 'once per outage');
  link.stop();
  await nc.close();
});

test('natsConnectOptions: token, nkey seed or creds file from the environment; conflicting or malformed ones are ConfigErrors', () => {
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-natsopt-'));
  assert.deepEqual(natsConnectOptions({ DQLORA_NATS_USER: 'u', DQLORA_NATS_PASSWORD: 'p' }), { user: 'u', pass: 'p' });
  assert.equal(natsConnectOptions({ DQLORA_NATS_TOKEN: 't' }).token, 't');
  const seed = join(dir, 'user.nk');
  writeFileSync(seed, 'SUAKYRHVIOREXV7EUZTBHUHL7NUMHPMAS7QMDU3GTIUWEI5LDNOXD43IZY\n');
  assert.equal(typeof natsConnectOptions({ DQLORA_NATS_NKEY_SEED: seed }).authenticator, 'function');
  writeFileSync(join(dir, 'bad.nk'), 'not a seed');
  const bad: [NodeJS.ProcessEnv, RegExp][] = [
    [{ DQLORA_NATS_USER: 'u', DQLORA_NATS_PASSWORD: 'p', DQLORA_NATS_TOKEN: 't' }, /more than one way: DQLORA_NATS_USER\/_PASSWORD, DQLORA_NATS_TOKEN/],
    [{ DQLORA_NATS_NKEY_SEED: join(dir, 'missing') }, /cannot read it \(ENOENT\)/],
    [{ DQLORA_NATS_NKEY_SEED: join(dir, 'bad.nk') }, /not an nkey user seed/],
    [{ DQLORA_NATS_CREDS: seed }, /not a NATS \.creds file/],
  ];
  for (const [env, re] of bad) assert.throws(() => natsConnectOptions(env), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message), JSON.stringify(env));
});
