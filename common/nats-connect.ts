// How a worker connects to NATS, and how it tells a NATS outage from a slow peer.
//
// Credentials and TLS come from the environment (a Kubernetes Secret, or the coordinator for its private
// server), never from the job file, a URL or a command line:
//   DQLORA_NATS_USER + DQLORA_NATS_PASSWORD   user / password (the private server of a local job uses these)
//   DQLORA_NATS_TOKEN                          a bare token
//   DQLORA_NATS_NKEY_SEED                      path of a file holding an nkey user seed (SU...)
//   DQLORA_NATS_CREDS                          path of a .creds file (JWT + nkey seed, from nsc / NGS)
//   DQLORA_NATS_TLS_CA [+ _CERT + _KEY]        PEM paths: verify the server (and present a client certificate)
// At most one kind of credentials; half a configuration, an unreadable file or a malformed seed is a
// ConfigError before any connection attempt. A URL with user:password@ in it is refused (it ends up in logs).
//
// Outages: watchNatsConnection follows the connection's status (disconnect / reconnect): a step blocked in
// the all-reduce is told at once that NATS is down (not "a peer is slow"), the outage is ridden out for
// `outageWindowMs` while the client reconnects, and only then reported as a NatsOutageError naming the
// server and how long it has been gone.
import { readFileSync } from 'node:fs';
import { credsAuthenticator, nkeyAuthenticator, type NatsConnection, type NodeConnectionOptions } from '@nats-io/transport-node';
import { ConfigError, DqloraError } from './errors.ts';

/** NATS was unreachable for longer than the outage window. */
export class NatsOutageError extends DqloraError {}

function readSecretFile(env: NodeJS.ProcessEnv, name: string): Uint8Array {
  const path = env[name]!.trim();
  try { return new Uint8Array(readFileSync(path)); } catch (e) {
    throw new ConfigError(`${name}=${path}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { hint: `point ${name} at the file (a mounted Secret)` });
  }
}

/**
 * nats.js connect options for `url` from the environment: servers, name, credentials, TLS, and reconnect
 * settings that keep trying (the outage window, not the client, decides when to give up).
 */
export function natsConnectOptions(url: string, name: string, env: NodeJS.ProcessEnv = process.env): NodeConnectionOptions {
  const set = (k: string): boolean => Boolean(env[k]?.trim());
  if (!url.trim()) throw new ConfigError('no NATS URL', { hint: 'set distributed.nats_url or pass --nats nats://HOST:4222' });
  let parsed: URL | undefined;
  for (const u of url.split(',')) {
    try { parsed = new URL(u.includes('://') ? u.trim() : `nats://${u.trim()}`); } catch { throw new ConfigError(`NATS URL "${u}" is not a URL`, { hint: 'e.g. nats://HOST:4222 or tls://HOST:4222' }); }
    if (parsed.username || parsed.password) throw new ConfigError('the NATS URL carries credentials (user:password@host)', { hint: 'remove them from the URL and set DQLORA_NATS_USER / DQLORA_NATS_PASSWORD (or a creds file) instead: URLs end up in logs' });
  }
  const kinds = [
    (set('DQLORA_NATS_USER') || set('DQLORA_NATS_PASSWORD')) && 'DQLORA_NATS_USER/_PASSWORD',
    set('DQLORA_NATS_TOKEN') && 'DQLORA_NATS_TOKEN', set('DQLORA_NATS_NKEY_SEED') && 'DQLORA_NATS_NKEY_SEED', set('DQLORA_NATS_CREDS') && 'DQLORA_NATS_CREDS',
  ].filter((x): x is string => Boolean(x));
  if (kinds.length > 1) throw new ConfigError(`NATS credentials are given more than one way: ${kinds.join(', ')}`, { hint: 'set one kind only' });
  const o: NodeConnectionOptions = {
    servers: url.split(',').map((s) => s.trim()), name, timeout: 10_000,
    reconnect: true, maxReconnectAttempts: -1, reconnectTimeWait: 250, reconnectJitter: 100, pingInterval: 5_000, maxPingOut: 3,
  };
  if (kinds[0] === 'DQLORA_NATS_USER/_PASSWORD') {
    if (!set('DQLORA_NATS_USER') || !set('DQLORA_NATS_PASSWORD')) throw new ConfigError(`NATS credentials are half configured: ${set('DQLORA_NATS_USER') ? 'DQLORA_NATS_PASSWORD' : 'DQLORA_NATS_USER'} is missing`, { hint: 'set both, or neither' });
    o.user = env.DQLORA_NATS_USER!.trim(); o.pass = env.DQLORA_NATS_PASSWORD!;
  } else if (kinds[0] === 'DQLORA_NATS_TOKEN') {
    o.token = env.DQLORA_NATS_TOKEN!.trim();
  } else if (kinds[0] === 'DQLORA_NATS_NKEY_SEED') {
    const seed = new TextDecoder().decode(readSecretFile(env, 'DQLORA_NATS_NKEY_SEED')).trim();
    if (!/^SU[A-Z2-7]{50,}$/.test(seed)) throw new ConfigError(`DQLORA_NATS_NKEY_SEED=${env.DQLORA_NATS_NKEY_SEED}: not an nkey user seed (expected one line starting with SU)`, { hint: 'create one with `nsc` or `nk -gen user`' });
    o.authenticator = nkeyAuthenticator(new TextEncoder().encode(seed));
  } else if (kinds[0] === 'DQLORA_NATS_CREDS') {
    const creds = readSecretFile(env, 'DQLORA_NATS_CREDS');
    const text = new TextDecoder().decode(creds);
    if (!/-----BEGIN NATS USER JWT-----/.test(text) || !/-----BEGIN USER NKEY SEED-----/.test(text)) throw new ConfigError(`DQLORA_NATS_CREDS=${env.DQLORA_NATS_CREDS}: not a NATS .creds file (needs a user JWT and a user nkey seed block)`, { hint: 'generate it with `nsc generate creds`' });
    o.authenticator = credsAuthenticator(creds);
  }
  const tlsVars = ['DQLORA_NATS_TLS_CA', 'DQLORA_NATS_TLS_CERT', 'DQLORA_NATS_TLS_KEY'].filter(set);
  if (tlsVars.length > 0) {
    if (set('DQLORA_NATS_TLS_CERT') !== set('DQLORA_NATS_TLS_KEY')) throw new ConfigError(`NATS TLS is half configured: ${set('DQLORA_NATS_TLS_CERT') ? 'DQLORA_NATS_TLS_KEY' : 'DQLORA_NATS_TLS_CERT'} is missing`, { hint: 'a client certificate needs its key (and the other way round)' });
    for (const v of tlsVars) readSecretFile(env, v); // readable now, not at the first reconnect
    o.tls = { caFile: env.DQLORA_NATS_TLS_CA?.trim() || undefined, certFile: env.DQLORA_NATS_TLS_CERT?.trim() || undefined, keyFile: env.DQLORA_NATS_TLS_KEY?.trim() || undefined };
  } else if (o.servers && (o.servers as string[]).some((s) => s.startsWith('tls://'))) {
    o.tls = {}; // tls:// with the system CAs
  }
  return o;
}

export type NatsLinkState = 'up' | 'down' | 'closed';

export interface NatsLink {
  readonly state: NatsLinkState;
  /** When the current outage began (ms since the epoch); undefined while up. */
  readonly downSince?: number;
  /** Resolves true when the link is up (at once if it is), false after timeoutMs or when it closes. */
  waitUp(timeoutMs: number): Promise<boolean>;
  stop(): void;
}

export interface WatchOptions {
  /** How long an outage is ridden out before onOutage (default 30 s). */
  readonly outageWindowMs?: number;
  /** Called at every change: 'down' when the connection drops (a step in flight should pause or abort), 'up' when it is back. */
  readonly onChange?: (state: NatsLinkState, server: string) => void;
  /** Called once per outage that outlasts the window (the step in flight should fail with this error). */
  readonly onOutage?: (err: NatsOutageError) => void;
}

/** Follows `nc`'s connection state (see the header). */
export function watchNatsConnection(nc: NatsConnection, o: WatchOptions = {}): NatsLink {
  const windowMs = o.outageWindowMs ?? 30_000;
  let state: NatsLinkState = nc.isClosed() ? 'closed' : 'up';
  let downSince: number | undefined;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  let server = nc.getServer();
  const waiters = new Set<() => void>();
  const wake = (): void => { for (const w of [...waiters]) w(); };
  const set = (s: NatsLinkState): void => {
    if (s === state) return;
    state = s;
    if (s === 'down') {
      downSince = Date.now();
      timer = setTimeout(() => {
        if (state !== 'down') return;
        o.onOutage?.(new NatsOutageError(`NATS at ${server} has been unreachable for ${(windowMs / 1000).toFixed(1)} s (the outage window)`, { hint: 'is nats-server running and reachable? the coordinator restarts a server it started itself; raise the outage window to ride out longer outages' }));
      }, windowMs);
    } else {
      clearTimeout(timer); downSince = undefined;
    }
    o.onChange?.(s, server);
    wake();
  };
  void (async () => {
    for await (const st of nc.status()) {
      if (stopped) break;
      if (st.type === 'disconnect') { server = st.server || server; set('down'); }
      else if (st.type === 'reconnect') { server = st.server || server; set('up'); }
      else if (st.type === 'close') { set('closed'); break; }
    }
  })().catch(() => { /* the iterator ends with the connection */ });
  void nc.closed().then(() => set('closed'), () => set('closed'));
  return {
    get state() { return state; },
    get downSince() { return downSince; },
    waitUp(timeoutMs) {
      if (state === 'up') return Promise.resolve(true);
      if (state === 'closed') return Promise.resolve(false);
      return new Promise((resolve) => {
        const done = (): void => {
          if (state === 'down') return;
          clearTimeout(t); waiters.delete(done); resolve(state === 'up');
        };
        const t = setTimeout(() => { waiters.delete(done); resolve(false); }, timeoutMs);
        waiters.add(done);
      });
    },
    stop() { stopped = true; clearTimeout(timer); state = 'closed'; wake(); },
  };
}
