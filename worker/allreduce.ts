// Sum-all-reduce of a float32 buffer (the LoRA gradients of one pipeline stage) among the R data-parallel
// replicas of that stage, over core NATS (no JetStream).
//
// Bandwidth-optimal two-phase scheme (every rank sends 2(R−1)/R of the buffer in total):
//   1. reduce-scatter: the buffer is cut into R contiguous slices; rank o owns slice o. Every rank publishes
//      its copy of slice o to   dqlora.<job>.ar.<stage>.<step>.rs.<o>   (skipping its own slice). The owner
//      sums the R copies in FIXED rank order 0..R−1 — never arrival order — in float32, so the result has
//      the same bits whatever the timing.
//   2. all-gather: the owner writes each reduced chunk into its buffer and publishes it once on
//      dqlora.<job>.ar.<stage>.<step>.ag.<o>; the server fans it out to the R−1 other ranks, which copy it
//      into place. Every rank ends with the owner's bits for every slice: identical buffers everywhere.
//   The phases overlap per chunk: a chunk of the owner's slice is reduced and all-gathered as soon as its
//   R−1 contributions are in, while later chunks are still arriving. That needs chunk c to cover the
//   same elements on every rank, so all ranks must use the same maxPayload (checked; the default, the
//   server's max_payload, is the same for every client of one server).
//
// Messages are chunked under the server's max_payload (headers included). Each carries NATS headers
//   rank (sender), step, chunk (index), count (chunks in this slice), off (element offset in the slice), n
//   (total buffer elements, so a replica with a different LoRA layout is reported, not mis-summed).
//
// Subscriptions are wildcards over the step token, made once at construction, so a message of step s+1
// from a faster peer is already buffered when this rank gets there. The first call runs a join barrier
// (a rank publishes "ready" until it has heard from every peer; any message from a peer also counts) so
// nothing is published to a peer that has not subscribed yet. Messages of steps already completed are
// dropped as stale. A step that does not complete within `timeoutMs` fails with AllReduceTimeoutError,
// which names the ranks whose data is missing.
import type { Msg, MsgHdrs, NatsConnection, Subscription } from '@nats-io/transport-node';
import { headers as natsHeaders } from '@nats-io/transport-node';
import { ConfigError, DqloraError, WireError } from '../common/errors.ts';
import { logger } from '../common/log.ts';

const log = logger('allreduce');

/** Bytes kept free in every message for the NATS headers (they count towards max_payload). */
const HEADER_RESERVE = 256;
/** Future steps buffered at most (a peer can be at most one step ahead; the rest is slack for reordering). */
const MAX_PENDING_STEPS = 4;
/** Interval of the join barrier's "ready" announcements. */
const READY_INTERVAL_MS = 50;

/** A step did not complete in time; `missingRanks` are the ranks whose data never (fully) arrived. */
export class AllReduceTimeoutError extends DqloraError {
  constructor(message: string, readonly missingRanks: number[], readonly phase: 'join' | 'reduce-scatter' | 'all-gather') {
    super(message, { hint: `check that the worker(s) holding rank ${missingRanks.join(', ')} of this stage are alive and connected to the same NATS server` });
  }
}

export interface NatsAllReduceOptions {
  /** Job id, used as a subject token: letters, digits, '_' and '-'. */
  jobId: string;
  /** Pipeline stage whose replicas take part. */
  stage: number;
  /** This replica's rank, 0..worldSize−1. */
  rank: number;
  worldSize: number;
  /** Per step (and for the join barrier): how long to wait for peers before failing. */
  timeoutMs: number;
  /** Max bytes per message; default and upper bound: the server's max_payload (nc.info.max_payload). */
  maxPayload?: number;
  /** Largest accepted buffer, in elements (bounds what a peer's `n` header can make us allocate). */
  maxElements?: number;
}

export interface AllReduceStats {
  bytesSent: number;
  bytesReceived: number;
  messagesSent: number;
  messagesReceived: number;
  /** Messages of already-completed steps (late duplicates, retries of a failed peer). */
  staleDropped: number;
}

/** One incoming slice (from one sender), assembled from its chunks. */
interface Incoming {
  /** [sliceLen] — staging, or (all-gather while the call is active) a view into the caller's buffer. */
  data: Float32Array;
  seen: Uint8Array; // [count] 1 when chunk i arrived
  count: number;
  chunksGot: number;
  complete: boolean;
}

interface StepState {
  step: number;
  n: number;
  /** Contributions to this rank's slice, by sender rank. */
  rs: Map<number, Incoming>;
  /** Reduced slices, by owner rank. */
  ag: Map<number, Incoming>;
  /** The caller's buffer once allReduceSum(step) runs. */
  buf?: Float32Array;
  /** Per chunk of this rank's slice: how many peers have delivered it, and whether it is reduced and sent. */
  rsChunkPeers: Uint16Array;
  reduced: Uint8Array;
  reducedCount: number;
  error?: Error;
  wake?: () => void;
}

export class NatsAllReduce {
  readonly stats: AllReduceStats = { bytesSent: 0, bytesReceived: 0, messagesSent: 0, messagesReceived: 0, staleDropped: 0 };
  private readonly nc: NatsConnection;
  private readonly opts: Required<NatsAllReduceOptions>;
  private readonly prefix: string;
  private readonly subs: Subscription[] = [];
  private readonly steps = new Map<number, StepState>();
  /** Ranks known to have subscribed (heard from directly). */
  private readonly joined = new Set<number>();
  private joinWake?: () => void;
  private joinPromise?: Promise<void>;
  private lastCompleted = -Infinity;
  private busy = false;
  private closed = false;
  private lastReadyReply = 0;

  constructor(nc: NatsConnection, opts: NatsAllReduceOptions) {
    const serverMax = nc.info?.max_payload ?? 1024 * 1024;
    this.nc = nc;
    this.opts = { maxPayload: serverMax, maxElements: 1 << 28, ...opts };
    const { jobId, stage, rank, worldSize, timeoutMs, maxPayload } = this.opts;
    if (!/^[A-Za-z0-9_-]{1,128}$/.test(jobId)) throw new ConfigError(`all-reduce: job id "${jobId}" cannot be a NATS subject token`, { hint: 'use letters, digits, "_" and "-" only' });
    if (!Number.isInteger(worldSize) || worldSize < 1) throw new ConfigError(`all-reduce: worldSize ${worldSize} must be a positive integer`);
    if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) throw new ConfigError(`all-reduce: rank ${rank} outside 0..${worldSize - 1}`);
    if (!Number.isInteger(stage) || stage < 0) throw new ConfigError(`all-reduce: stage ${stage} must be a non-negative integer`);
    if (!(timeoutMs > 0)) throw new ConfigError(`all-reduce: timeoutMs ${timeoutMs} must be positive`);
    if (maxPayload > serverMax) throw new ConfigError(`all-reduce: maxPayload ${maxPayload} exceeds the server's max_payload ${serverMax}`);
    if (maxPayload < 4 * HEADER_RESERVE) throw new ConfigError(`all-reduce: maxPayload ${maxPayload} is too small (need ≥ ${4 * HEADER_RESERVE} bytes)`);
    this.prefix = `dqlora.${jobId}.ar.${stage}`;
    if (worldSize === 1) return;
    // Wildcard over the step token: messages of any step land here, before or during that step's call.
    this.subs.push(nc.subscribe(`${this.prefix}.*.rs.${rank}`, { callback: (err, m) => this.onMessage(err, m, 'rs') }));
    for (let o = 0; o < worldSize; o++) {
      if (o !== rank) this.subs.push(nc.subscribe(`${this.prefix}.*.ag.${o}`, { callback: (err, m) => this.onMessage(err, m, 'ag') }));
    }
    this.subs.push(nc.subscribe(`${this.prefix}.ready`, { callback: (err, m) => this.onReady(err, m) }));
  }

  /** Elements per message payload. */
  private get chunkElems(): number {
    return Math.floor((this.opts.maxPayload - HEADER_RESERVE) / 4);
  }

  /** Slice [lo, hi) of a buffer of n elements owned by `owner`: the first n mod R owners get one extra. */
  static slice(n: number, worldSize: number, owner: number): [number, number] {
    const base = Math.floor(n / worldSize), rem = n % worldSize;
    const lo = owner * base + Math.min(owner, rem);
    return [lo, lo + base + (owner < rem ? 1 : 0)];
  }

  /**
   * Replaces `buf` (every replica's [n] float32 gradients) by the element-wise sum over all ranks, summed in
   * rank order 0..R−1. All ranks must call it with the same step and length. Calls are sequential.
   */
  async allReduceSum(step: number, buf: Float32Array): Promise<void> {
    const { worldSize, rank, timeoutMs } = this.opts;
    if (this.closed) throw new DqloraError('all-reduce: used after close()');
    if (!Number.isSafeInteger(step) || step < 0) throw new ConfigError(`all-reduce: step ${step} must be a non-negative integer`);
    if (worldSize === 1) return;
    if (this.busy) throw new DqloraError(`all-reduce: step ${step} started while another step is still running on this rank`);
    if (step <= this.lastCompleted) throw new DqloraError(`all-reduce: step ${step} is not after the last completed step ${this.lastCompleted}`);
    if (buf.length > this.opts.maxElements) throw new ConfigError(`all-reduce: buffer of ${buf.length} elements exceeds maxElements ${this.opts.maxElements}`);
    this.busy = true;
    const deadline = Date.now() + timeoutMs;
    try {
      await this.join(deadline);
      // Earlier steps that never completed (a failed step) can no longer complete: drop their buffers.
      for (const s of this.steps.keys()) if (s < step) this.steps.delete(s);
      const st = this.state(step, buf.length);
      const sameLength = st.n === buf.length;
      if (sameLength) {
        st.buf = buf;
        // All-gather slices that arrived before this call were staged: move them into place and keep
        // assembling the rest directly in `buf`.
        for (const [o, inc] of st.ag) {
          const [lo, hi] = NatsAllReduce.slice(buf.length, worldSize, o);
          const view = buf.subarray(lo, hi);
          view.set(inc.data);
          inc.data = view;
        }
      }
      // 1. reduce-scatter: send my copy of every other owner's slice. (Also on a length mismatch, so that
      // every peer sees it and fails with the same clear error instead of timing out.)
      for (let o = 0; o < worldSize; o++) {
        if (o === rank) continue;
        const [lo, hi] = NatsAllReduce.slice(buf.length, worldSize, o);
        this.publishSlice(`${this.prefix}.${step}.rs.${o}`, step, buf.length, buf.subarray(lo, hi));
      }
      if (!sameLength) {
        this.steps.delete(step);
        throw new WireError(`all-reduce step ${step}: a peer sent a buffer of ${st.n} elements, this rank has ${buf.length}`, { hint: 'replicas of one stage must hold the same LoRA layout' });
      }
      // 2. Chunks of my slice whose contributions are all in are reduced and all-gathered right away; the
      // rest as their last contribution arrives (onMessage), so both phases overlap on the wire.
      this.reduceReadyChunks(st);
      await this.waitFor(st, deadline, 'reduce-scatter', () => (st.reducedCount === st.reduced.length ? [] : this.missing(st.rs)));
      await this.waitFor(st, deadline, 'all-gather', () => this.missing(st.ag));
      this.lastCompleted = step;
      this.steps.delete(step);
    } finally {
      this.busy = false;
    }
  }

  /** Unsubscribes. The connection stays open (it belongs to the caller). */
  close(): void {
    this.closed = true;
    for (const s of this.subs) s.unsubscribe();
    this.subs.length = 0;
    for (const st of this.steps.values()) st.wake?.();
    this.joinWake?.();
  }

  // ----- reducing -----

  /**
   * Reduces chunk c of this rank's slice — acc = x_0 + x_1 + … + x_{R−1} in rank order, every addition
   * rounded to float32 — writes it into the caller's buffer and publishes it on the all-gather subject.
   */
  private reduceChunk(st: StepState, c: number): void {
    const { worldSize, rank } = this.opts;
    const buf = st.buf!;
    const [lo, hi] = NatsAllReduce.slice(st.n, worldSize, rank);
    const per = this.chunkElems;
    const a = c * per, b = Math.min(hi - lo, (c + 1) * per);
    const mine = buf.subarray(lo + a, lo + b);
    const parts: Float32Array[] = [];
    for (let q = 0; q < worldSize; q++) parts.push(q === rank ? mine : st.rs.get(q)!.data.subarray(a, b));
    const acc = parts[0].slice();
    for (let q = 1; q < worldSize; q++) {
      const p = parts[q];
      for (let i = 0; i < acc.length; i++) acc[i] += p[i];
    }
    mine.set(acc);
    st.reduced[c] = 1;
    st.reducedCount++;
    this.publishChunk(`${this.prefix}.${st.step}.ag.${rank}`, st.step, st.n, c, st.reduced.length, a, mine);
  }

  /** Reduces every chunk whose R−1 contributions have arrived (only once the caller's buffer is known). */
  private reduceReadyChunks(st: StepState): void {
    if (!st.buf) return;
    const need = this.opts.worldSize - 1;
    for (let c = 0; c < st.reduced.length; c++) if (!st.reduced[c] && st.rsChunkPeers[c] === need) this.reduceChunk(st, c);
  }

  // ----- sending -----

  private publishSlice(subject: string, step: number, n: number, slice: Float32Array): void {
    const per = this.chunkElems;
    const count = Math.max(1, Math.ceil(slice.length / per));
    for (let c = 0; c < count; c++) this.publishChunk(subject, step, n, c, count, c * per, slice.subarray(c * per, Math.min(slice.length, (c + 1) * per)));
  }

  private publishChunk(subject: string, step: number, n: number, chunk: number, count: number, off: number, data: Float32Array): void {
    const h = natsHeaders();
    h.set('rank', String(this.opts.rank));
    h.set('step', String(step));
    h.set('chunk', String(chunk));
    h.set('count', String(count));
    h.set('off', String(off));
    h.set('n', String(n));
    // nats.js keeps a reference and writes it out on the next microtask, before any peer can have
    // answered, so the caller's buffer cannot change under it.
    const payload = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    this.nc.publish(subject, payload, { headers: h });
    this.stats.bytesSent += payload.length;
    this.stats.messagesSent++;
  }

  // ----- join barrier -----

  private join(deadline: number): Promise<void> {
    this.joinPromise ??= this.runJoin(deadline);
    return this.joinPromise;
  }

  private async runJoin(deadline: number): Promise<void> {
    // The server must have registered our subscriptions before we tell anyone we are ready.
    await this.nc.flush();
    const others = (): number[] => range(this.opts.worldSize).filter((q) => q !== this.opts.rank && !this.joined.has(q));
    while (others().length > 0) {
      if (this.closed) throw new DqloraError('all-reduce: closed while joining');
      if (Date.now() >= deadline) {
        this.joinPromise = undefined; // a later call may try again
        const miss = others();
        throw new AllReduceTimeoutError(`all-reduce job ${this.opts.jobId} stage ${this.opts.stage}: rank ${this.opts.rank} timed out after ${this.opts.timeoutMs} ms waiting for rank(s) ${miss.join(', ')} to join`, miss, 'join');
      }
      this.announce();
      await new Promise<void>((res) => {
        const t = setTimeout(res, Math.min(READY_INTERVAL_MS, Math.max(1, deadline - Date.now())));
        this.joinWake = () => { clearTimeout(t); res(); };
      });
      this.joinWake = undefined;
    }
  }

  /** `reply`: an answer to a peer's announcement (never answered itself, so there is no ping-pong). */
  private announce(reply = false): void {
    const h = natsHeaders();
    h.set('rank', String(this.opts.rank));
    if (reply) h.set('reply', '1');
    this.nc.publish(`${this.prefix}.ready`, undefined, { headers: h });
  }

  private onReady(err: Error | null, m: Msg): void {
    if (err || this.closed) return;
    const q = parseIntHeader(m.headers, 'rank');
    if (q === undefined || q === this.opts.rank || q >= this.opts.worldSize) return;
    this.heardFrom(q);
    // A peer announcing itself may not have heard from us yet (we may not be in a call, or we finished our
    // own barrier before it subscribed): answer. Receiving this proves our subscriptions, made in one
    // ordered batch before this one, are active on the server. Rate-limited against a flood of joiners.
    const now = Date.now();
    if (m.headers?.get('reply') !== '1' && now - this.lastReadyReply >= READY_INTERVAL_MS / 5) {
      this.lastReadyReply = now;
      this.announce(true);
    }
  }

  private heardFrom(q: number): void {
    if (!this.joined.has(q)) {
      this.joined.add(q);
      this.joinWake?.();
    }
  }

  // ----- receiving -----

  private onMessage(err: Error | null, m: Msg, kind: 'rs' | 'ag'): void {
    if (err || this.closed) return;
    const { worldSize, rank } = this.opts;
    const h = m.headers;
    const from = parseIntHeader(h, 'rank'), step = parseIntHeader(h, 'step'), chunk = parseIntHeader(h, 'chunk');
    const count = parseIntHeader(h, 'count'), off = parseIntHeader(h, 'off'), n = parseIntHeader(h, 'n');
    if (from === undefined || step === undefined || chunk === undefined || count === undefined || off === undefined || n === undefined) {
      log.warn({ subject: m.subject }, 'all-reduce: dropping a message without valid rank/step/chunk/count/off/n headers');
      return;
    }
    this.stats.messagesReceived++;
    this.stats.bytesReceived += m.data.length;
    if (from >= worldSize || from === rank) {
      log.warn({ subject: m.subject, from }, 'all-reduce: dropping a message from an unknown rank');
      return;
    }
    this.heardFrom(from);
    if (step <= this.lastCompleted) {
      this.stats.staleDropped++;
      return;
    }
    if (n > this.opts.maxElements) {
      log.warn({ subject: m.subject, n }, 'all-reduce: dropping a message announcing a buffer above maxElements');
      return;
    }
    let st = this.steps.get(step);
    if (!st) {
      if (this.steps.size >= MAX_PENDING_STEPS) {
        log.warn({ step, pending: [...this.steps.keys()] }, 'all-reduce: too many pending steps, dropping a message');
        return;
      }
      st = this.state(step, n);
    }
    try {
      if (n !== st.n) throw new WireError(`all-reduce step ${step}: rank ${from} sent a buffer of ${n} elements, expected ${st.n}`, { hint: 'replicas of one stage must hold the same LoRA layout' });
      // rs: from → my slice; ag: the owner `from` → its slice.
      const owner = kind === 'rs' ? rank : from;
      const [lo, hi] = NatsAllReduce.slice(st.n, worldSize, owner);
      const len = hi - lo;
      const map = kind === 'rs' ? st.rs : st.ag;
      let inc = map.get(from);
      if (!inc) {
        if (count < 1 || count > Math.max(1, len)) throw new WireError(`all-reduce step ${step}: rank ${from} announced ${count} chunks for a slice of ${len} elements`);
        const data = kind === 'ag' && st.buf ? st.buf.subarray(lo, hi) : new Float32Array(len);
        inc = { data, seen: new Uint8Array(count), count, chunksGot: 0, complete: false };
        map.set(from, inc);
      }
      if (count !== inc.count || chunk >= count) throw new WireError(`all-reduce step ${step}: rank ${from} sent chunk ${chunk} of ${count}, expected one of ${inc.count}`);
      if (inc.seen[chunk]) return; // a duplicate delivery: the first copy counts
      if (kind === 'rs' && (count !== st.reduced.length || off !== chunk * this.chunkElems)) {
        // Chunk c must mean the same elements on every rank, so that it can be reduced as soon as it is in.
        throw new WireError(`all-reduce step ${step}: rank ${from} chunks its slice differently (chunk ${chunk} at element ${off} of ${count}; here ${st.reduced.length} chunks of ${this.chunkElems})`,
          { hint: 'all replicas must use the same maxPayload (default: the server\'s max_payload)' });
      }
      if (m.data.length % 4 !== 0 || off + m.data.length / 4 > len) {
        throw new WireError(`all-reduce step ${step}: rank ${from} chunk ${chunk} (${m.data.length} bytes at element ${off}) does not fit its ${len}-element slice`);
      }
      // Copy: the message bytes live in the socket's read buffer and may sit at an odd offset.
      new Uint8Array(inc.data.buffer, inc.data.byteOffset + off * 4, m.data.length).set(m.data);
      inc.seen[chunk] = 1;
      inc.chunksGot++;
      if (inc.chunksGot === inc.count) inc.complete = true;
      if (kind === 'rs') {
        st.rsChunkPeers[chunk]++;
        if (st.rsChunkPeers[chunk] === worldSize - 1 && st.buf) this.reduceChunk(st, chunk);
      }
    } catch (e) {
      st.error ??= e as Error;
    }
    st.wake?.();
  }

  private state(step: number, n: number): StepState {
    let st = this.steps.get(step);
    if (!st) {
      const [lo, hi] = NatsAllReduce.slice(n, this.opts.worldSize, this.opts.rank);
      const count = Math.max(1, Math.ceil((hi - lo) / this.chunkElems));
      st = { step, n, rs: new Map(), ag: new Map(), rsChunkPeers: new Uint16Array(count), reduced: new Uint8Array(count), reducedCount: 0 };
      this.steps.set(step, st);
    }
    return st;
  }

  /** Ranks whose slice for this phase is not complete yet. */
  private missing(map: Map<number, Incoming>): number[] {
    return range(this.opts.worldSize).filter((q) => q !== this.opts.rank && !map.get(q)?.complete);
  }

  private async waitFor(st: StepState, deadline: number, phase: 'reduce-scatter' | 'all-gather', missing: () => number[]): Promise<void> {
    for (;;) {
      if (st.error) throw st.error;
      if (this.closed) throw new DqloraError(`all-reduce step ${st.step}: closed during ${phase}`);
      const miss = missing();
      if (miss.length === 0) return;
      const left = deadline - Date.now();
      if (left <= 0) {
        const map = phase === 'reduce-scatter' ? st.rs : st.ag;
        const detail = miss.map((q) => {
          const inc = map.get(q);
          return inc ? `rank ${q} (${inc.chunksGot} of ${inc.count} chunks)` : `rank ${q} (nothing)`;
        }).join(', ');
        this.steps.delete(st.step);
        throw new AllReduceTimeoutError(
          `all-reduce job ${this.opts.jobId} stage ${this.opts.stage} step ${st.step}: rank ${this.opts.rank} timed out after ${this.opts.timeoutMs} ms in ${phase}, data missing from ${detail}`,
          miss, phase);
      }
      await new Promise<void>((res) => {
        const t = setTimeout(res, left);
        st.wake = () => { clearTimeout(t); res(); };
      });
      st.wake = undefined;
    }
  }
}

function parseIntHeader(h: MsgHdrs | undefined, key: string): number | undefined {
  const v = h?.get(key);
  if (!v || !/^\d{1,15}$/.test(v)) return undefined;
  return Number(v);
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}
