// How a worker tells a NATS outage from a slow peer (credentials and TLS: common/nats-options.ts).
//
// watchNatsConnection follows the connection's status (disconnect / reconnect): a step blocked in the
// all-reduce can be told at once that NATS is down (not "a peer is slow"), the outage is ridden out for
// `outageWindowMs` while the client reconnects, and only then reported as a NatsOutageError naming the
// server and how long it has been gone. Connect with reconnects that keep trying (maxReconnectAttempts: -1):
// the window, not the client, decides when to give up.
import type { NatsConnection } from '@nats-io/transport-node';
import { DqloraError } from './errors.ts';

/** NATS was unreachable for longer than the outage window. */
export class NatsOutageError extends DqloraError {}

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
