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
// PIPELINE_RETRYABLE below is that list in code, for the one retry loop (in the coordinator/worker).
import crypto from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { DqloraError, WireError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import {
  ChunkAssembler, ChunkError, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_NUMEL, chunkTensor, decodeChunk, f32ToBf16Tensor, f32ToTensor,
  type ChunkErrorReason, type HostTensor, type TensorChunk,
} from '../../wire/tensor.ts';
import { PipelineService, PipelineClient as GrpcPipelineClient, type ChunkAck } from '../../proto/gen/dqlora/v1/pipeline.ts';
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
}

export interface PipelineServerHandle {
  /** The bound port. */
  port: number;
  address: string;
  /** Steps below `step` are stale from now on (call when the stage starts a step). */
  setMinStep(step: number): void;
  readonly stats: { tensorsReceived: number; bytesReceived: number; rejected: number };
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
  const stats = { tensorsReceived: 0, bytesReceived: 0, rejected: 0 };

  function handle(direction: Direction) {
    return (call: grpc.ServerReadableStream<TensorChunk, ChunkAck>, callback: grpc.sendUnaryData<ChunkAck>): void => {
      let finished = false;
      const fail = (code: grpc.status, message: string): void => {
        if (finished) return;
        finished = true;
        stats.rejected++;
        log.warn({ direction, code: grpc.status[code], peer: call.getPeer() }, message);
        callback({ code, details: message });
      };
      if (!tokenMatches(call.metadata.get(JOB_TOKEN_METADATA)[0], opts.jobToken)) {
        fail(grpc.status.UNAUTHENTICATED, `pipeline ${direction}: missing or wrong job token for job "${opts.jobId}" (metadata "${JOB_TOKEN_METADATA}")`);
        return;
      }
      const asm = new ChunkAssembler({ jobId: opts.jobId, what: `pipeline ${direction}`, minStep, maxNumel });
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
      call.on('error', (e) => { finished = true; log.debug({ err: e }, 'pipeline stream error'); });
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
        stats.bytesReceived += t.data.byteLength;
        opts.receivedBytes?.inc({ transport: 'grpc' }, t.data.byteLength);
        const handler = direction === 'forward' ? opts.onForward : opts.onBackward;
        Promise.resolve()
          .then(() => handler(step, microBatch, t))
          .then(() => {
            finished = true;
            callback(null, { jobId: opts.jobId, step, microBatch, bytesReceived: t.data.byteLength });
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
    forward: { ...PipelineService.forward, requestDeserialize: (b: Buffer) => decodeChunk(b) },
    backward: { ...PipelineService.backward, requestDeserialize: (b: Buffer) => decodeChunk(b) },
  };
  const server = new grpc.Server({
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': 64 * 1024,
  });
  server.addService(service as unknown as grpc.ServiceDefinition, { forward: handle('forward'), backward: handle('backward') });
  const host = opts.host ?? '127.0.0.1';
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${host}:${opts.port ?? 0}`, opts.credentials ?? grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(new DqloraError(`pipeline server: cannot listen on ${host}:${opts.port ?? 0}: ${err.message}`, { cause: err })) : resolve(p)));
  });
  return {
    port,
    address: `${host}:${port}`,
    stats,
    setMinStep(step: number) {
      minStep = Math.max(minStep, step);
      for (const k of delivered) if (Number(k.split(':')[1]) < minStep) delivered.delete(k);
    },
    close: () => new Promise<void>((resolve) => {
      // Give in-flight calls a moment, then cut them: a stage shutting down must not hang on a peer.
      const t = setTimeout(() => { server.forceShutdown(); resolve(); }, 2000);
      server.tryShutdown(() => { clearTimeout(t); resolve(); });
    }),
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
}

export interface SendOptions {
  /** 'bf16' halves the bytes of activations on the wire (rounded to nearest even). Default 'f32'. */
  dtype?: 'f32' | 'bf16';
  deadlineMs?: number;
}

/** Sends tensors to one peer stage's Pipeline server (one HTTP/2 connection, one stream per tensor). */
export class PipelineClient {
  readonly address: string;
  readonly stats = { tensorsSent: 0, bytesSent: 0 };
  private readonly opts: PipelineClientOptions;
  private readonly client: GrpcPipelineClient;

  constructor(address: string, opts: PipelineClientOptions) {
    this.address = address;
    this.opts = opts;
    this.client = new GrpcPipelineClient(address, opts.credentials ?? grpc.credentials.createInsecure(), {
      'grpc.max_send_message_length': opts.chunkBytes ?? DEFAULT_CHUNK_BYTES,
    });
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
    const chunks = chunkTensor({ jobId: this.opts.jobId, step, microBatch }, tensor, this.opts.chunkBytes ?? DEFAULT_CHUNK_BYTES);
    return this.sendChunks(direction, chunks, o);
  }

  /** Sends prepared chunks as one stream, as is — the building block of sendTensor, and of fault-injection tests. */
  async sendChunks(direction: Direction, chunks: TensorChunk[], o: SendOptions = {}): Promise<ChunkAck> {
    const first = chunks[0];
    const what = `pipeline ${direction} step ${first?.step} micro-batch ${first?.microBatch} to ${this.address}`;
    const md = new grpc.Metadata();
    md.set(JOB_TOKEN_METADATA, this.opts.jobToken);
    const deadline = Date.now() + (o.deadlineMs ?? this.opts.deadlineMs ?? 30_000);
    let settle!: { resolve: (a: ChunkAck) => void; reject: (e: Error) => void };
    const done = new Promise<ChunkAck>((resolve, reject) => { settle = { resolve, reject }; });
    let ended = false;
    const cb = (err: grpc.ServiceError | null, ack?: ChunkAck): void => {
      ended = true;
      if (err) settle.reject(toSendError(what, err));
      else settle.resolve(ack!);
    };
    const call = direction === 'forward' ? this.client.forward(md, { deadline }, cb) : this.client.backward(md, { deadline }, cb);
    call.on('error', () => { /* reported through the callback */ });
    let bytes = 0;
    for (const c of chunks) {
      if (ended) break; // the receiver already answered (a rejection): stop sending
      bytes += c.tensor?.data.byteLength ?? 0;
      if (!call.write(c)) {
        // Back-pressure: wait for the HTTP/2 window, or for the call to end (rejected or past its deadline).
        await Promise.race([new Promise<void>((r) => call.once('drain', () => r())), done.then(() => undefined, () => undefined)]);
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
