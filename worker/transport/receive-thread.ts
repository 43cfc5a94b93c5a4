// The worker's receive thread: the stage's Pipeline server (worker/transport/pipeline.ts startPipelineServer, unchanged)
// runs here, so the HTTP/2 frames of incoming tensors are parsed, checked (job token, ids, checksum) and reassembled
// off the worker's main thread. A complete tensor moves to the main thread (transfer, no copy), which puts it in the
// stage's inbox; the sender's ack waits for the main thread's answer, so a tensor the stage refuses is refused on the
// wire as before (FAILED_PRECONDITION), and back-pressure is what it was.
//
// What stays on the main thread: the job id and minimum step (set here by message when a stage is assigned or a step
// starts), the refusal log and its metric (refusals are reported here, counted and logged there), the received-bytes
// metric. TLS credentials, the connection guard and the server options are built in this thread from the same
// environment (common/tls.ts, common/grpc-guard.ts).
import { parentPort, type MessagePort, type Worker } from 'node:worker_threads';
import { BufferPool, wholeArrayBuffer } from '../../common/buffer-pool.ts';
import { serverCredentials } from '../../common/tls.ts';
import { DqloraError } from '../../common/errors.ts';
import { SERVER_HYGIENE, listenGuarded, type RejectionLog } from '../../common/grpc-guard.ts';
import { logger } from '../../common/log.ts';
import type { HostTensor } from '../../wire/tensor.ts';
import { startPipelineServer, type Direction, type PipelineServerHandle } from './pipeline.ts';
import { transportThread } from './send-thread.ts';

const log = logger('pipeline');

type RejectReason = Parameters<RejectionLog['record']>[0];

export interface PipelineReceiverOptions {
  host: string;
  /** 0 = an OS-assigned port. */
  port: number;
  jobId: string;
  jobToken: string;
  /** Largest gRPC message accepted (senders chunk under it). */
  maxMessageBytes?: number;
  /** Where refusals are counted and logged (connection limit, wrong token, malformed or stale tensors). */
  rejections?: Pick<RejectionLog, 'record'>;
  receivedBytes?: { inc(labels: { transport: 'grpc' }, n: number): void };
  /** Arrays of delivered tensors come back on this port when the stage is done with them (reused for the next ones). */
  recycle?: MessagePort;
  /** A complete, validated tensor (its memory moved here); a rejection refuses it on the wire. */
  onTensor(direction: Direction, step: number, microBatch: number, tensor: HostTensor): void | Promise<void>;
}

type ToThread =
  | { op: 'start'; o: Omit<PipelineReceiverOptions, 'rejections' | 'receivedBytes' | 'onTensor' | 'recycle'>; recycle?: MessagePort }
  | { op: 'jobId'; jobId: string }
  | { op: 'minStep'; step: number }
  | { op: 'answer'; id: number; error?: { message: string; refused: boolean } }
  | { op: 'close' };
type FromThread =
  | { op: 'listening'; port: number }
  | { op: 'failed'; message: string }
  | { op: 'tensor'; id: number; direction: Direction; step: number; microBatch: number; tensor: HostTensor }
  | { op: 'reject'; reason: RejectReason; peer: string; message: string }
  | { op: 'closed' };

/** The main thread's handle on the receive thread (the shape of PipelineServerHandle the worker uses). */
export class PipelineReceiver {
  private dead?: Error;
  private onClosed?: () => void;

  private constructor(private readonly worker: Worker, readonly port: number, readonly address: string) {}

  /** Starts the thread and its Pipeline server; resolves once it listens (a bind error rejects, naming the address). */
  static start(o: PipelineReceiverOptions): Promise<PipelineReceiver> {
    const worker = transportThread('receive');
    return new Promise((resolve, reject) => {
      let r: PipelineReceiver | undefined;
      const fail = (e: Error): void => {
        if (!r) { reject(e); return; }
        // After close() the thread's exit is expected; before it, no tensor can arrive any more: the next step times
        // out on it and the coordinator recovers (re-assigns), so say why here.
        if (!r.dead) log.error({ err: e.message }, 'the pipeline receive thread stopped: this worker can no longer receive tensors');
        r.dead ??= e;
        r.onClosed?.();
      };
      worker.on('message', (m: FromThread) => {
        if (m.op === 'listening') {
          r = new PipelineReceiver(worker, m.port, `${o.host}:${m.port}`);
          resolve(r);
        } else if (m.op === 'failed') {
          fail(new DqloraError(m.message));
          void worker.terminate();
        } else if (m.op === 'reject') {
          o.rejections?.record(m.reason, m.peer, m.message);
        } else if (m.op === 'tensor') {
          o.receivedBytes?.inc({ transport: 'grpc' }, m.tensor.data.byteLength);
          Promise.resolve()
            .then(() => o.onTensor(m.direction, m.step, m.microBatch, m.tensor))
            .then(() => worker.postMessage({ op: 'answer', id: m.id } satisfies ToThread),
              (e: unknown) => worker.postMessage({ op: 'answer', id: m.id, error: { message: (e as Error).message, refused: e instanceof DqloraError } } satisfies ToThread));
        } else if (m.op === 'closed') {
          r?.onClosed?.();
        }
      });
      worker.on('error', (e) => fail(new DqloraError(`the worker's receive thread failed: ${e.message}`)));
      worker.on('exit', (code) => fail(new DqloraError(`the worker's receive thread exited (code ${code})`)));
      const { rejections: _r, receivedBytes: _b, onTensor: _t, recycle, ...plain } = o;
      worker.postMessage({ op: 'start', o: plain, recycle } satisfies ToThread, recycle ? [recycle] : []);
    });
  }

  /** Tensors of another job are refused from now on (the server checks every chunk's job id). */
  setJobId(jobId: string): void {
    if (!this.dead) this.worker.postMessage({ op: 'jobId', jobId } satisfies ToThread);
  }

  /** Steps below `step` are stale from now on (call when the stage starts a step). */
  setMinStep(step: number): void {
    if (!this.dead) this.worker.postMessage({ op: 'minStep', step } satisfies ToThread);
  }

  /** Stops the server (in-flight calls get 2 s, then are cut) and the thread. */
  async close(): Promise<void> {
    if (!this.dead) {
      await new Promise<void>((res) => {
        this.onClosed = res;
        this.worker.postMessage({ op: 'close' } satisfies ToThread);
        setTimeout(res, 5000).unref();
      });
    }
    this.dead ??= new DqloraError('the receive thread was closed');
    await this.worker.terminate();
  }
}

/** Runs the receive thread (called from thread.mjs / thread-main.ts). */
export function serveReceiver(): void {
  const port = parentPort;
  if (!port) throw new DqloraError('worker/transport/receive-thread.ts must run in a worker thread');
  const post = (m: FromThread, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);
  const answers = new Map<number, { resolve(): void; reject(e: Error): void }>();
  let next = 1;
  let server: PipelineServerHandle | undefined;
  let opts: { jobId: string } | undefined;
  const pool = new BufferPool(8, 512 << 20);
  const rejections = { record: (reason: RejectReason, peer: string, message: string): void => post({ op: 'reject', reason, peer, message }) };
  const deliver = (direction: Direction) => (step: number, microBatch: number, tensor: HostTensor): Promise<void> => {
    const id = next++;
    const b = wholeArrayBuffer(tensor.data);
    return new Promise<void>((resolve, reject) => {
      answers.set(id, { resolve, reject });
      post({ op: 'tensor', id, direction, step, microBatch, tensor }, b ? [b] : []);
    });
  };
  port.on('message', (m: ToThread) => {
    if (m.op === 'start') {
      m.recycle?.on('message', (b: ArrayBuffer) => pool.give(b));
      m.recycle?.unref();
      const popts = {
        ...m.o, credentials: serverCredentials(), serverOptions: SERVER_HYGIENE,
        listen: (s: Parameters<typeof listenGuarded>[0], address: string, creds: Parameters<typeof listenGuarded>[2]) => listenGuarded(s, address, creds, { service: 'pipeline', rejections }),
        onReject: (unauthenticated: boolean, peer: string, message: string) => rejections.record(unauthenticated ? 'unauthenticated' : 'invalid', peer, message),
        onForward: deliver('forward'),
        onBackward: deliver('backward'),
        allocTensor: (bytes: number) => new Uint8Array(pool.take(bytes)),
      };
      // The server reads `jobId` from this object on every call: assigning it re-targets the server.
      opts = popts;
      startPipelineServer(popts).then((s) => { server = s; post({ op: 'listening', port: s.port }); }, (e: unknown) => post({ op: 'failed', message: (e as Error).message }));
    } else if (m.op === 'jobId') {
      if (opts) opts.jobId = m.jobId;
    } else if (m.op === 'minStep') {
      server?.setMinStep(m.step);
    } else if (m.op === 'answer') {
      const a = answers.get(m.id);
      answers.delete(m.id);
      if (!a) return;
      if (!m.error) a.resolve();
      // The server answers FAILED_PRECONDITION for the stage's own refusals (DqloraError), INTERNAL otherwise.
      else a.reject(m.error.refused ? new DqloraError(m.error.message) : new Error(m.error.message));
    } else if (m.op === 'close') {
      for (const a of answers.values()) a.reject(new DqloraError('the stage is shutting down'));
      answers.clear();
      (server ? server.close() : Promise.resolve()).then(() => post({ op: 'closed' }), (e: unknown) => { log.debug({ err: e }, 'pipeline server close failed'); post({ op: 'closed' }); });
    }
  });
}
