// The worker's send thread: the stage's outgoing pipeline tensors (activations to the next stage, gradients to the
// previous one) are encoded, framed and written to gRPC here, not on the worker's main thread.
//
// Why: in grpc-js every byte sent passes through JavaScript — our chunk encoder copies it into the message, grpc-js
// frames it, Node's http2 writes it — about as much CPU per byte as receiving (bench/transport.ts). On the main
// thread that work competes with receiving the other direction's tensors, the schedule and the control stream, and
// it is what held the worker's event loop for milliseconds at a time. Here the two directions of a stage run on two
// threads: the main thread receives (the Pipeline server), this one sends.
//
// The main thread's handle (PipelineSender) moves each tensor's memory to this thread (transfer, no copy) and gets
// the receiver's acknowledgement back; errors come back as PipelineSendError with the gRPC status and the hint the
// in-thread client gives. Clients live here, one per peer (worker/transport/pipeline.ts PipelineClient, unchanged).
import { Worker, parentPort, type MessagePort } from 'node:worker_threads';
import { channelCredentials } from '../../common/tls.ts';
import { DqloraError } from '../../common/errors.ts';
import { wholeArrayBuffer } from '../../common/buffer-pool.ts';
import { bf16ToTensor, f32ToBf16Tensor, f32ToTensor } from '../../wire/tensor.ts';
import type { ChunkAck } from '../../proto/gen/dqlora/v1/pipeline.ts';
import { PipelineClient, PipelineSendError, type Direction, type PipelineClientOptions } from './pipeline.ts';

/** Which neighbour a client talks to. */
export type Peer = 'prev' | 'next';

/** A peer's client settings (credentials come from the environment in the thread: common/tls.ts). */
export type SenderPeerOptions = Omit<PipelineClientOptions, 'credentials' | 'sentBytes'>;

/**
 * How the tensor's elements go on the wire: raw bf16 bits as they are, float32 as it is, or float32 rounded to bf16
 * (round to nearest even) in the send thread.
 */
export type WireForm = 'bf16' | 'f32' | 'f32-as-bf16';

type Request =
  | { id: number; op: 'open'; peer: Peer; address: string; opts: SenderPeerOptions }
  | { id: number; op: 'send'; peer: Peer; dir: Direction; step: number; microBatch: number; data: Uint16Array | Float32Array; shape: number[]; form: WireForm; crc32?: number }
  | { id: number; op: 'close'; peer?: Peer }
  | { id: number; op: 'recycle'; port: MessagePort };
type Reply =
  | { id: number; ok: true; ack?: ChunkAck; bytes?: number }
  | { id: number; ok: false; error: { name: string; message: string; code?: number; hint?: string } };

/** The main thread's handle on the send thread. */
export class PipelineSender {
  private readonly worker: Worker;
  private next = 1;
  private readonly pending = new Map<number, { resolve(r: Reply & { ok: true }): void; reject(e: Error): void }>();
  private dead?: Error;
  /** Payload bytes acknowledged per peer (what the pipeline clients count). */
  readonly bytesSent: Record<Peer, number> = { prev: 0, next: 0 };

  /** `sentBytes`: the worker's byte counter (metrics), counted as the receiver acknowledges. */
  constructor(private readonly sentBytes?: { inc(labels: { transport: 'grpc' }, n: number): void }) {
    this.worker = transportThread('send');
    this.worker.unref();
    this.worker.on('message', (m: Reply) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.ok) p.resolve(m);
      else p.reject(m.error.code !== undefined
        ? new PipelineSendError(m.error.message, m.error.code, { hint: m.error.hint })
        : new DqloraError(m.error.message, { hint: m.error.hint }));
    });
    const fail = (e: Error): void => {
      this.dead = new DqloraError(`the worker's send thread stopped: ${e.message}`);
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
  }

  private call(req: Request, transfer: (ArrayBuffer | MessagePort)[] = []): Promise<Reply & { ok: true }> {
    if (this.dead) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      this.pending.set(req.id, { resolve, reject });
      this.worker.postMessage(req, transfer);
    });
  }

  /** From now on, the array of every tensor sent goes back on `port` once the receiver has acknowledged it (or refused it). */
  async recycleTo(port: MessagePort): Promise<void> {
    await this.call({ id: this.next++, op: 'recycle', port }, [port]);
  }

  /** (Re)creates the client for `peer` (closing the previous one: its sends in flight fail). */
  async open(peer: Peer, address: string, opts: SenderPeerOptions): Promise<void> {
    await this.call({ id: this.next++, op: 'open', peer, address, opts });
  }

  /**
   * Sends one tensor; resolves with the receiver's ack. The array's memory moves to the send thread when it owns its
   * whole buffer (it is detached here then: do not use it after the call), else it is copied.
   */
  async send(peer: Peer, dir: Direction, step: number, microBatch: number, data: Uint16Array | Float32Array, shape: readonly number[], form: WireForm, crc32?: number): Promise<ChunkAck> {
    const b = wholeArrayBuffer(data);
    const transfer = b ? [b] : [];
    const r = await this.call({ id: this.next++, op: 'send', peer, dir, step, microBatch, data, shape: [...shape], form, crc32 }, transfer);
    this.bytesSent[peer] += r.bytes ?? 0;
    this.sentBytes?.inc({ transport: 'grpc' }, r.bytes ?? 0);
    return r.ack!;
  }

  /** Closes one peer's client, or all of them (their sends in flight fail). */
  async closePeers(peer?: Peer): Promise<void> {
    if (this.dead) return;
    await this.call({ id: this.next++, op: 'close', peer }).catch(() => { /* a dead thread has nothing open */ });
  }

  /** Stops the thread (the worker is exiting). */
  async close(): Promise<void> {
    await this.closePeers();
    this.dead ??= new DqloraError('the send thread was closed');
    await this.worker.terminate();
  }
}

/**
 * Starts a transport thread. DQLORA_TRANSPORT_ENTRY: a bundled build's entry (thread-main.ts bundled), else the source
 * tree's bootstrap (thread.mjs).
 */
export function transportThread(role: 'send' | 'receive'): Worker {
  const entry = process.env.DQLORA_TRANSPORT_ENTRY;
  return new Worker(entry ? entry : new URL('./thread.mjs', import.meta.url), { workerData: { role } });
}

/** Runs the send thread's request loop (called from thread.mjs / thread-main.ts). */
export function serveSender(): void {
  const port = parentPort;
  if (!port) throw new DqloraError('worker/transport/send-thread.ts must run in a worker thread');
  const clients = new Map<Peer, PipelineClient>();
  let recycle: MessagePort | undefined;
  /** The sent array, back to its owner's pool once the send has settled (the bytes are no longer needed). */
  const giveBack = (a: ArrayBufferView): void => {
    const b = wholeArrayBuffer(a);
    if (recycle && b) recycle.postMessage(b, [b]);
  };
  const post = (m: Reply): void => port.postMessage(m);
  const fail = (id: number, e: unknown): void => {
    const err = e instanceof Error ? e : new Error(String(e));
    const code = e instanceof PipelineSendError ? e.code : undefined;
    const hint = (e as { hint?: string }).hint;
    // DqloraError puts the hint into its message; the main thread's error adds it again.
    const message = hint && err.message.endsWith(`\n  hint: ${hint}`) ? err.message.slice(0, -`\n  hint: ${hint}`.length) : err.message;
    post({ id, ok: false, error: { name: err.name, message, code, hint } });
  };
  port.on('message', (m: Request) => {
    try {
      if (m.op === 'recycle') {
        recycle = m.port;
        post({ id: m.id, ok: true });
      } else if (m.op === 'open') {
        clients.get(m.peer)?.close();
        clients.set(m.peer, new PipelineClient(m.address, { ...m.opts, credentials: channelCredentials() }));
        post({ id: m.id, ok: true });
      } else if (m.op === 'close') {
        for (const [peer, c] of clients) if (m.peer === undefined || m.peer === peer) { c.close(); clients.delete(peer); }
        post({ id: m.id, ok: true });
      } else {
        const c = clients.get(m.peer);
        if (!c) throw new DqloraError(`pipeline ${m.dir} step ${m.step} micro-batch ${m.microBatch}: no ${m.peer === 'next' ? 'next' : 'previous'} stage to send to (the stage was released)`);
        const tensor = m.form === 'bf16' ? bf16ToTensor(m.data as Uint16Array, m.shape)
          : m.form === 'f32' ? f32ToTensor(m.data as Float32Array, m.shape) : f32ToBf16Tensor(m.data as Float32Array, m.shape);
        // The checksum the compute thread took covers the bytes as they go out; a conversion here makes new bytes.
        const bytes = tensor.data.byteLength;
        c.sendTensor(m.dir, m.step, m.microBatch, tensor, { crc32: m.form === 'f32-as-bf16' ? undefined : m.crc32 })
          .then((ack) => post({ id: m.id, ok: true, ack, bytes }), (e) => fail(m.id, e))
          .finally(() => giveBack(m.data));
      }
    } catch (e) {
      fail(m.id, e);
    }
  });
}
