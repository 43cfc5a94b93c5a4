// Retrying what talks to other processes: exponential back-off with a cap, abortable sleeps, recognising a
// connection failure (an outage, not a bug), naming what was dialled and where, and riding out an outage shorter
// than a window. Used by the coordinator's job loop (recovery back-off, outage window) and by workers (NATS).
import { DqloraError } from './errors.ts';
import { logger, type Logger } from './log.ts';

const log = logger('connection');

// ---- recovery back-off -----------------------------------------------------------------------------------------

export interface BackoffOptions {
  /** First delay (ms). Default 1 s. */
  readonly initialMs?: number;
  /** Growth per attempt. Default 2. */
  readonly factor?: number;
  /** Largest delay (ms). Default 60 s. */
  readonly maxMs?: number;
  /** ± fraction of random jitter (0 = none). Default 0.2: replicas of a job restarting together spread out. */
  readonly jitter?: number;
  /** Uniform [0, 1) source (tests pass a fixed one). */
  readonly random?: () => number;
}

/** Exponential back-off with a cap: initial · factor^attempt, at most maxMs, with jitter; reset after success. */
export class Backoff {
  private n = 0;
  readonly initialMs: number; readonly factor: number; readonly maxMs: number; readonly jitter: number;
  private readonly random: () => number;
  constructor(o: BackoffOptions = {}) {
    this.initialMs = o.initialMs ?? 1000;
    this.factor = o.factor ?? 2;
    this.maxMs = o.maxMs ?? 60_000;
    this.jitter = o.jitter ?? 0.2;
    this.random = o.random ?? Math.random;
    if (!(this.initialMs > 0 && this.factor >= 1 && this.maxMs >= this.initialMs && this.jitter >= 0 && this.jitter < 1)) {
      throw new DqloraError(`back-off: need initialMs > 0, factor ≥ 1, maxMs ≥ initialMs, 0 ≤ jitter < 1 (got ${this.initialMs}, ${this.factor}, ${this.maxMs}, ${this.jitter})`);
    }
  }
  /** Attempts so far since the last reset. */
  get attempt(): number { return this.n; }
  /** The next delay (ms), and count the attempt. */
  next(): number {
    const base = Math.min(this.maxMs, this.initialMs * this.factor ** this.n);
    this.n++;
    const j = this.jitter ? 1 + this.jitter * (2 * this.random() - 1) : 1;
    return Math.round(Math.min(this.maxMs, base * j));
  }
  reset(): void { this.n = 0; }
}

/** Waits ms, or less when `abort` fires (resolves false then). */
export function sleep(ms: number, abort?: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    if (abort?.aborted) { resolve(false); return; }
    const t = setTimeout(() => { abort?.removeEventListener('abort', onAbort); resolve(true); }, ms);
    const onAbort = (): void => { clearTimeout(t); resolve(false); };
    abort?.addEventListener('abort', onAbort, { once: true });
  });
}

// ---- riding out short outages ----------------------------------------------------------------------------------

/** Node's and gRPC's "cannot reach the other side" errors: an outage, not a bug. */
const CONNECTION_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'CONNECTION_REFUSED', 'DISCONNECT']);
/** gRPC status 14 UNAVAILABLE: the server is down or unreachable (retryable by definition). */
const GRPC_UNAVAILABLE = 14;

export function isConnectionError(e: unknown): boolean {
  for (let x: unknown = e, depth = 0; x && depth < 5; x = (x as { cause?: unknown }).cause, depth++) {
    const code = (x as { code?: unknown }).code;
    if (typeof code === 'string' && CONNECTION_CODES.has(code)) return true;
    if (code === GRPC_UNAVAILABLE) return true;
    const msg = (x as Error).message;
    if (typeof msg === 'string' && /ECONNREFUSED|ECONNRESET|CONNECTION_REFUSED|connection refused|No connection established/i.test(msg)) return true;
  }
  return false;
}

/** A connection failure that names what was dialled and where. */
export class ConnectionError extends DqloraError {}

export function connectionError(what: string, address: string, cause: unknown, downForMs?: number): ConnectionError {
  const code = (cause as { code?: unknown }).code;
  const detail = (cause as Error)?.message?.split('\n')[0] ?? String(cause);
  const down = downForMs !== undefined ? ` (unreachable for ${(downForMs / 1000).toFixed(0)} s)` : '';
  return new ConnectionError(`cannot reach ${what} at ${address}${down}: ${detail}${typeof code === 'string' && !detail.includes(code) ? ` (${code})` : ''}`, {
    hint: `check that ${what} is running and that ${address} resolves and is reachable from here (network policy, firewall, TLS settings)`,
    cause,
  });
}

export interface RideOutOptions {
  /** What is dialled, for messages ("NATS", "the coordinator"). */
  readonly what: string;
  readonly address: string;
  /** Keep retrying connection errors for this long after the first failure (ms). */
  readonly windowMs: number;
  readonly backoff?: Backoff;
  readonly abort?: AbortSignal;
  readonly log?: Logger;
}

/**
 * Runs `fn`; a connection error is retried with back-off until `windowMs` has passed since the first one, so an
 * outage shorter than the window (a NATS restart, a rescheduled coordinator pod) costs a delay, not a recovery.
 * Other errors, and an outage longer than the window, are thrown (the latter as a ConnectionError naming the
 * address); the loop's recovery takes over from there.
 */
export async function rideOut<T>(fn: () => Promise<T>, o: RideOutOptions): Promise<T> {
  const backoff = o.backoff ?? new Backoff({ initialMs: 250, maxMs: 5000 });
  const l = o.log ?? log;
  let firstFailure: number | undefined;
  for (;;) {
    try {
      const r = await fn();
      if (firstFailure !== undefined) l.info({ event: 'reconnected', what: o.what, address: o.address, downSeconds: (Date.now() - firstFailure) / 1000 }, `${o.what} at ${o.address} reachable again`);
      return r;
    } catch (e) {
      if (!isConnectionError(e)) throw e;
      const now = Date.now();
      firstFailure ??= now;
      const down = now - firstFailure;
      const wait = backoff.next();
      if (down + wait > o.windowMs) throw connectionError(o.what, o.address, e, down);
      l.warn({ event: 'outage', what: o.what, address: o.address, downSeconds: down / 1000, retryInMs: wait, windowSeconds: o.windowMs / 1000 }, `${o.what} at ${o.address} unreachable: retrying`);
      if (!(await sleep(wait, o.abort))) throw o.abort?.reason ?? connectionError(o.what, o.address, e, down);
    }
  }
}

