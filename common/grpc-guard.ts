// What a gRPC server of this project does before a request reaches a handler: bounded connections.
//
//   - keepalive pings find dead peers; a connection without streams for max_connection_idle is closed;
//     every connection is asked to reconnect after max_connection_age (no grace limit: a worker's command
//     stream is never cut, only new calls move to a fresh connection);
//   - a connection that never starts a session is closed too: a plaintext one by the idle timeout (its
//     session exists from the first byte on), a TLS one by the 120 s handshake timeout;
//   - at most `maxConnectionsPerPeer` open connections per remote address (DQLORA_MAX_CONNECTIONS_PER_PEER);
//   - a client that speaks plaintext to a TLS server (or the reverse) learns it from its own side: see
//     probeTlsMismatch in common/tls.ts (the server cannot peek at the first bytes without taking them from
//     the HTTP/2 session, which reads the socket's handle directly);
//   - every refusal (also a wrong job token: RejectionLog.record from the handlers) is counted
//     (dqlora_rejected_requests_total{service, reason}) and logged at most
//     LOG_BURST times per LOG_WINDOW_MS per reason, then summarised — a flood of bad clients cannot flood
//     the log.
// The sockets are accepted by our own net.Server and handed to grpc-js through its connection injector.
import net from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { DqloraError } from './errors.ts';
import type { Logger } from './log.ts';

export const SERVER_HYGIENE: grpc.ServerOptions = {
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.max_connection_idle_ms': 120_000,
  'grpc.max_connection_age_ms': 3_600_000,
};

const LOG_WINDOW_MS = 10_000, LOG_BURST = 5;

export type RejectReason = 'unauthenticated' | 'peer-connection-limit' | 'invalid';

interface CounterLike { inc(labels: { service: string; reason: string }, v?: number): void }

/** Counts refusals and logs them rate-limited (per reason: LOG_BURST lines per LOG_WINDOW_MS, then a summary). */
export class RejectionLog {
  private readonly windows = new Map<RejectReason, { start: number; logged: number; suppressed: number }>();
  constructor(private readonly service: string, private readonly log: Logger, private readonly counter?: CounterLike, private readonly now: () => number = Date.now) {}

  record(reason: RejectReason, peer: string, message: string): void {
    this.counter?.inc({ service: this.service, reason });
    const t = this.now();
    let w = this.windows.get(reason);
    if (!w || t - w.start >= LOG_WINDOW_MS) {
      if (w && w.suppressed > 0) this.log.warn({ service: this.service, reason, suppressed: w.suppressed }, `${w.suppressed} more ${reason} rejections were not logged in the last ${LOG_WINDOW_MS / 1000} s`);
      w = { start: t, logged: 0, suppressed: 0 };
      this.windows.set(reason, w);
    }
    if (w.logged < LOG_BURST) { w.logged++; this.log.warn({ service: this.service, reason, peer }, message); } else w.suppressed++;
  }
}

export interface GuardOptions {
  readonly service: string;
  readonly rejections: Pick<RejectionLog, 'record'>;
  readonly maxConnectionsPerPeer?: number;
}

export interface GuardedListener {
  readonly port: number;
  /** Open connections per remote address (for tests and the status page). */
  connections(): Map<string, number>;
  close(): void;
}

export function maxConnectionsPerPeer(env: NodeJS.ProcessEnv = process.env): number {
  const v = Number(env.DQLORA_MAX_CONNECTIONS_PER_PEER ?? 64);
  return Number.isInteger(v) && v > 0 ? v : 64;
}

/**
 * Listens on host:port (0 = OS-assigned) and hands accepted connections to `server` (created with
 * SERVER_HYGIENE) after the checks above. Call instead of server.bindAsync.
 */
export async function listenGuarded(server: grpc.Server, address: string, credentials: grpc.ServerCredentials, o: GuardOptions): Promise<GuardedListener> {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[|\]$/g, ''), port = Number(address.slice(i + 1));
  const injector = server.createConnectionInjector(credentials);
  const limit = o.maxConnectionsPerPeer ?? maxConnectionsPerPeer();
  const open = new Map<string, number>();
  const net0 = net.createServer((sock) => {
    const peer = sock.remoteAddress ?? '?';
    const n = open.get(peer) ?? 0;
    if (n >= limit) {
      o.rejections.record('peer-connection-limit', peer, `${o.service}: refused a connection from ${peer}: it already has ${n} open (limit ${limit}, DQLORA_MAX_CONNECTIONS_PER_PEER)`);
      sock.destroy();
      return;
    }
    open.set(peer, n + 1);
    sock.once('close', () => { const m = (open.get(peer) ?? 1) - 1; if (m <= 0) open.delete(peer); else open.set(peer, m); });
    sock.on('error', () => { /* reset by the peer: the close handler counts it out */ });
    injector.injectConnection(sock);
  });
  const bound = await new Promise<number>((resolve, reject) => {
    net0.once('error', (e) => reject(new DqloraError(`${o.service}: cannot listen on ${address}: ${e.message}`, { cause: e })));
    net0.listen(port, host, () => resolve((net0.address() as net.AddressInfo).port));
  });
  return {
    port: bound,
    connections: () => new Map(open),
    // stops accepting; the sessions end with the server's tryShutdown / forceShutdown
    close() { net0.close(); },
  };
}
