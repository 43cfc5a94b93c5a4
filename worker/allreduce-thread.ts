// The all-reduce of worker/allreduce.ts run off the caller's thread: a receive thread, a send thread and a gather
// thread, each with its own NATS connection (worker/allreduce-serve.ts). Same protocol and wire format, same fixed-order sum bit for
// bit, same API as NatsAllReduce (allReduceBucket, allReduceSum, close, stats), so that existing ranks and new ones
// can run in one job.
//
// Why: on one thread a rank sends and receives every byte of its share, and nats.js's copies, the tags and the sums
// of 1 MiB messages run on the caller's event loop (the worker's main thread, which also schedules the pipeline).
// Here the caller only posts the buffer and waits; receiving (verify, sum, all-gather copies; the all-gather
// messages' nats.js work on the gather thread) and sending (seal, publish) overlap on threads of their own, as the
// raw baseline's publisher and subscriber processes do. The cost: more CPU per rank in all (each thread's isolate
// has its own heap and GC) — a win where cores are free, a loss on a saturated machine (bench/RESULTS.md).
//
// Buffers: a Float32Array on a SharedArrayBuffer is used in place by both threads (the compute thread allocates
// gradient buckets that way); any other buffer is copied into a shared one and back — two copies of the buffer,
// which the stage runner never pays.
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import { AllReduceTimeoutError, STAT_SLOTS, statsIn, type AllReduceStats, type NatsAllReduceOptions } from './allreduce.ts';
import type { AllReduceThreadData, FromThread, SerializedError, ToReceive, ToSend } from './allreduce-serve.ts';
import { ConnectionError } from '../common/connection.ts';
import { ConfigError, DqloraError, WireError } from '../common/errors.ts';

const ERRORS: Record<string, new (m: string) => Error> = { ConfigError, ConnectionError, DqloraError, WireError };

/** The error a thread reported, as the class it was thrown as. */
function rebuild(e: SerializedError): Error {
  if (e.name === 'AllReduceTimeoutError') return new AllReduceTimeoutError(e.message, e.missingRanks ?? [], (e.phase ?? 'reduce-scatter') as 'join');
  return new (ERRORS[e.name] ?? DqloraError)(e.message);
}

export interface ThreadedAllReduceOptions extends NatsAllReduceOptions {
  /** NATS server URL(s), as for nats.js `servers`; credentials and TLS come from the environment (natsConnectOptions). */
  url: string;
  /** Connection name; "-receive" / "-send" / "-gather" is appended. */
  name?: string;
  /**
   * Receive the all-gather half on a third thread and connection (serveGather in allreduce-serve.ts), default true:
   * the receive thread then parses and assembles only half of the incoming bytes.
   */
  gatherThread?: boolean;
}

export class ThreadedAllReduce {
  readonly stats: AllReduceStats;
  private readonly receiver: Worker;
  private readonly sender: Worker;
  private readonly gatherer?: Worker;
  private readonly threads: Worker[];
  private next = 1;
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private dead?: Error;
  private closed = false;
  private readonly exited: Promise<void>;
  private readonly ready: Promise<void>;

  private constructor(private readonly opts: ThreadedAllReduceOptions) {
    const shared = new Float64Array(new SharedArrayBuffer(STAT_SLOTS * 8));
    this.stats = statsIn(shared);
    // DQLORA_ALLREDUCE_ENTRY: a bundled build's entry (allreduce-main.ts bundled), else the bootstrap next to this
    // file — in the source tree allreduce-thread.mjs, next to a bundle in .device/ the bundled entry of that name.
    const entry = process.env.DQLORA_ALLREDUCE_ENTRY || new URL('./allreduce-thread.mjs', import.meta.url);
    const { url, name, gatherThread, ...ar } = opts;
    const toSender = new MessageChannel();
    const toGatherer = gatherThread ?? true ? new MessageChannel() : undefined;
    const start = (role: AllReduceThreadData['role'], peer: MessagePort, gather?: MessagePort): Worker => {
      const data: AllReduceThreadData = { role, url, name: name ?? `dqlora-${ar.jobId}-s${ar.stage}-r${ar.rank}`, opts: ar, stats: shared, peer, gather };
      return new Worker(entry, { workerData: data, transferList: gather ? [peer, gather] : [peer] });
    };
    this.receiver = start('receive', toSender.port1, toGatherer?.port1);
    this.sender = start('send', toSender.port2);
    this.gatherer = toGatherer && start('gather', toGatherer.port2);
    this.threads = [this.receiver, this.sender, ...(this.gatherer ? [this.gatherer] : [])];
    const ready = (w: Worker): Promise<void> => new Promise((resolve, reject) => {
      w.on('message', (m: FromThread) => {
        if (m.op === 'ready') resolve();
        else if (m.op === 'result' && m.id === 0) reject(rebuild(m.error!));
        else this.settle(m);
      });
      w.once('exit', (code) => reject(new DqloraError(`the all-reduce's thread exited (code ${code}) before it was ready`)));
    });
    this.ready = Promise.all(this.threads.map(ready)).then(() => {});
    const gone = (w: Worker, role: string): Promise<void> => new Promise((resolve) => {
      w.on('error', (e) => this.fail(new DqloraError(`the all-reduce's ${role} thread failed: ${e.message}`)));
      w.once('exit', (code) => { if (!this.closed) this.fail(new DqloraError(`the all-reduce's ${role} thread stopped (exit code ${code})`)); resolve(); });
    });
    this.exited = Promise.all([gone(this.receiver, 'receive'), gone(this.sender, 'send'), ...(this.gatherer ? [gone(this.gatherer, 'gather')] : [])]).then(() => {});
  }

  /** Starts both threads; resolves once both are connected and subscribed. A refused connection names the address. */
  static async start(opts: ThreadedAllReduceOptions): Promise<ThreadedAllReduce> {
    const ar = new ThreadedAllReduce(opts);
    try {
      await ar.ready;
    } catch (e) {
      ar.closed = true;
      await Promise.all(ar.threads.map((w) => w.terminate()));
      throw e;
    }
    return ar;
  }

  /** NatsAllReduce.allReduceSum. */
  allReduceSum(step: number, buf: Float32Array): Promise<void> {
    return this.allReduceBucket(step, 0, buf);
  }

  /** NatsAllReduce.allReduceBucket; `buf` is used in place when it lies on a SharedArrayBuffer. */
  async allReduceBucket(seq: number, bucket: number, buf: Float32Array): Promise<void> {
    if (this.closed) throw new DqloraError('all-reduce: used after close()');
    if (this.dead) throw this.dead;
    if (this.opts.worldSize === 1) return;
    const shared = buf.buffer instanceof SharedArrayBuffer ? buf : new Float32Array(new SharedArrayBuffer(buf.byteLength));
    if (shared !== buf) shared.set(buf);
    await this.call(this.receiver, (id) => ({ op: 'call', id, seq, bucket, buf: shared }));
    if (shared !== buf) buf.set(shared);
  }

  /** CPU ms each thread has run since it started (benchmarks): receive, send, and gather when there is one. */
  async threadCpuMs(): Promise<number[]> {
    return await Promise.all(this.threads.map((w) => this.call(w, (id) => ({ op: 'cpu', id })))) as number[];
  }

  /** Fails calls in flight (they reject at once) and lets both threads close their connections and exit. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.fail(new DqloraError('all-reduce: closed during a call'));
    for (const w of this.threads) w.postMessage({ op: 'close' });
    // A thread stuck in a connect or close (NATS unreachable) is ended after a grace period.
    const t = setTimeout(() => { for (const w of this.threads) void w.terminate(); }, 2000);
    t.unref();
    void this.exited.then(() => clearTimeout(t));
  }

  /** Resolves once both threads have exited (after close()). */
  whenClosed(): Promise<void> {
    return this.exited;
  }

  private call(w: Worker, msg: (id: number) => ToReceive | ToSend): Promise<unknown> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      w.postMessage(msg(id));
    });
  }

  private settle(m: FromThread): void {
    if (m.op === 'ready') return;
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    if (m.op === 'cpu') p.resolve(m.ms);
    else if (m.error) p.reject(rebuild(m.error));
    else p.resolve(undefined);
  }

  private fail(e: Error): void {
    if (!this.closed) this.dead ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}
