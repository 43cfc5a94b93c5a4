// The main thread's handle on the compute thread (compute.ts): one promise per request, replies matched by id,
// typed arrays moved (transferred), never copied, between the threads. Gradient buckets that become final during a
// step's last backward arrive through `onBucket` before that backward's reply.
import { Worker, type MessagePort } from 'node:worker_threads';
import type { BackendName } from '../../core/engine/index.ts';
import { wholeArrayBuffer } from '../../common/buffer-pool.ts';
import type { ComputeInfo, ComputeReply, ComputeRequest, GradBucket } from './compute.ts';
import { BackendError, CheckpointError, ConfigError, DqloraError, FormatError, ShapeError, UnsupportedError, WireError } from '../../common/errors.ts';

const ERRORS: Record<string, new (m: string) => Error> = { BackendError, CheckpointError, ConfigError, DqloraError, FormatError, ShapeError, UnsupportedError, WireError };

/** Buffers of the typed arrays in `v` (one level of object nesting) that may be moved to the other thread. */
function transferables(v: unknown, out: ArrayBuffer[] = [], depth = 0): ArrayBuffer[] {
  if (ArrayBuffer.isView(v)) {
    // A view into a larger buffer (a Node Buffer pool, a chunk assembly) cannot be moved without losing its siblings.
    const b = wholeArrayBuffer(v);
    if (b && !out.includes(b)) out.push(b);
  } else if (v && typeof v === 'object' && depth < 3) {
    for (const x of Object.values(v)) transferables(x, out, depth + 1);
  }
  return out;
}

export class ComputeThread {
  private readonly worker: Worker;
  private next = 1;
  private readonly pending = new Map<number, { resolve(v: { value: unknown; start: number; done: number }): void; reject(e: Error): void }>();
  private dead?: Error;
  /** Device memory in use after the last request (for heartbeats and metrics). */
  memoryInUse = 0;
  onBucket?: (b: GradBucket) => void;

  private constructor() {
    // DQLORA_COMPUTE_ENTRY: a bundled build's entry (compute-main.ts bundled), else the source tree's bootstrap.
    const entry = process.env.DQLORA_COMPUTE_ENTRY;
    this.worker = new Worker(entry ? entry : new URL('./compute-thread.mjs', import.meta.url));
    this.worker.on('message', (m: ComputeReply) => {
      if ('bucket' in m) { this.onBucket?.(m.bucket); return; }
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.ok) { this.memoryInUse = m.memoryInUse; p.resolve({ value: m.value, start: m.start, done: m.done }); } else p.reject(new (ERRORS[m.error.name] ?? DqloraError)(m.error.message));
    });
    const fail = (e: Error): void => {
      this.dead = new BackendError(`the stage's compute thread stopped: ${e.message}`);
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
  }

  /** Starts the thread and creates the backend there. */
  static async start(device: BackendName): Promise<{ thread: ComputeThread; info: ComputeInfo }> {
    const thread = new ComputeThread();
    const info = await thread.call({ op: 'init', device }) as ComputeInfo;
    return { thread, info };
  }

  async call(req: ComputeRequest): Promise<unknown> {
    return (await this.callTimed(req)).value;
  }

  /**
   * The result with the compute thread's clock: `start` when it began the request, `done` when its result was ready
   * (on cuda: the output's copy to the host finished), both performance.timeOrigin-based ms.
   */
  callTimed(req: ComputeRequest): Promise<{ value: unknown; start: number; done: number }> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, req }, transferables(req));
    });
  }

  /** Hands the thread the return paths of host arrays (ComputeRequest 'ports'). */
  async connect(fromSender: MessagePort, toReceiver: MessagePort): Promise<void> {
    if (this.dead) throw this.dead;
    const id = this.next++;
    await new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, req: { op: 'ports', fromSender, toReceiver } }, [fromSender, toReceiver]);
    });
  }

  async close(): Promise<void> {
    this.dead ??= new DqloraError('the compute thread was closed');
    await this.worker.terminate();
  }
}
