// One worker's pipeline stage: loads its layers, runs its part of each optimizer step (1F1B micro-batch
// schedule with the neighbouring stages over the Pipeline service), all-reduces its LoRA gradients with
// the same stage of the other replicas over NATS, and applies AdamW when the coordinator says how.
//
// The step, as the coordinator drives it (see coordinator/distributed/workers.ts):
//   RunStep      → 1F1B forward/backward of this replica's micro-batches → all-reduce → report ‖g‖² and loss
//   ApplyUpdate  → clip by the coordinator's global coefficient → AdamW (update number step + 1) → zero grads
// Numerics are the single-process run's (core/train/step.ts): same dropout key (seed, step), same loss scale
// (1 / label tokens of the whole step), same clipping rule.
//
// Threads: the kernels run on the stage's compute thread (compute.ts), outgoing tensors are encoded and written to
// gRPC on the send thread (worker/transport/send-thread.ts); this thread schedules, receives tensors (the Pipeline
// server) and all-reduces. So a send never waits behind the next micro-batch's compute: the next forward is queued on
// the compute thread the moment the previous one returns, while gRPC streams its output to the next stage (at most
// MAX_SENDS_IN_FLIGHT per direction before the schedule waits for the oldest), and in the step's last backward
// the all-reduce of the last layers' gradients runs while the earlier layers are still being computed.
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import type { BackendName } from '../../core/engine/index.ts';
import { natsConnectOptions } from '../../common/nats-options.ts';
import { connectionError } from '../../common/connection.ts';
import { NatsAllReduce, deriveAllReduceKey, type AllReduceStats } from '../allreduce.ts';
import { ThreadedAllReduce } from '../allreduce-thread.ts';
import { watchNatsConnection, type NatsLink } from '../../common/nats-link.ts';
import { PipelineSender, type Peer } from '../transport/send-thread.ts';
import { Inbox, StepAbortedError } from './inbox.ts';
import { ComputeThread } from './stage-compute.ts';
import type { ComputeInfo, GradBucket, HostActivation } from './compute.ts';
import { hostToF32, type HostTensor } from '../../wire/tensor.ts';
import { generationId, microBatchFromWire, type Assignment } from '../../wire/assignment.ts';
import { dropoutKey, lossScale } from '../../core/train/step.ts';
import { ConfigError, DqloraError, ShapeError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import type { WorkerMetrics } from '../../common/metrics.ts';
import type { RunStep, ApplyUpdate, StepStats, TimelineSpan } from '../../proto/gen/dqlora/v1/control.ts';

const log = logger('stage');

/** Sends per direction the schedule lets run ahead of their acknowledgement (bounds host memory). */
const MAX_SENDS_IN_FLIGHT = 4;
/** Gradient bytes per all-reduce bucket: big enough to amortise a NATS round, small enough to overlap backward. */
const BUCKET_BYTES = 4 << 20;

/** What the stage runner needs of an all-reduce: NatsAllReduce (this thread) or ThreadedAllReduce (threads of its own). */
interface GradientAllReduce {
  readonly stats: AllReduceStats;
  allReduceBucket(seq: number, bucket: number, buf: Float32Array): Promise<void>;
  close(): void;
}

export class StageRunner {
  readonly inbox = new Inbox();
  private a?: Assignment;
  /** Outgoing tensors are encoded and written to gRPC on the send thread (worker/transport/send-thread.ts). */
  private readonly sender: PipelineSender;
  private nc?: NatsConnection;
  private allreduce?: GradientAllReduce;
  /** Event-loop delay during steps (reported per step: the loop must never wait on compute). */
  private readonly loopDelay = monitorEventLoopDelay({ resolution: 1 });
  /** Why the last abort() happened (the error a step cut short reports). */
  private abortReason = '';
  /** A training step with an all-reduce is running (a NATS drop then fails it at once). */
  private reducing = false;
  /** Rejects the running step's `whenAborted` (a step must not wait on a send to a stalled peer after an abort). */
  private onAbort?: (e: Error) => void;
  private natsLink?: NatsLink;
  /** Incremented by abort(): a step whose generation is older stops at its next await. */
  private gen = 0;

  /** The receive thread's end of the path on which the compute thread gives received arrays back (receiverPort()). */
  private recvPort?: MessagePort;

  private constructor(private readonly compute: ComputeThread, readonly device: ComputeInfo, private readonly jobToken: string, private readonly metrics?: WorkerMetrics) {
    this.sender = new PipelineSender(metrics?.sentBytes);
  }

  /**
   * Starts the compute thread and its backend (`device`: cpu, cuda or auto) and the send thread. Host arrays of the
   * tensors that cross between the stages go round instead of being made anew for each (common/buffer-pool.ts): an
   * activation the compute thread downloaded returns to it from the send thread after the receiver's ack; a tensor
   * the receive thread reassembled returns to it from the compute thread once it is on the device.
   */
  static async start(device: BackendName, jobToken: string, metrics?: WorkerMetrics): Promise<StageRunner> {
    const { thread, info } = await ComputeThread.start(device);
    const r = new StageRunner(thread, info, jobToken, metrics);
    const sent = new MessageChannel(), received = new MessageChannel();
    await thread.connect(sent.port1, received.port1);
    await r.sender.recycleTo(sent.port2);
    r.recvPort = received.port2;
    return r;
  }

  /** For the receive thread (PipelineReceiver.start `recycle`): where the compute thread gives received arrays back. Once. */
  receiverPort(): MessagePort | undefined {
    const p = this.recvPort;
    this.recvPort = undefined;
    return p;
  }

  get assignment(): Assignment | undefined { return this.a; }
  get backendName(): 'cpu' | 'cuda' { return this.device.name; }
  /** Device bytes in use after the last compute request. */
  memoryInUse(): number { return this.compute.memoryInUse; }

  /** Loads the stage (and restores its state from a checkpoint), connects to peers. Replaces any earlier assignment. */
  async assign(a: Assignment): Promise<void> {
    await this.release();
    const t0 = performance.now();
    const { params } = await this.compute.call({ op: 'assign', a }) as { params: number };
    const popts = { jobId: generationId(a), jobToken: this.jobToken, maxInFlight: MAX_SENDS_IN_FLIGHT, chunkBytes: a.train.chunkBytes, deadlineMs: a.train.stepTimeoutMs };
    if (a.prev) await this.sender.open('prev', a.prev, popts);
    if (a.next) await this.sender.open('next', a.next, popts);
    if (a.numReplicas > 1) {
      if (!a.natsUrl) throw new ConfigError(`stage ${a.stage} has ${a.numReplicas} replicas but no NATS URL was given`, { hint: 'start the coordinator with --nats URL (or nats-server on PATH in local mode), or the worker with --nats' });
      // NATS credentials and TLS come from the environment (a Kubernetes Secret, the mtls certificate), never from the
      // job or a URL (common/nats-options.ts); a refused connection names the address. This connection carries the
      // link watch below (and the all-reduce with DQLORA_ALLREDUCE_THREADS=0); the all-reduce threads connect the
      // same way, each on its own, and a drop of theirs fails the call naming NATS too.
      this.nc = await connect({ servers: a.natsUrl, name: `dqlora-${generationId(a)}-s${a.stage}-r${a.replica}`, timeout: 10_000, ...natsConnectOptions() })
        .catch((e: unknown) => { throw connectionError('NATS', a.natsUrl!, e); });
      // A NATS connection that drops while a step all-reduces: fail the step at once, naming NATS (the coordinator
      // rides out outages shorter than distributed.outage_window_s without spending a recovery), rather than
      // waiting out the step timeout and blaming a peer.
      this.natsLink = watchNatsConnection(this.nc, {
        onChange: (st, server) => { if (st !== 'up' && this.reducing) this.abort(`cannot reach NATS at ${server}: the connection dropped during the gradient all-reduce`); },
      });
      const arOpts = { jobId: generationId(a), stage: a.stage, rank: a.replica, worldSize: a.numReplicas, timeoutMs: a.train.stepTimeoutMs, key: deriveAllReduceKey(this.jobToken, generationId(a)) };
      // Off this thread by default: sending and receiving on threads of their own keep the event loop free for the
      // pipeline and overlap each other (worker/allreduce-thread.ts). DQLORA_ALLREDUCE_THREADS=0: on this thread, on
      // this connection (same wire protocol: ranks of either kind can run in one job).
      this.allreduce = process.env.DQLORA_ALLREDUCE_THREADS === '0'
        ? new NatsAllReduce(this.nc, arOpts)
        : await ThreadedAllReduce.start({ ...arOpts, url: a.natsUrl, name: `dqlora-${generationId(a)}-s${a.stage}-r${a.replica}` });
    }
    this.inbox.begin(a.firstSeq);
    this.a = a;
    log.info({ stage: a.stage, replica: a.replica, layers: [a.spec.firstLayer, a.spec.lastLayer], lora: params, resumeFrom: a.resumeFrom || undefined, ms: Math.round(performance.now() - t0) }, 'stage assigned');
  }

  private need(): Assignment {
    if (!this.a) throw new DqloraError('this worker has no stage assigned yet');
    return this.a;
  }

  /** Drops the step in flight (waiters fail with StepAbortedError); gradients and saved activations are cleared. */
  abort(reason: string): void {
    this.gen++;
    this.abortReason = reason;
    this.onAbort?.(new StepAbortedError(`the step was aborted: ${reason}`));
    this.onAbort = undefined;
    this.inbox.abort(reason);
    // A closed all-reduce wakes a rank blocked on a dead peer at once; the coordinator re-assigns (a new
    // instance) before the next step anyway.
    this.allreduce?.close();
    this.compute.onBucket = undefined;
    if (this.a) this.compute.call({ op: 'reset' }).catch(() => { /* a dead thread fails the next command */ });
  }

  /**
   * This replica's part of one step. Training: 1F1B over the micro-batches, the gradient all-reduce overlapping
   * the last backward; the report carries the stage's ‖g‖² (after the all-reduce) and, on the last stage, the
   * loss sum. Forward-only (evaluation): the loss sum and label count of the micro-batches.
   */
  async runStep(cmd: RunStep): Promise<StepStats> {
    this.reducing = !cmd.forwardOnly && !!this.allreduce;
    // An abort ends the step at once, even while it waits on a send to a stalled peer or on the all-reduce: those
    // calls are left to fail on their own deadlines in the background.
    const whenAborted = new Promise<never>((_, reject) => { this.onAbort = reject; });
    whenAborted.catch(() => { /* raced below */ });
    try { return await Promise.race([this.runSchedule(cmd), whenAborted]); } finally { this.reducing = false; this.onAbort = undefined; }
  }

  private async runSchedule(cmd: RunStep): Promise<StepStats> {
    const a = this.need();
    const gen = this.gen;
    const alive = (): void => { if (this.gen !== gen) throw new StepAbortedError(`step seq ${cmd.seq} was aborted: ${this.abortReason}`); };
    const seq = cmd.seq, t0 = performance.now(), t0Abs = performance.timeOrigin + t0;
    this.loopDelay.reset(); this.loopDelay.enable();
    const at = (): number => (performance.now() - t0) / 1000;
    /** A compute-thread timestamp (absolute ms) as seconds since this step started. */
    const rel = (abs: number): number => (abs - t0Abs) / 1000;
    this.inbox.begin(seq);
    const batches = cmd.microBatches.map((m, i) => microBatchFromWire(m, a.spec, `seq ${seq} micro-batch ${i}`));
    const m = batches.length, p = a.numStages, s = a.stage;
    const train = !cmd.forwardOnly;
    const gradScale = lossScale(cmd.lossNormaliser);
    const dropout = dropoutKey(a.train.seed, cmd.step);
    const timeout = a.train.stepTimeoutMs;
    let lossSum = 0, labelTokens = 0, fwd = 0, bwd = 0;
    const spans: TimelineSpan[] = [];
    const sends: { forward: Promise<unknown>[]; backward: Promise<unknown>[] } = { forward: [], backward: [] };
    const allSends: Promise<unknown>[] = [];
    const prevName = `stage ${s - 1} (${a.prev})`, nextName = `stage ${s + 1} (${a.next})`;
    const receive = async (dir: 'forward' | 'backward', i: number, from: string): Promise<HostActivation> => {
      const h: HostTensor = await this.inbox.take(dir, seq, i, timeout, from);
      alive();
      const n = batches[i].B * batches[i].T, H = h.shape[1];
      if (h.shape.length !== 2 || h.shape[0] !== n) throw new ShapeError(`${dir} tensor of seq ${seq} micro-batch ${i} from ${from} has shape [${h.shape}], expected [${n}, hidden]`);
      // bf16 stays raw bits up to the device (upload 'act'); f32 as it came.
      return { data: h.dtype === 'bf16' ? h.data : hostToF32(h, `${dir} tensor of seq ${seq} micro-batch ${i} from ${from}`), shape: [n, H] };
    };
    // Sends are not awaited before the next compute: the compute thread is already busy with it while this
    // thread streams the tensor. Only when MAX_SENDS_IN_FLIGHT are unacknowledged does the schedule wait.
    const ship = async (peer: Peer, dir: 'forward' | 'backward', i: number, h: HostActivation): Promise<void> => {
      // Raw bf16 bits, and float32 from a backend that computes in f32, go as they are, with the checksum the compute
      // thread took; float32 from a bf16 backend (DQLORA_SYNC_DOWNLOAD) is rounded to bf16 on the send thread (the
      // same bits). The tensor's memory moves to the send thread.
      const form = h.data instanceof Uint16Array ? 'bf16' : this.device.actDtype !== 'bf16' ? 'f32' : 'f32-as-bf16';
      const pr = this.sender.send(peer, dir, seq, i, h.data, h.shape, form, h.crc32);
      pr.catch(() => { /* awaited below */ });
      const q = sends[dir];
      q.push(pr); allSends.push(pr);
      if (q.length > MAX_SENDS_IN_FLIGHT) await q.shift();
    };

    // The schedule as a list of operations. 1F1B: stage s runs (p − 1 − s) warm-up forwards, then alternates one
    // forward and one backward, then drains the remaining backwards; at most p − s micro-batches are in flight here.
    type Op = { kind: 'forward' | 'backward'; i: number };
    const ops: Op[] = [];
    if (!train) {
      for (let i = 0; i < m; i++) ops.push({ kind: 'forward', i });
    } else {
      const warmup = Math.min(p - 1 - s, m);
      let f = 0, b = 0;
      while (f < warmup) ops.push({ kind: 'forward', i: f++ });
      while (f < m) { ops.push({ kind: 'forward', i: f++ }); ops.push({ kind: 'backward', i: b++ }); }
      while (b < m) ops.push({ kind: 'backward', i: b++ });
    }

    let arStart = 0;
    const buckets: Promise<void>[] = [];
    let onBucket: ((b: GradBucket) => void) | undefined;
    if (train && this.allreduce) {
      // Buckets arrive (last layers first) while the last backward still computes the earlier layers; each is
      // all-reduced at once, several in flight (every bucket sums in the same fixed rank order).
      this.compute.onBucket = onBucket = (b: GradBucket) => {
        if (arStart === 0) arStart = at();
        const pr = this.reduceBucket(seq, b);
        pr.catch(() => { /* awaited with the others below */ });
        buckets.push(pr);
      };
    }
    // Dataflow: an operation goes to the compute thread as soon as its input is here, without waiting for the
    // previous one's result (the thread runs them in order); results are shipped as they come back.
    const results: Promise<void>[] = [];
    try {
      for (const op of ops) {
        const i = op.i, fw = op.kind === 'forward';
        const input = fw
          ? (a.spec.hasEmbedding ? undefined : await receive('forward', i, prevName))
          : (a.spec.hasHead ? undefined : await receive('backward', i, nextName));
        alive();
        const done = fw
          ? this.compute.callTimed({ op: 'forward', id: i, batch: batches[i], hidden: input, train, ...(train ? { dropout, gradScale } : {}) }).then(async ({ value, start, done }) => {
            const r = value as { hidden?: HostActivation; lossSum?: number; count?: number };
            alive();
            spans.push({ kind: 'forward', micro: i, start: rel(start), end: rel(done) });
            fwd += rel(done) - rel(start);
            this.metrics?.stageDuration.observe({ phase: 'forward' }, (done - start) / 1000);
            if (r.lossSum !== undefined) { lossSum += r.lossSum; labelTokens += r.count ?? 0; }
            if (r.hidden) await ship('next', 'forward', i, r.hidden);
          })
          : this.compute.callTimed({ op: 'backward', id: i, d: input, bucketBytes: i === m - 1 && this.allreduce ? BUCKET_BYTES : undefined }).then(async ({ value, start, done }) => {
            const r = value as { dx?: HostActivation };
            alive();
            spans.push({ kind: 'backward', micro: i, start: rel(start), end: rel(done) });
            bwd += rel(done) - rel(start);
            this.metrics?.stageDuration.observe({ phase: 'backward' }, (done - start) / 1000);
            if (r.dx) await ship('prev', 'backward', i, r.dx);
          });
        done.catch(() => { /* awaited below */ });
        results.push(done);
      }
      await Promise.all(results);
      await Promise.all(allSends);
      alive();
    } finally {
      // (an aborted step may finish after the next one began: only remove this step's handler)
      if (this.compute.onBucket === onBucket) this.compute.onBucket = undefined;
    }
    const pipelineSec = at();
    // Waiting on other stages = the schedule's wall time during which no compute was running or finishing here
    // (the bubble and the transfers not hidden behind compute): the gaps between the compute spans.
    let idle = 0, cursor = 0;
    for (const sp of [...spans].sort((x, y) => x.start - y.start)) {
      if (sp.start - cursor > 1e-4) { spans.push({ kind: 'wait', micro: sp.micro, start: cursor, end: sp.start }); idle += sp.start - cursor; }
      cursor = Math.max(cursor, sp.end);
    }
    if (pipelineSec - cursor > 1e-4) { spans.push({ kind: 'wait', micro: -1, start: cursor, end: pipelineSec }); idle += pipelineSec - cursor; }
    let arSec = 0, gradNormSq = 0;
    if (train) {
      if (this.allreduce) {
        if (m === 0) await this.reduceEmpty(seq); // no micro-batch on this replica: it still contributes zeros
        const w0 = at();
        await Promise.all(buckets);
        alive();
        const w1 = at();
        arSec = w1 - (arStart || w0);
        if (w1 > w0) spans.push({ kind: 'allreduce', micro: -1, start: arStart || w0, end: w1 });
        this.metrics?.allReduceDuration.observe(arSec);
      }
      gradNormSq = await this.compute.call({ op: 'gradNormSq' }) as number;
      alive();
    }
    this.loopDelay.disable();
    const lagP99 = this.loopDelay.count > 0 ? this.loopDelay.percentile(99) / 1e9 : 0;
    const mem = this.compute.memoryInUse;
    this.metrics?.memoryInUse.set({ device: this.device.name }, mem);
    return {
      lossSum, labelTokens, gradNormSq, forwardSeconds: fwd, backwardSeconds: bwd, allreduceSeconds: arSec, optimizerSeconds: 0,
      grpcBytesSent: this.sender.bytesSent.prev + this.sender.bytesSent.next, grpcBytesReceived: 0,
      natsBytesSent: this.allreduce?.stats.bytesSent ?? 0, natsBytesReceived: this.allreduce?.stats.bytesReceived ?? 0,
      memoryInUseBytes: mem, checkpointBytes: 0, checkpointSeconds: 0, pipelineSeconds: pipelineSec, idleSeconds: idle, spans, eventLoopLagP99Seconds: lagP99,
    };
  }

  /** All-reduces one gradient bucket (fixed summation order over ranks) and writes the sums back. */
  private async reduceBucket(seq: number, b: GradBucket): Promise<void> {
    const ar = this.allreduce!;
    const s0 = ar.stats.bytesSent, r0 = ar.stats.bytesReceived;
    await ar.allReduceBucket(seq, b.index, b.data);
    this.metrics?.sentBytes.inc({ transport: 'nats' }, ar.stats.bytesSent - s0);
    this.metrics?.receivedBytes.inc({ transport: 'nats' }, ar.stats.bytesReceived - r0);
    await this.compute.call({ op: 'setBucket', bucket: b });
  }

  /** A replica without micro-batches in this step: its gradients are zero, and its buckets must still take part. */
  private async reduceEmpty(seq: number): Promise<void> {
    const sizes = await this.compute.call({ op: 'bucketSizes', bucketBytes: BUCKET_BYTES }) as number[];
    await Promise.all(sizes.map((n, k) => this.reduceBucket(seq, { index: k, data: new Float32Array(new SharedArrayBuffer(4 * n)) })));
  }

  /** Clipping and AdamW with the coordinator's coefficient and learning rate (core/train/step.ts applyUpdate). */
  async applyUpdate(u: ApplyUpdate): Promise<number> {
    this.need();
    const t0 = performance.now();
    await this.compute.call({ op: 'update', step: u.step, lr: u.lr, clipCoef: u.clipCoef });
    this.metrics?.step.set(u.step + 1);
    return (performance.now() - t0) / 1000;
  }

  /** StageState bytes of this stage (weights, and moments when asked). */
  async stateBytes(includeMoments: boolean): Promise<Uint8Array> {
    this.need();
    return await this.compute.call({ op: 'state', includeMoments }) as Uint8Array;
  }

  /** Closes peer connections and drops the loaded stage. */
  async release(): Promise<void> {
    this.inbox.abort('stage released');
    await this.sender.closePeers();
    this.natsLink?.stop(); this.natsLink = undefined;
    const ar = this.allreduce;
    this.allreduce = undefined;
    ar?.close();
    if (ar instanceof ThreadedAllReduce) await ar.whenClosed(); // (its threads have closed their connections)
    if (this.nc) { await this.nc.close().catch(() => {}); this.nc = undefined; }
    if (this.a) await this.compute.call({ op: 'release' }).catch(() => {});
    this.a = undefined;
  }

  /** Stops the compute thread (the worker is exiting). */
  async close(): Promise<void> {
    await this.release();
    await this.sender.close();
    await this.compute.close();
  }
}
