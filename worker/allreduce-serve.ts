// The threads of one rank's threaded all-reduce (worker/allreduce-thread.ts starts them; allreduce-thread.mjs
// and allreduce-main.ts are their entries). Each has its own NATS connection, made with the same URL and options
// (common/nats-options.ts) as the worker's own.
//
//   receive thread: the whole protocol of worker/allreduce.ts (NatsAllReduce: join barrier, buckets, verify, the
//     fixed-order sum in place in the caller's shared buffer, all-gather copies, timeouts), except that what it
//     would publish it hands to the send thread (PortSender) — a message of a few fields and a view of the
//     shared buffer, never the bytes.
//   send thread: seals (its own random nonce prefix: it is the rank's only sender) and publishes, and acknowledges
//     what it has published once nats.js has copied it out of the buffer (the receive thread returns a buffer to
//     the caller only then).
//   gather thread (optional, default on): receives the all-gather subjects and relays the messages, unchecked, to
//     the receive thread — nats.js's receive work (parsing, assembling 1 MiB messages from 64 KiB socket reads,
//     their garbage) is most of receiving, and this halves it on the receive thread.
// On one thread a rank spends about as much as the raw publisher and subscriber processes together; on three the
// longest is 0.60–0.66 of that at 64 MB (bench/RESULTS.md, NATS all-reduce).
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { connect, headers as natsHeaders, type NatsConnection } from '@nats-io/transport-node';
import { NatsAllReduce, Sealer, gatherSubjects, statsIn, tagKey, type AllReduceSender, type AllReduceStats, type Header, type NatsAllReduceOptions } from './allreduce.ts';
import { natsConnectOptions } from '../common/nats-options.ts';
import { connectionError } from '../common/connection.ts';
import { DqloraError } from '../common/errors.ts';
import { threadCpuMs } from '../common/thread-cpu.ts';

/** What worker/allreduce-thread.ts passes each thread. */
export interface AllReduceThreadData {
  role: 'receive' | 'send' | 'gather';
  url: string;
  /** Connection name (the role is appended). */
  name: string;
  opts: NatsAllReduceOptions;
  /** AllReduceStats slots (statsIn), shared with the caller. */
  stats: Float64Array;
  /** The receive thread's: the send thread; the send and gather threads': the receive thread. */
  peer: MessagePort;
  /** The receive thread's: the gather thread, when there is one. */
  gather?: MessagePort;
}

/** Caller → receive thread. */
export type ToReceive = { op: 'call'; id: number; seq: number; bucket: number; buf: Float32Array } | { op: 'close' } | { op: 'cpu'; id: number };
/** Caller → send thread. */
export type ToSend = { op: 'close' } | { op: 'cpu'; id: number };
/** Either thread → caller. */
export type FromThread =
  | { op: 'ready' }
  | { op: 'result'; id: number; error?: SerializedError }
  | { op: 'cpu'; id: number; ms: number };
/**
 * Receive thread → send thread, in batches (one post per turn of the receive thread's loop): a buffer is shared
 * once per call (cloning a SharedArrayBuffer handle per message cost the receive thread ~0.3 ms a message), messages
 * name it by id and element range; `release` when its call is over.
 */
type ToSender =
  | { op: 'buffer'; id: number; buf: Float32Array }
  | { op: 'publish'; ticket: number; subject: string; hd: Header; buf?: number; lo?: number; hi?: number }
  | { op: 'release'; id: number };
type SendReport = { op: 'drained'; ticket: number } | { op: 'failed'; error: SerializedError; spent?: boolean };

export interface SerializedError { name: string; message: string; missingRanks?: number[]; phase?: string }

export function serializeError(e: unknown): SerializedError {
  const err = e instanceof Error ? e : new Error(String(e));
  const x = err as Error & { missingRanks?: number[]; phase?: string };
  return { name: err.name, message: err.message, missingRanks: x.missingRanks, phase: x.phase };
}

/** Runs this thread's role (called from the thread's entry). */
export async function serve(): Promise<void> {
  const port = parentPort;
  if (!port) throw new DqloraError('worker/allreduce-serve.ts must run in a worker thread');
  const d = workerData as AllReduceThreadData;
  const post = (m: FromThread): void => port.postMessage(m);
  let nc: NatsConnection;
  try {
    nc = await connect({ servers: d.url, name: `${d.name}-${d.role}`, timeout: 10_000, ...natsConnectOptions() })
      .catch((e: unknown) => { throw connectionError('NATS', d.url, e); });
  } catch (e) {
    post({ op: 'result', id: 0, error: serializeError(e) }); // the caller terminates this thread
    return;
  }
  const stats = statsIn(d.stats);
  const exit = async (): Promise<void> => {
    await nc.close().catch(() => {});
    d.peer.close();
    d.gather?.close();
    process.exit(0);
  };
  try {
    if (d.role === 'send') serveSend(nc, d, stats, port, exit);
    else if (d.role === 'gather') serveGather(nc, d, port, exit);
    else serveReceive(nc, d, stats, port, exit);
  } catch (e) {
    post({ op: 'result', id: 0, error: serializeError(e) }); // invalid options: the caller terminates this thread
    await nc.close().catch(() => {});
  }
}

function serveReceive(nc: NatsConnection, d: AllReduceThreadData, stats: AllReduceStats, port: MessagePort, exit: () => Promise<void>): void {
  const sender = new PortSender(d.peer);
  const ar = new NatsAllReduce(nc, d.opts, { sender, stats, gatherRelayed: !!d.gather });
  d.gather?.on('message', (batch: (Relayed | { failed: string })[]) => {
    for (const m of batch) {
      if ('failed' in m) ar.fail(new DqloraError(m.failed));
      else ar.deliver(m.subject, m.dq, m.data);
    }
  });
  sender.onFailure = (e) => ar.fail(e);
  watchDrops(nc, 'receive', (e) => ar.fail(e));
  port.on('message', (m: ToReceive) => {
    if (m.op === 'call') {
      ar.allReduceBucket(m.seq, m.bucket, m.buf).then(
        () => port.postMessage({ op: 'result', id: m.id } satisfies FromThread),
        (e: unknown) => port.postMessage({ op: 'result', id: m.id, error: serializeError(e) } satisfies FromThread));
    } else if (m.op === 'cpu') {
      port.postMessage({ op: 'cpu', id: m.id, ms: threadCpuMs() } satisfies FromThread);
    } else {
      ar.close();
      sender.close();
      void exit();
    }
  });
  // The subscriptions (made by the constructor) are on the server before the caller may start a call.
  void nc.flush().then(() => port.postMessage({ op: 'ready' } satisfies FromThread));
}

function serveSend(nc: NatsConnection, d: AllReduceThreadData, stats: AllReduceStats, port: MessagePort, exit: () => Promise<void>): void {
  const { jobId, stage, rank } = d.opts;
  const sealer = new Sealer(tagKey(d.opts.key ?? new Uint8Array(0)), Buffer.from(jobId), `all-reduce job ${jobId} stage ${stage} rank ${rank}`);
  const empty = new Uint8Array(0);
  let published = 0, ackScheduled = false;
  // nats.js copies what was published into its outbound buffer on the next microtask; a macrotask later it is out
  // of the caller's buffer.
  const ack = (): void => { ackScheduled = false; d.peer.postMessage({ op: 'drained', ticket: published } satisfies SendReport); };
  const bufs = new Map<number, Float32Array>();
  const publish = (m: Extract<ToSender, { op: 'publish' }>): void => {
    try {
      const data = m.buf === undefined ? undefined : bufs.get(m.buf)!.subarray(m.lo, m.hi);
      const payload = data ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : empty;
      const h = natsHeaders();
      h.set('dq', sealer.seal(m.hd, payload));
      nc.publish(m.subject, payload, { headers: h });
      if (data) {
        stats.bytesSent += payload.length;
        stats.messagesSent++;
      }
    } catch (e) {
      d.peer.postMessage({ op: 'failed', error: serializeError(e), spent: !sealer.canSeal } satisfies SendReport);
    }
    published = m.ticket;
  };
  d.peer.on('message', (batch: ToSender[]) => {
    for (const m of batch) {
      if (m.op === 'publish') publish(m);
      else if (m.op === 'buffer') bufs.set(m.id, m.buf);
      else bufs.delete(m.id);
    }
    if (!ackScheduled) { ackScheduled = true; setImmediate(ack); }
  });
  watchDrops(nc, 'send', (e) => d.peer.postMessage({ op: 'failed', error: serializeError(e) } satisfies SendReport));
  port.on('message', (m: ToSend) => {
    if (m.op === 'cpu') port.postMessage({ op: 'cpu', id: m.id, ms: threadCpuMs() } satisfies FromThread);
    else void exit();
  });
  void nc.flush().then(() => port.postMessage({ op: 'ready' } satisfies FromThread));
}

/** Gather thread → receive thread: all-gather messages as received, checked there. */
interface Relayed { subject: string; dq?: string; data: Uint8Array }

/**
 * The gather thread: receives the all-gather half of the traffic on a connection of its own and hands each message
 * (its bytes copied out of nats.js's buffer into one that moves, not copies, to the receive thread) to the receive
 * thread, which checks and places it as any other. So nats.js's receive work (parsing, assembling 1 MiB messages
 * from socket reads, their garbage) is split between two threads.
 */
function serveGather(nc: NatsConnection, d: AllReduceThreadData, port: MessagePort, exit: () => Promise<void>): void {
  const { jobId, stage, rank, worldSize } = d.opts;
  let batch: Relayed[] = [], transfer: ArrayBuffer[] = [];
  const flush = (): void => { d.peer.postMessage(batch, transfer); batch = []; transfer = []; };
  for (const subject of gatherSubjects(jobId, stage, rank, worldSize)) {
    nc.subscribe(subject, { callback: (err, m) => {
      if (err) return;
      const data = new Uint8Array(m.data.length);
      data.set(m.data);
      if (batch.length === 0) queueMicrotask(flush);
      batch.push({ subject: m.subject, dq: m.headers?.get('dq') || undefined, data });
      transfer.push(data.buffer);
    } });
  }
  watchDrops(nc, 'gather', (e) => d.peer.postMessage([{ failed: e.message }]));
  port.on('message', (m: ToSend) => {
    if (m.op === 'cpu') port.postMessage({ op: 'cpu', id: m.id, ms: threadCpuMs() } satisfies FromThread);
    else void exit();
  });
  void nc.flush().then(() => port.postMessage({ op: 'ready' } satisfies FromThread));
}

/** A dropped connection fails the calls in flight at once, naming NATS (as the stage runner's link watch does). */
function watchDrops(nc: NatsConnection, role: string, fail: (e: Error) => void): void {
  void (async () => {
    for await (const st of nc.status()) {
      if (st.type === 'disconnect') fail(new DqloraError(`cannot reach NATS at ${st.server || nc.getServer()}: the all-reduce's ${role} connection dropped`, { hint: 'is nats-server running and reachable?' }));
    }
  })().catch(() => { /* ends with the connection */ });
}

/** The receive thread's AllReduceSender: hands each message to the send thread (a view of the shared buffer). */
class PortSender implements AllReduceSender {
  private ticket = 0;
  /** Ids of the buffers shared with the send thread, by the buffer's memory. */
  private readonly ids = new Map<SharedArrayBuffer, number>();
  private nextId = 1;
  private batch: ToSender[] = [];
  private drainedTicket = 0;
  private failed = false;
  private closed = false;
  private readonly waiters: { ticket: number; resolve: () => void }[] = [];
  onFailure?: (e: Error) => void;

  constructor(private readonly peer: MessagePort) {
    peer.on('message', (m: SendReport) => {
      if (m.op === 'drained') {
        this.drainedTicket = m.ticket;
        this.wake();
      } else {
        if (m.spent) this.failed = true; // (no more ready replies either)
        this.onFailure?.(new DqloraError(m.error.message));
      }
    });
  }

  get canSend(): boolean { return !this.failed && !this.closed; }

  send(subject: string, hd: Header, data?: Float32Array): void {
    if (this.closed) return;
    let buf: number | undefined, lo: number | undefined, hi: number | undefined;
    if (data) {
      const sab = data.buffer as SharedArrayBuffer;
      buf = this.ids.get(sab);
      if (buf === undefined) {
        this.ids.set(sab, buf = this.nextId++);
        this.queue({ op: 'buffer', id: buf, buf: new Float32Array(sab) });
      }
      lo = data.byteOffset / 4;
      hi = lo + data.length;
    }
    this.queue({ op: 'publish', ticket: ++this.ticket, subject, hd, buf, lo, hi });
  }

  release(data: Float32Array): void {
    const id = this.ids.get(data.buffer as SharedArrayBuffer);
    if (id === undefined) return;
    this.ids.delete(data.buffer as SharedArrayBuffer);
    this.queue({ op: 'release', id });
  }

  private queue(m: ToSender): void {
    if (this.batch.length === 0) queueMicrotask(() => { const b = this.batch; this.batch = []; this.peer.postMessage(b); });
    this.batch.push(m);
  }

  drained(): Promise<void> {
    if (this.closed || this.drainedTicket >= this.ticket) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ ticket: this.ticket, resolve }));
  }

  close(): void {
    this.closed = true;
    this.wake();
  }

  private wake(): void {
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      if (this.closed || this.waiters[i].ticket <= this.drainedTicket) { this.waiters[i].resolve(); this.waiters.splice(i, 1); }
    }
  }
}
