// The stage's compute, on its own thread (worker_threads): the backend, the loaded layers and the LoRA params live
// here, and every kernel runs here, so the worker's event loop — gRPC transfers to and from the neighbouring stages,
// the NATS all-reduce, heartbeats, the control stream — never waits on compute (a CPU forward takes hundreds of ms;
// a CUDA download blocks until the stream drains). The main thread (stage-compute.ts) sends one request at a time
// per operation; requests are executed strictly in arrival order, so the schedule the main thread issues is the
// order the device sees.
import { parentPort, type MessagePort } from 'node:worker_threads';
import { createBackend, type BackendName } from '../../core/engine/index.ts';
import type { AllocationTracker, Backend, Tensor } from '../../core/engine/backend.ts';
import type { LoraParams } from '../../core/engine/lora.ts';
import type { LlamaStage, StageBatch } from '../../core/model/llama.ts';
import { loadStage } from '../../core/model/loader.ts';
import { applyUpdate, gradNormSq, restoreLoraParams, type StepDropoutKey } from '../../core/train/step.ts';
import { stageLoadOptionsOf, type Assignment } from '../../wire/assignment.ts';
import { encodeStageState } from '../../wire/state.ts';
import { crc32 } from '../../wire/tensor.ts';
import { loadCheckpoint } from '../../common/checkpoint.ts';
import { DqloraError, ShapeError } from '../../common/errors.ts';
import { computeNice, niceThisThread } from '../../common/thread-priority.ts';
import { BufferPool, wholeArrayBuffer, wholeBuffer } from '../../common/buffer-pool.ts';

/**
 * Activations / gradients crossing between the threads, [rows, hidden]: float32, or raw bfloat16 bits (Uint16Array)
 * where the backend computes in bf16 — they go to the wire and back onto the device as they are, never converted.
 */
export interface HostActivation {
  readonly data: Float32Array | Uint16Array;
  readonly shape: [number, number];
  /** crc32 of data's bytes, computed on the compute thread (the wire checksum, off the event loop). */
  readonly crc32?: number;
}

/** A run of consecutive layers whose LoRA gradients are all-reduced together (last layers first). */
export interface GradBucket { readonly index: number; readonly data: Float32Array }

export type ComputeRequest =
  | { op: 'init'; device: BackendName }
  /** The return paths of host arrays (see `pool` below): sent arrays come back from the send thread on `fromSender`;
   *  received ones, once on the device, go back to the receive thread on `toReceiver`. */
  | { op: 'ports'; fromSender: MessagePort; toReceiver: MessagePort }
  | { op: 'assign'; a: Assignment }
  | { op: 'forward'; id: number; batch: StageBatch; hidden?: HostActivation; train: boolean; dropout?: StepDropoutKey; gradScale?: number }
  | { op: 'backward'; id: number; d?: HostActivation; bucketBytes?: number }
  | { op: 'setBucket'; bucket: GradBucket }
  | { op: 'gradNormSq' }
  | { op: 'bucketSizes'; bucketBytes: number }
  | { op: 'update'; step: number; lr: number; clipCoef: number }
  | { op: 'state'; includeMoments: boolean }
  | { op: 'reset' }
  | { op: 'release' };

export interface ComputeInfo { readonly name: 'cpu' | 'cuda'; readonly actDtype: string; readonly memoryInUse: number; readonly threads: number }

export type ComputeReply =
  | { ok: true; id: number; value: unknown; memoryInUse: number; start: number; done: number }
  | { ok: false; id: number; error: { name: string; message: string } }
  /** A gradient bucket became final during the last backward of a step (sent before that backward's reply). */
  | { bucket: GradBucket };

/** A request's result; `later`: the reply is posted when it resolves, without holding up the next request. */
interface Handled { value: unknown; transfer?: ArrayBuffer[]; later?: Promise<{ value: unknown; transfer?: ArrayBuffer[] }> }

const SYNC_DOWNLOAD = process.env.DQLORA_SYNC_DOWNLOAD === '1';

class StageCompute {
  private be?: Backend;
  private stage?: LlamaStage;
  private params: LoraParams[] = [];
  /** Bucket k's params (bucket 0 = the stage's last layers), fixed per assignment so every replica agrees. */
  private bucketParams: LoraParams[][] = [];
  private bucketBytes = 0;
  /** Records every allocation of the assigned stage, from its load to its release (release() frees them all). */
  private stageMemory?: AllocationTracker;
  /** Posts of the current backward's gradient buckets, not yet done (their downloads are in flight). */
  private pendingBuckets: Promise<void>[] = [];
  /** The layer (within the stage) whose backward completes bucket k. */
  private bucketEnds: number[] = [];
  /**
   * Host arrays of downloaded activations and gradient buckets, reused (common/buffer-pool.ts): a sent activation
   * comes back from the send thread after the receiver's ack, a bucket after its all-reduced values are written back.
   */
  private readonly pool = new BufferPool(32, 512 << 20);
  /** Gradient buckets, in shared memory (the all-reduce's threads work on them in place), reused the same way. */
  private readonly sharedPool = new BufferPool<SharedArrayBuffer>(32, 512 << 20, (n) => new SharedArrayBuffer(n));
  /** Where a received tensor's array goes once it is on the device (the receive thread's pool). */
  private toReceiver?: MessagePort;

  constructor(private readonly post: (m: ComputeReply, transfer?: ArrayBuffer[]) => void) {}

  private need(): { be: Backend; stage: LlamaStage } {
    if (!this.be || !this.stage) throw new DqloraError('this worker has no stage assigned yet');
    return { be: this.be, stage: this.stage };
  }

  async handle(r: ComputeRequest): Promise<Handled> {
    switch (r.op) {
      case 'init': {
        // Before the backend starts its kernel threads (they inherit it): the event loop on the main thread wins
        // the cores when it has work (common/thread-priority.ts).
        niceThisThread(computeNice());
        this.be = await createBackend(r.device);
        return { value: { name: this.be.name, actDtype: this.be.actDtype, memoryInUse: this.be.memoryInUse(), threads: (this.be as { threads?: number }).threads ?? 0 } satisfies ComputeInfo };
      }
      case 'assign': {
        this.release();
        const be = this.be!, a = r.a;
        this.stageMemory = be.trackAllocations();
        try {
          this.stage = loadStage(be, a.modelDir, a.spec, stageLoadOptionsOf(a));
          this.params = this.stage.loraParams();
          if (a.resumeFrom) restoreLoraParams(this.params, loadCheckpoint(a.resumeFrom));
        } catch (e) {
          this.release();
          throw e;
        }
        this.bucketParams = []; this.bucketBytes = 0;
        this.assignment = a;
        return { value: { params: this.params.length } };
      }
      case 'ports': {
        r.fromSender.on('message', (b: ArrayBuffer) => this.pool.give(b));
        r.fromSender.unref();
        this.toReceiver = r.toReceiver;
        return { value: null };
      }
      case 'forward': {
        const { be, stage } = this.need();
        const hidden = r.hidden ? this.uploaded(be.upload(r.hidden.data, r.hidden.shape, 'act'), r.hidden.data) : undefined;
        const out = stage.forward(r.id, r.batch, hidden, r.train ? { train: true, dropout: r.dropout, gradScale: r.gradScale } : { train: false });
        if (!out.hidden) return { value: { lossSum: out.lossSum, count: out.count } };
        // The reply waits for the copy; the next request (the next micro-batch's kernels) does not.
        const later = this.download(out.hidden).then((h) => ({ value: { hidden: h }, transfer: [h.data.buffer as ArrayBuffer] }));
        return { value: undefined, later };
      }
      case 'backward': {
        const { be, stage } = this.need();
        const d = r.d ? this.uploaded(be.upload(r.d.data, r.d.shape, 'act'), r.d.data) : undefined;
        const onLayer = r.bucketBytes ? this.bucketer(stage, r.bucketBytes) : undefined;
        let dx: Tensor | undefined;
        try {
          dx = stage.backward(r.id, d, onLayer);
        } catch (e) {
          // The buckets already started are posted before the error reply (as they would be before a result).
          await Promise.allSettled(this.pendingBuckets.splice(0));
          throw e;
        }
        const buckets = Promise.all(this.pendingBuckets.splice(0));
        if (!dx) return onLayer ? { value: undefined, later: buckets.then(() => ({ value: {} })) } : { value: {} };
        const later = Promise.all([this.download(dx), buckets]).then(([h]) => ({ value: { dx: h }, transfer: [h.data.buffer as ArrayBuffer] }));
        return { value: undefined, later };
      }
      case 'setBucket': {
        const { be } = this.need();
        let off = 0;
        for (const p of this.bucketParams[r.bucket.index]) for (const g of gradients(p)) { overwrite(be, g, r.bucket.data.subarray(off, off + g.size)); off += g.size; }
        if (off !== r.bucket.data.length) throw new ShapeError(`gradient bucket ${r.bucket.index}: ${r.bucket.data.length} values for ${off} gradients`);
        // The all-reduce is done with the bucket (its sends were copied out before it resolved): reuse it next step.
        const bb = wholeBuffer(r.bucket.data);
        if (bb instanceof SharedArrayBuffer) this.sharedPool.give(bb);
        else if (bb) this.pool.give(bb);
        return { value: null };
      }
      case 'gradNormSq': return { value: gradNormSq(this.need().be, this.params) };
      case 'bucketSizes': {
        this.ensureBuckets(this.need().stage, r.bucketBytes);
        return { value: this.bucketParams.map(gradientSize) };
      }
      case 'update': {
        const { be } = this.need();
        applyUpdate(be, this.params, r, this.assignment!.train);
        return { value: null };
      }
      case 'state': {
        const { be } = this.need();
        const bytes = encodeStageState(be, this.assignment!.stage, this.params, r.includeMoments);
        const copy = bytes.slice(); // own buffer, transferable
        return { value: copy, transfer: [copy.buffer as ArrayBuffer] };
      }
      case 'reset': {
        this.stage?.reset();
        for (const p of this.params) p.zeroGrad();
        return { value: null };
      }
      case 'release': { this.release(); return { value: null }; }
    }
  }

  private assignment?: Assignment;

  memoryInUse(): number { return this.be?.memoryInUse() ?? 0; }

  /**
   * The layer hook of the step's last backward: groups layers (last first) into buckets of about `bytes` of
   * gradients and posts each bucket as soon as its last layer is done. The grouping depends only on the stage's
   * param sizes, so all replicas of the stage form the same buckets.
   */
  private bucketer(stage: LlamaStage, bytes: number): (layer: number) => void {
    const be = this.be!;
    this.ensureBuckets(stage, bytes);
    const endLayer = new Map(this.bucketEnds.map((layer, k) => [layer, k]));
    return (layer: number): void => {
      const b = endLayer.get(layer);
      if (b === undefined) return;
      const ps = this.bucketParams[b];
      // Asynchronous copies (cuda: queued on the copy stream, snapshots as of now): the remaining layers' backward
      // kernels keep being queued instead of the stream draining at every bucket. The backward's reply waits for
      // these posts (pendingBuckets), so the main thread has every bucket before it learns the backward is done.
      const parts = ps.flatMap(gradients).map((g) => be.downloadAsync(g));
      this.pendingBuckets.push(Promise.all(parts).then((hs) => {
        // Shared memory (reused from step to step): the all-reduce's threads (worker/allreduce-thread.ts) sum into it
        // and send from it in place.
        const data = new Float32Array(this.sharedPool.take(4 * gradientSize(ps)));
        let off = 0;
        for (const h of hs) { data.set(h as Float32Array, off); off += h.length; }
        this.post({ bucket: { index: b, data } });
      }));
    };
  }

  /** Groups the stage's LoRA params into buckets of about `bytes` of gradients, last layers first. */
  private ensureBuckets(stage: LlamaStage, bytes: number): void {
    if (this.bucketBytes !== bytes || this.bucketParams.length === 0) {
      this.bucketParams = []; this.bucketEnds = [];
      let cur: LoraParams[] = [], size = 0;
      for (let i = stage.weights.layers.length - 1; i >= 0; i--) {
        for (const p of stage.layerLoraParams(i)) { cur.push(p); size += 4 * gradientSize([p]); }
        if (cur.length && (size >= bytes || i === 0)) { this.bucketParams.push(cur); this.bucketEnds.push(i); cur = []; size = 0; }
      }
      this.bucketBytes = bytes;
    }
  }

  /**
   * Host copy of an activation, freed on the device at once. cuda copies on its copy stream (Backend.downloadAsync),
   * so the next micro-batch's kernels queue while the tensor travels; DQLORA_SYNC_DOWNLOAD=1 waits instead.
   */
  private async download(t: Tensor): Promise<HostActivation> {
    const be = this.be!;
    const shape: [number, number] = [t.shape[0], t.shape[1]];
    if (SYNC_DOWNLOAD) { const data = be.download(t) as Float32Array; be.free(t); return { data, shape }; }
    const pending = be.downloadActAsync(t, (bytes) => this.pool.take(bytes));
    be.free(t);
    const data = await pending;
    return { data, shape, crc32: crc32(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)) };
  }

  /** `t`, after `host` (a received tensor) was copied onto the device: its array goes back to the receive thread. */
  private uploaded(t: Tensor, host: Float32Array | Uint16Array): Tensor {
    const b = wholeArrayBuffer(host);
    if (this.toReceiver && b) this.toReceiver.postMessage(b, [b]);
    return t;
  }

  private release(): void {
    this.stage?.reset();
    // Everything the stage allocated on the device (weights, LoRA params and moments, what a failed step left):
    // a recovery re-assigns, and the old stage must not stay on the device beside the new one.
    if (this.stageMemory) {
      this.stageMemory.freeLeftovers();
      this.stageMemory.close();
      this.stageMemory = undefined;
      this.be?.releaseCache();
    }
    this.stage = undefined; this.params = []; this.bucketParams = []; this.assignment = undefined;
  }
}

/**
 * The gradients of a module that are all-reduced, in bucket order: those of every trainable tensor (A, B and, with
 * DoRA, the magnitude), the same list the step math norms, clips and updates (LoraParams.trainable).
 */
function gradients(p: LoraParams): Tensor[] {
  return p.trainable().map((t) => t.grad);
}

function gradientSize(ps: readonly LoraParams[]): number {
  return ps.reduce((a, p) => a + gradients(p).reduce((b, g) => b + g.size, 0), 0);
}

function overwrite(be: Backend, dst: Tensor, src: Float32Array): void {
  if (dst.size !== src.length) throw new ShapeError(`tensor size mismatch (${dst.size} vs ${src.length})`);
  // (a bucket in shared memory uploads as it is: the cuda addon reads any typed array's memory, src/addon.cpp viewArg)
  const t = be.upload(src, dst.shape, 'f32');
  be.scale(dst, 0); be.axpy(dst, t, 1); be.free(t);
}

/** Runs the request loop on this thread (called from compute-thread.mjs). */
export function serve(): void {
  const port = parentPort;
  if (!port) throw new DqloraError('worker/runtime/compute.ts must run in a worker thread');
  const post = (m: ComputeReply, transfer?: ArrayBuffer[]): void => port.postMessage(m, transfer ?? []);
  const compute = new StageCompute(post);
  const now = (): number => performance.timeOrigin + performance.now();
  const reply = (id: number, x: { value: unknown; transfer?: ArrayBuffer[] }, start: number): void => post({ ok: true, id, value: x.value, memoryInUse: compute.memoryInUse(), start, done: now() }, x.transfer);
  const fail = (id: number, e: unknown): void => {
    const err = e instanceof Error ? e : new Error(String(e));
    post({ ok: false, id, error: { name: err.name, message: err.message } });
  };
  let queue = Promise.resolve();
  port.on('message', (m: { id: number; req: ComputeRequest }) => {
    queue = queue.then(async () => {
      try {
        const start = now();
        const h = await compute.handle(m.req);
        if (h.later) h.later.then((x) => reply(m.id, x, start), (e) => fail(m.id, e));
        else reply(m.id, h, start);
      } catch (e) {
        fail(m.id, e);
      }
    });
  });
}
