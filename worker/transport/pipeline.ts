// gRPC transport between the pipeline stages of one replica: activations go forward to the next stage,
// gradients go backward to the previous one. One client-streaming call carries one tensor of one
// (step, micro-batch), chunked by wire/tensor.ts under the message limit; the receiver reassembles and
// validates it (ChunkAssembler) before handing it to the stage.
//
// Status codes the sender sees (and whether retrying the same tensor can help):
//   UNAUTHENTICATED      wrong or missing job token                                  no
//   FAILED_PRECONDITION  chunk of another job, or a stale step (receiver moved on)  no
//   ALREADY_EXISTS       this (step, micro-batch) was already delivered             no — treat as delivered
//   INVALID_ARGUMENT     malformed, duplicate, out-of-order, corrupt or truncated   yes, once (corruption)
//   RESOURCE_EXHAUSTED   a message above the receiver's limit, or a tensor above
//                        its size bound                                             no — fix the limits
//   UNAVAILABLE          receiver not (yet) listening / restarting                   yes, with back-off
//   DEADLINE_EXCEEDED    receiver too slow or stalled                                yes, then report it
//   RESOURCE_EXHAUSTED   also: more tensors in flight than the receiver accepts    no — lower maxInFlight
// PIPELINE_RETRYABLE below is that list in code, for the one retry loop (in the coordinator/worker).
//
// Throughput (bench/transport.ts; bench/RESULTS.md has the numbers). Loopback HTTP/2 in grpc-js is CPU-bound,
// not wire-bound, so what matters is the work per byte on both event loops (in a worker: the send thread's and the
// receive thread's, send-thread.ts and receive-thread.ts):
// - Flow control: HTTP/2 starts every stream and the connection at a 64 KiB window, and each refill needs a
//   WINDOW_UPDATE from the receiver's event loop. Both ends here open the stream and connection windows to
//   PIPELINE_FLOW_CONTROL_WINDOW (measured: ~10 % less CPU per byte than 64 KiB on loopback). grpc-js sets the
//   client's from `grpc-node.flow_control_window`, but has no server-side option: see tuneServerHttp2 below.
//   (A larger HTTP/2 max frame size was tried and changes nothing: Node's http2 sends 16 KiB DATA frames.)
// - `grpc-node.max_session_memory` (MB of buffered HTTP/2 data before nghttp2 refuses new streams): grpc-js
//   leaves it unbounded unless given; here it is bounded by what the windows allow in flight, plus headroom.
// - Copies: chunks are encoded and decoded by chunk-codec.ts (one copy into the message on send; the data
//   field is a view of the received message), and reassembled straight into the tensor's final array.
// - In flight: a sender may have up to `maxInFlight` tensors per direction on the wire at once (each its
//   own stream, so a send does not wait for the previous one's ack); further sends queue in call order. The
//   receiver accepts up to its own `maxInFlight` concurrent streams per direction and refuses more.
import crypto from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { DqloraError, WireError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import {
  ChunkAssembler, ChunkError, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_NUMEL, chunkTensor, f32ToBf16Tensor, f32ToTensor,
  type ChunkErrorReason, type HostTensor, type TensorChunk,
} from '../../wire/tensor.ts';
import { PipelineService, PipelineClient as GrpcPipelineClient, type ChunkAck } from '../../proto/gen/dqlora/v1/pipeline.ts';
import { decodeChunkFast, encodeChunkFast } from './chunk-codec.ts';
import type { Tensor } from '../../proto/gen/dqlora/v1/tensor.ts';

const log = logger('pipeline');

/** Metadata header carrying the job token on every pipeline call. */
export const JOB_TOKEN_METADATA = 'dqlora-job-token';

/** gRPC status codes after which resending the same tensor may succeed (see the table above). */
export const PIPELINE_RETRYABLE: ReadonlySet<grpc.status> = new Set([
  grpc.status.UNAVAILABLE, // the next stage is restarting or not listening yet
  grpc.status.DEADLINE_EXCEEDED, // a slow receiver; a resend of a delivered tensor is answered ALREADY_EXISTS
  grpc.status.INVALID_ARGUMENT, // data corrupted in transit (checksum); a second failure is a real bug
]);

export type Direction = 'forward' | 'backward';

/** Default chunk (gRPC message) size of pipeline transfers; the receiver's default message limit is the same. */
export const PIPELINE_DEFAULT_CHUNK_BYTES = DEFAULT_CHUNK_BYTES;
/** HTTP/2 stream and connection receive window of both ends (bytes). */
export const PIPELINE_FLOW_CONTROL_WINDOW = 16 << 20;
/** Default tensors in flight per direction: a sender's, and (larger, room for retries) a receiver's. */
export const PIPELINE_SEND_IN_FLIGHT = 2;
export const PIPELINE_RECEIVE_IN_FLIGHT = 8;

/** grpc-node.max_session_memory (MB) for `inFlight` streams of `window` bytes each, plus headroom. */
function sessionMemoryMb(window: number, inFlight: number): number {
  return Math.ceil((window * (inFlight + 1)) / (1 << 20)) + 32;
}


/** Byte counters to feed (e.g. WorkerMetrics.sentBytes / receivedBytes with transport="grpc"). */
interface ByteCounter { inc(labels: { transport: 'grpc' }, value: number): void }

export interface PipelineServerOptions {
  /** 0 (default) = an OS-assigned port; read it back from the returned server. */
  port?: number;
  /** Default 127.0.0.1; 0.0.0.0 to accept other machines. */
  host?: string;
  jobId: string;
  jobToken: string;
  /** Called with each complete, validated tensor. The ack is sent when the returned promise resolves, so
   *  it should enqueue the work, not do it (the sender waits for the ack). */
  onForward(step: number, microBatch: number, tensor: HostTensor): void | Promise<void>;
  onBackward(step: number, microBatch: number, tensor: HostTensor): void | Promise<void>;
  /** Largest gRPC message accepted; senders must chunk under it. Default DEFAULT_CHUNK_BYTES (1 MiB). */
  maxMessageBytes?: number;
  /** Largest tensor accepted, in elements. Default DEFAULT_MAX_NUMEL. */
  maxNumel?: number;
  credentials?: grpc.ServerCredentials;
  receivedBytes?: ByteCounter;
  /** Concurrent tensors (streams) accepted per direction; one more is RESOURCE_EXHAUSTED. Default PIPELINE_RECEIVE_IN_FLIGHT. */
  maxInFlight?: number;
  /** HTTP/2 receive window, bytes. Default PIPELINE_FLOW_CONTROL_WINDOW. */
  flowControlWindow?: number;
  /** Extra grpc.Server options (keepalive, connection idle/age: common/grpc-guard.ts SERVER_HYGIENE). */
  serverOptions?: grpc.ServerOptions;
  /** Binds the server instead of bindAsync (common/grpc-guard.ts listenGuarded: per-peer connection limit). */
  listen?: (server: grpc.Server, address: string, credentials: grpc.ServerCredentials) => Promise<{ port: number; close(): void }>;
  /** Where refused calls are reported (counted, logged rate-limited); default: one warning per refusal. */
  onReject?: (unauthenticated: boolean, peer: string, message: string) => void;
  /** The array each received tensor is reassembled into (default: a new one), e.g. from a BufferPool. */
  allocTensor?: (bytes: number) => Uint8Array;
}

export interface PipelineServerHandle {
  /** The bound port. */
  port: number;
  address: string;
  /** Steps below `step` are stale from now on (call when the stage starts a step). */
  setMinStep(step: number): void;
  readonly stats: { tensorsReceived: number; bytesReceived: number; rejected: number; inFlight: Record<Direction, number>; maxInFlightSeen: Record<Direction, number> };
  close(): Promise<void>;
}

function statusFor(reason: ChunkErrorReason): grpc.status {
  switch (reason) {
    case 'foreign-job': case 'stale': return grpc.status.FAILED_PRECONDITION;
    case 'oversized': return grpc.status.RESOURCE_EXHAUSTED;
    default: return grpc.status.INVALID_ARGUMENT;
  }
}

function tokenMatches(given: grpc.MetadataValue | undefined, expected: string): boolean {
  if (typeof given !== 'string') return false;
  const a = crypto.createHash('sha256').update(given).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b); // hashing first makes the comparison length-independent
}

/** Starts the Pipeline service of one stage. */
export async function startPipelineServer(opts: PipelineServerOptions): Promise<PipelineServerHandle> {
  const maxMessageBytes = opts.maxMessageBytes ?? DEFAULT_CHUNK_BYTES;
  const maxNumel = opts.maxNumel ?? DEFAULT_MAX_NUMEL;
  let minStep = 0;
  /** `${direction}:${step}:${microBatch}` of tensors delivered at steps ≥ minStep. */
  const delivered = new Set<string>();
  const maxInFlight = opts.maxInFlight ?? PIPELINE_RECEIVE_IN_FLIGHT;
  const window = opts.flowControlWindow ?? PIPELINE_FLOW_CONTROL_WINDOW;
  if (!Number.isInteger(maxInFlight) || maxInFlight < 1) throw new DqloraError(`pipeline server: maxInFlight ${maxInFlight} must be a positive integer`);
  if (!Number.isInteger(window) || window < 65535 || window > 2 ** 31 - 1) throw new DqloraError(`pipeline server: flowControlWindow ${window} must be an integer in 65535..2^31-1 (HTTP/2)`);
  const stats = { tensorsReceived: 0, bytesReceived: 0, rejected: 0, inFlight: { forward: 0, backward: 0 }, maxInFlightSeen: { forward: 0, backward: 0 } };

  function handle(direction: Direction) {
    return (call: grpc.ServerReadableStream<TensorChunk, ChunkAck>, callback: grpc.sendUnaryData<ChunkAck>): void => {
      let finished = false;
      let counted = false;
      const release = (): void => {
        if (counted) { counted = false; stats.inFlight[direction]--; }
      };
      const fail = (code: grpc.status, message: string): void => {
        if (finished) return;
        finished = true;
        release();
        stats.rejected++;
        if (opts.onReject) opts.onReject(code === grpc.status.UNAUTHENTICATED, call.getPeer(), message);
        else log.warn({ direction, code: grpc.status[code], peer: call.getPeer() }, message);
        callback({ code, details: message });
      };
      if (!tokenMatches(call.metadata.get(JOB_TOKEN_METADATA)[0], opts.jobToken)) {
        fail(grpc.status.UNAUTHENTICATED, `pipeline ${direction}: missing or wrong job token for job "${opts.jobId}" (metadata "${JOB_TOKEN_METADATA}")`);
        return;
      }
      if (stats.inFlight[direction] >= maxInFlight) {
        fail(grpc.status.RESOURCE_EXHAUSTED, `pipeline ${direction}: more than ${maxInFlight} tensors in flight to this stage`);
        return;
      }
      counted = true;
      stats.inFlight[direction]++;
      stats.maxInFlightSeen[direction] = Math.max(stats.maxInFlightSeen[direction], stats.inFlight[direction]);
      call.on('cancelled', () => { finished = true; release(); });
      const asm = new ChunkAssembler({ jobId: opts.jobId, what: `pipeline ${direction}`, minStep, maxNumel, alloc: opts.allocTensor });
      let tensor: HostTensor | undefined;
      call.on('data', (c: TensorChunk) => {
        if (finished) return;
        try {
          tensor = asm.push(c) ?? tensor;
        } catch (e) {
          if (e instanceof ChunkError) fail(statusFor(e.reason), e.message);
          else if (e instanceof WireError) fail(grpc.status.INVALID_ARGUMENT, e.message);
          else fail(grpc.status.INTERNAL, `pipeline ${direction}: ${(e as Error).message}`);
        }
      });
      call.on('error', (e) => { finished = true; release(); log.debug({ err: e }, 'pipeline stream error'); });
      call.on('end', () => {
        if (finished) return;
        let t: HostTensor;
        try {
          t = asm.finish();
        } catch (e) {
          fail(e instanceof ChunkError ? statusFor(e.reason) : grpc.status.INTERNAL, (e as Error).message);
          return;
        }
        const { step, microBatch } = asm.ids!;
        if (step < minStep) return fail(grpc.status.FAILED_PRECONDITION, `pipeline ${direction} step ${step} micro-batch ${microBatch}: stale step, this stage is at step ${minStep}`);
        const key = `${direction}:${step}:${microBatch}`;
        if (delivered.has(key)) return fail(grpc.status.ALREADY_EXISTS, `pipeline ${direction} step ${step} micro-batch ${microBatch}: already delivered (a duplicate send or a retry after a lost ack)`);
        delivered.add(key);
        stats.tensorsReceived++;
        // (the handler may move the tensor's memory to another thread: its size is taken first)
        const nbytes = t.data.byteLength;
        stats.bytesReceived += nbytes;
        opts.receivedBytes?.inc({ transport: 'grpc' }, nbytes);
        const handler = direction === 'forward' ? opts.onForward : opts.onBackward;
        Promise.resolve()
          .then(() => handler(step, microBatch, t))
          .then(() => {
            finished = true;
            release();
            callback(null, { jobId: opts.jobId, step, microBatch, bytesReceived: nbytes });
          }, (e: unknown) => {
            delivered.delete(key); // not accepted: a resend may succeed once the stage is ready
            fail(e instanceof DqloraError ? grpc.status.FAILED_PRECONDITION : grpc.status.INTERNAL,
              `pipeline ${direction} step ${step} micro-batch ${microBatch}: the stage refused the tensor: ${(e as Error).message}`);
          });
      });
    };
  }

  // Decoding failures of a chunk message become WireErrors with a readable text (grpc-js answers INTERNAL).
  const service = {
    forward: { ...PipelineService.forward, requestDeserialize: (b: Buffer) => decodeChunkFast(b) },
    backward: { ...PipelineService.backward, requestDeserialize: (b: Buffer) => decodeChunkFast(b) },
  };
  const server = new grpc.Server({
    ...opts.serverOptions,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': 64 * 1024,
    'grpc-node.max_session_memory': sessionMemoryMb(window, 2 * maxInFlight),
  });
  const onSession = tuneServerHttp2(server, window);
  server.addService(service as unknown as grpc.ServiceDefinition, { forward: handle('forward'), backward: handle('backward') });
  const host = opts.host ?? '127.0.0.1';
  const listener = opts.listen ? await opts.listen(server, `${host}:${opts.port ?? 0}`, opts.credentials ?? grpc.ServerCredentials.createInsecure()) : undefined;
  const port = listener?.port ?? await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${host}:${opts.port ?? 0}`, opts.credentials ?? grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(new DqloraError(`pipeline server: cannot listen on ${host}:${opts.port ?? 0}: ${err.message}`, { cause: err })) : resolve(p)));
  });
  onSession();
  return {
    port,
    address: `${host}:${port}`,
    stats,
    setMinStep(step: number) {
      minStep = Math.max(minStep, step);
      for (const k of delivered) if (Number(k.split(':')[1]) < minStep) delivered.delete(k);
    },
    close: () => new Promise<void>((resolve) => {
      listener?.close();
      // Give in-flight calls a moment, then cut them: a stage shutting down must not hang on a peer.
      const t = setTimeout(() => { server.forceShutdown(); resolve(); }, 2000);
      server.tryShutdown(() => { clearTimeout(t); resolve(); });
    }),
  };
}

/**
 * grpc-js (1.14, pinned) offers no server option for the HTTP/2 receive windows, so they are set
 * on its private `commonServerOptions` (read when it binds) and, for the connection window, on each new session.
 * If a grpc-js update moves those internals, the server still works, at the default 64 KiB windows, and says so.
 * Returns the step to run after bindAsync.
 */
function tuneServerHttp2(server: grpc.Server, window: number): () => void {
  const internals = server as unknown as {
    commonServerOptions?: { settings?: Record<string, number> };
    http2Servers?: Map<{ on(ev: 'session', f: (s: { setLocalWindowSize(n: number): void }) => void): void }, unknown>;
  };
  const warn = (): void => log.warn('pipeline server: grpc-js internals changed, HTTP/2 windows stay at 64 KiB (transfers will be slower)');
  if (!internals.commonServerOptions) { warn(); return () => {}; }
  internals.commonServerOptions.settings = { ...internals.commonServerOptions.settings, initialWindowSize: window };
  return () => {
    if (!(internals.http2Servers instanceof Map)) { warn(); return; }
    for (const h of internals.http2Servers.keys()) {
      h.on('session', (session) => {
        try { session.setLocalWindowSize(window); } catch (e) { log.debug({ err: e }, 'pipeline server: setLocalWindowSize failed'); }
      });
    }
  };
}

/** A failed pipeline send; `code` is the gRPC status, `retryable` per PIPELINE_RETRYABLE. */
export class PipelineSendError extends WireError {
  readonly code: grpc.status;
  readonly retryable: boolean;
  constructor(message: string, code: grpc.status, opts: { hint?: string; cause?: unknown } = {}) {
    super(message, opts);
    this.code = code;
    this.retryable = PIPELINE_RETRYABLE.has(code);
  }
}

export interface PipelineClientOptions {
  jobId: string;
  jobToken: string;
  /** Chunk limit per gRPC message (must not exceed the receiver's maxMessageBytes). Default 1 MiB. */
  chunkBytes?: number;
  /** Per-call deadline. Default 30 s. */
  deadlineMs?: number;
  credentials?: grpc.ChannelCredentials;
  sentBytes?: ByteCounter;
  /** Tensors on the wire at once per direction; further sends wait their turn (in call order). Must not exceed the receiver's. Default PIPELINE_SEND_IN_FLIGHT. */
  maxInFlight?: number;
  /** HTTP/2 receive window (bytes; acks are tiny, this mainly sizes the session). Default PIPELINE_FLOW_CONTROL_WINDOW. */
  flowControlWindow?: number;
}

export interface SendOptions {
  /** 'bf16' halves the bytes of activations on the wire (rounded to nearest even). Default 'f32'. */
  dtype?: 'f32' | 'bf16';
  deadlineMs?: number;
  /** sendTensor only: crc32 of the tensor's data bytes when the caller already has it (computed off this thread). */
  crc32?: number;
}

/** Sends tensors to one peer stage's Pipeline server (one HTTP/2 connection, one stream per tensor). */
export class PipelineClient {
  readonly address: string;
  readonly stats = { tensorsSent: 0, bytesSent: 0, maxInFlightSeen: { forward: 0, backward: 0 } as Record<Direction, number> };
  private readonly opts: PipelineClientOptions;
  private readonly client: GrpcPipelineClient;
  private readonly maxInFlight: number;
  private readonly active: Record<Direction, number> = { forward: 0, backward: 0 };
  private readonly queued: Record<Direction, (() => void)[]> = { forward: [], backward: [] };
  private readonly pending = new Set<Promise<unknown>>();

  constructor(address: string, opts: PipelineClientOptions) {
    this.address = address;
    this.opts = opts;
    this.maxInFlight = opts.maxInFlight ?? PIPELINE_SEND_IN_FLIGHT;
    const window = opts.flowControlWindow ?? PIPELINE_FLOW_CONTROL_WINDOW;
    if (!Number.isInteger(this.maxInFlight) || this.maxInFlight < 1) throw new DqloraError(`pipeline client: maxInFlight ${this.maxInFlight} must be a positive integer`);
    const service = {
      forward: { ...PipelineService.forward, requestSerialize: encodeChunkFast },
      backward: { ...PipelineService.backward, requestSerialize: encodeChunkFast },
    };
    const Ctor = grpc.makeGenericClientConstructor(service as unknown as grpc.ServiceDefinition, 'dqlora.v1.Pipeline') as unknown as typeof GrpcPipelineClient;
    this.client = new Ctor(address, opts.credentials ?? grpc.credentials.createInsecure(), {
      'grpc.max_send_message_length': opts.chunkBytes ?? DEFAULT_CHUNK_BYTES,
      'grpc-node.flow_control_window': window,
      'grpc-node.max_session_memory': sessionMemoryMb(window, this.maxInFlight),
    });
  }

  /** Tensors of `direction` now on the wire (sent or being sent, not yet acknowledged). */
  inFlight(direction: Direction): number {
    return this.active[direction];
  }

  /** Resolves once every send started so far has been acknowledged or has failed (never rejects). */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  private async acquire(direction: Direction): Promise<void> {
    if (this.active[direction] < this.maxInFlight && this.queued[direction].length === 0) {
      this.active[direction]++;
    } else {
      // The releasing send hands its slot over directly, so the count never drops below the queue's needs.
      await new Promise<void>((resolve) => this.queued[direction].push(resolve));
    }
    this.stats.maxInFlightSeen[direction] = Math.max(this.stats.maxInFlightSeen[direction], this.active[direction]);
  }

  private release(direction: Direction): void {
    const next = this.queued[direction].shift();
    if (next) next();
    else this.active[direction]--;
  }

  /** Activations [shape] of `microBatch` at `step` to the next stage. */
  sendForward(step: number, microBatch: number, data: Float32Array, shape: readonly number[], o: SendOptions = {}): Promise<ChunkAck> {
    return this.sendTensor('forward', step, microBatch, o.dtype === 'bf16' ? f32ToBf16Tensor(data, shape) : f32ToTensor(data, shape), o);
  }

  /** Gradients w.r.t. the previous stage's activations [shape] back to it. */
  sendBackward(step: number, microBatch: number, data: Float32Array, shape: readonly number[], o: SendOptions = {}): Promise<ChunkAck> {
    return this.sendTensor('backward', step, microBatch, o.dtype === 'bf16' ? f32ToBf16Tensor(data, shape) : f32ToTensor(data, shape), o);
  }

  sendTensor(direction: Direction, step: number, microBatch: number, tensor: Tensor, o: SendOptions = {}): Promise<ChunkAck> {
    const chunks = chunkTensor({ jobId: this.opts.jobId, step, microBatch }, tensor, this.opts.chunkBytes ?? DEFAULT_CHUNK_BYTES, o.crc32);
    return this.sendChunks(direction, chunks, o);
  }

  /**
   * Sends prepared chunks as one stream, as is — the building block of sendTensor, and of fault-injection tests.
   * Starts at once when fewer than maxInFlight tensors of this direction are on the wire, else after the ones
   * before it; the caller may go on (e.g. compute) without awaiting the ack. The chunks' data must not change
   * until the promise settles.
   */
  sendChunks(direction: Direction, chunks: TensorChunk[], o: SendOptions = {}): Promise<ChunkAck> {
    const p = (async () => {
      await this.acquire(direction);
      try {
        return await this.sendStream(direction, chunks, o);
      } finally {
        this.release(direction);
      }
    })();
    this.pending.add(p);
    const forget = (): void => { this.pending.delete(p); };
    p.then(forget, forget);
    return p;
  }

  private async sendStream(direction: Direction, chunks: TensorChunk[], o: SendOptions): Promise<ChunkAck> {
    const first = chunks[0];
    const what = `pipeline ${direction} step ${first?.step} micro-batch ${first?.microBatch} to ${this.address}`;
    const md = new grpc.Metadata();
    md.set(JOB_TOKEN_METADATA, this.opts.jobToken);
    const deadline = Date.now() + (o.deadlineMs ?? this.opts.deadlineMs ?? 30_000);
    let settle!: { resolve: (a: ChunkAck) => void; reject: (e: Error) => void };
    const done = new Promise<ChunkAck>((resolve, reject) => { settle = { resolve, reject }; });
    done.catch(() => { /* awaited below, after the writes (which yield to the event loop between chunks) */ });
    let ended = false;
    const cb = (err: grpc.ServiceError | null, ack?: ChunkAck): void => {
      ended = true;
      if (err) settle.reject(toSendError(what, err));
      else settle.resolve(ack!);
    };
    const call = direction === 'forward' ? this.client.forward(md, { deadline }, cb) : this.client.backward(md, { deadline }, cb);
    call.on('error', () => { /* reported through the callback */ });
    let bytes = 0;
    for (let k = 0; k < chunks.length; k++) {
      if (ended) break; // the receiver already answered (a rejection): stop sending
      const c = chunks[k];
      bytes += c.tensor?.data.byteLength ?? 0;
      if (!call.write(c)) {
        // Back-pressure: wait for the HTTP/2 window, or for the call to end (rejected or past its deadline).
        await Promise.race([new Promise<void>((r) => call.once('drain', () => r())), done.then(() => undefined, () => undefined)]);
      } else if (k + 1 < chunks.length) {
        // One chunk per event-loop turn: writing a whole tensor at once (grpc-js buffers 16 messages before it
        // pushes back) encodes and frames 16 MiB in one task, which holds timers and received tensors for ms.
        await new Promise<void>((r) => setImmediate(r));
      }
    }
    if (!ended) call.end();
    const ack = await done;
    this.stats.tensorsSent++;
    this.stats.bytesSent += bytes;
    this.opts.sentBytes?.inc({ transport: 'grpc' }, bytes);
    return ack;
  }

  close(): void {
    this.client.close();
  }
}

function toSendError(what: string, err: grpc.ServiceError): PipelineSendError {
  const code = err.code ?? grpc.status.UNKNOWN;
  const hints: Partial<Record<grpc.status, string>> = {
    [grpc.status.UNAUTHENTICATED]: 'the job token differs between this worker and the receiving stage: both must come from the same coordinator job',
    [grpc.status.RESOURCE_EXHAUSTED]: 'the sender\'s chunk limit exceeds the receiver\'s message limit (or the tensor its size bound): use the same pipeline chunk size on both',
    [grpc.status.UNAVAILABLE]: 'the receiving stage is not listening (yet): check that its worker is running and reachable',
    [grpc.status.DEADLINE_EXCEEDED]: 'the receiving stage did not accept the tensor in time: it may be stalled',
  };
  return new PipelineSendError(`${what} failed: ${grpc.status[code] ?? code}: ${err.details || err.message}`, code, { hint: hints[code], cause: err });
}
