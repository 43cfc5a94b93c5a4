// One worker's pipeline stage: loads its layers, runs its part of each optimizer step (1F1B micro-batch
// schedule with the neighbouring stages over the Pipeline service), all-reduces its LoRA gradients with
// the same stage of the other replicas over NATS, and applies AdamW when the coordinator says how.
//
// The step, as the coordinator drives it (see coordinator/distributed/workers.ts):
//   RunStep      → 1F1B forward/backward of this replica's micro-batches → all-reduce → report ‖g‖² and loss
//   ApplyUpdate  → clip by the coordinator's global coefficient → AdamW (update number step + 1) → zero grads
// Numerics are the single-process Trainer's: same dropout key (seed, step), same loss scale (1 / label tokens
// of the whole step), same clipping rule, float32 activations on the wire (bf16 would change the result).
import { channelCredentials } from '../../common/tls.ts';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import type { Backend, Tensor } from '../../core/engine/backend.ts';
import type { LoraParams } from '../../core/engine/lora.ts';
import type { LlamaStage } from '../../core/model/llama.ts';
import { loadStage } from '../../core/model/loader.ts';
import { NatsAllReduce } from '../allreduce.ts';
import { PipelineClient } from '../transport/pipeline.ts';
import { Inbox } from './inbox.ts';
import { encodeStageState } from '../../wire/state.ts';
// The checkpoint reader (verifies every file's sha256 against the manifest). The one place a worker reads
// the coordinator's format: a resuming worker loads its shard from the checkpoint directory, which (like the
// model directory) must be visible to it.
import { loadCheckpoint } from '../../common/checkpoint.ts';
import { hostToF32, type HostTensor } from '../../wire/tensor.ts';
import { generationId, microBatchFromWire, type Assignment } from '../../wire/assignment.ts';
import { applyUpdate, dropoutKey, gradNormSq, lossScale, restoreLoraParams } from '../../core/train/step.ts';
import { ConfigError, DqloraError, ShapeError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import type { WorkerMetrics } from '../../common/metrics.ts';
import type { RunStep, ApplyUpdate, StepStats } from '../../proto/gen/dqlora/v1/control.ts';

const log = logger('stage');

export class StageRunner {
  readonly inbox = new Inbox();
  private stage?: LlamaStage;
  private params: LoraParams[] = [];
  private a?: Assignment;
  private prevClient?: PipelineClient;
  private nextClient?: PipelineClient;
  private nc?: NatsConnection;
  private allreduce?: NatsAllReduce;

  constructor(private readonly be: Backend, private readonly jobToken: string, private readonly metrics?: WorkerMetrics) {}

  get assignment(): Assignment | undefined { return this.a; }

  /** Loads the stage (and restores its state from a checkpoint), connects to peers. Replaces any earlier assignment. */
  async assign(a: Assignment): Promise<void> {
    await this.release();
    const t0 = performance.now();
    this.stage = loadStage(this.be, a.modelDir, a.spec, {
      lora: a.lora, seed: a.train.seed, blocksize: a.train.blocksize, doubleQuant: a.train.doubleQuant, gradientCheckpointing: a.train.gradientCheckpointing,
    });
    this.params = this.stage.loraParams();
    if (a.resumeFrom) this.restore(a.resumeFrom);
    const popts = { jobId: generationId(a), jobToken: this.jobToken, chunkBytes: a.train.chunkBytes, deadlineMs: a.train.stepTimeoutMs, sentBytes: this.metrics?.sentBytes, credentials: channelCredentials() };
    if (a.prev) this.prevClient = new PipelineClient(a.prev, popts);
    if (a.next) this.nextClient = new PipelineClient(a.next, popts);
    if (a.numReplicas > 1) {
      if (!a.natsUrl) throw new ConfigError(`stage ${a.stage} has ${a.numReplicas} replicas but no NATS URL was given`, { hint: 'start the coordinator with --nats URL (or nats-server on PATH in local mode), or the worker with --nats' });
      // NATS credentials come from the environment (a Kubernetes Secret), never from the job or a URL.
      const user = process.env.DQLORA_NATS_USER, pass = process.env.DQLORA_NATS_PASSWORD;
      this.nc = await connect({ servers: a.natsUrl, name: `dqlora-${generationId(a)}-s${a.stage}-r${a.replica}`, timeout: 10_000, ...(user ? { user, pass } : {}) });
      this.allreduce = new NatsAllReduce(this.nc, { jobId: generationId(a), stage: a.stage, rank: a.replica, worldSize: a.numReplicas, timeoutMs: a.train.stepTimeoutMs });
    }
    this.inbox.begin(a.firstSeq);
    this.a = a;
    log.info({ stage: a.stage, replica: a.replica, layers: [a.spec.firstLayer, a.spec.lastLayer], lora: this.params.length, resumeFrom: a.resumeFrom || undefined, ms: Math.round(performance.now() - t0) }, 'stage assigned');
  }

  private restore(dir: string): void {
    restoreLoraParams(this.params, loadCheckpoint(dir));
  }

  private overwrite(dst: Tensor, src: Float32Array): void {
    if (dst.size !== src.length) throw new ShapeError(`tensor size mismatch (${dst.size} vs ${src.length})`);
    const t = this.be.upload(src, dst.shape, 'f32');
    this.be.scale(dst, 0); this.be.axpy(dst, t, 1); this.be.free(t);
  }

  private need(): { a: Assignment; stage: LlamaStage } {
    if (!this.a || !this.stage) throw new DqloraError('this worker has no stage assigned yet');
    return { a: this.a, stage: this.stage };
  }

  /** Drops the step in flight (waiters fail with StepAbortedError); gradients and saved activations are cleared. */
  abort(reason: string): void {
    this.inbox.abort(reason);
    // A closed all-reduce wakes a rank blocked on a dead peer at once; the coordinator re-assigns (a new
    // instance) before the next step anyway.
    this.allreduce?.close();
    this.stage?.reset();
    for (const p of this.params) p.zeroGrad();
  }

  /**
   * This replica's part of one step. Training: 1F1B over the micro-batches, then the gradient all-reduce;
   * the report carries the stage's ‖g‖² (after the all-reduce) and, on the last stage, the loss sum.
   * Forward-only (evaluation): the loss sum and label count of the micro-batches.
   */
  async runStep(cmd: RunStep): Promise<StepStats> {
    const { a, stage } = this.need();
    const seq = cmd.seq, t0 = performance.now();
    this.inbox.begin(seq);
    const batches = cmd.microBatches.map((m, i) => microBatchFromWire(m, a.spec, `seq ${seq} micro-batch ${i}`));
    const m = batches.length, p = a.numStages, s = a.stage;
    const train = !cmd.forwardOnly;
    const gradScale = lossScale(cmd.lossNormaliser);
    const dropout = dropoutKey(a.train.seed, cmd.step);
    const timeout = a.train.stepTimeoutMs;
    let lossSum = 0, labelTokens = 0, fwd = 0, bwd = 0, idle = 0;
    const sends: Promise<unknown>[] = [];
    const H = stage.cfg.hiddenSize;
    const prevName = `stage ${s - 1} (${a.prev})`, nextName = `stage ${s + 1} (${a.next})`;
    const receive = async (dir: 'forward' | 'backward', i: number, from: string): Promise<Tensor> => {
      const w0 = performance.now();
      const h: HostTensor = await this.inbox.take(dir, seq, i, timeout, from);
      idle += performance.now() - w0;
      const n = batches[i].B * batches[i].T;
      if (h.shape.length !== 2 || h.shape[0] !== n || h.shape[1] !== H) throw new ShapeError(`${dir} tensor of seq ${seq} micro-batch ${i} from ${from} has shape [${h.shape}], expected [${n}, ${H}]`);
      return this.be.upload(hostToF32(h), [n, H], 'act');
    };
    // A send is awaited (until the receiver acknowledged it) before this stage computes again. The compute is
    // synchronous on this thread, and HTTP/2 moves a tensor only in 64 KiB flow-control windows that need both
    // event loops: a send left pending would sit behind the next micro-batch's compute while the receiving
    // stage idles. Awaiting it costs one loopback round trip and lets the transfer overlap the receiver's
    // compute instead (in 1F1B the receiver is usually waiting for exactly this tensor).
    const ship = async (client: PipelineClient, dir: 'forward' | 'backward', i: number, t: Tensor): Promise<void> => {
      const data = this.be.download(t) as Float32Array;
      this.be.free(t);
      const w0 = performance.now();
      // A bf16 backend's activations are bf16 already: sending them as bf16 halves the bytes and loses nothing.
      const o = { dtype: this.be.actDtype === 'bf16' ? 'bf16' as const : 'f32' as const };
      const pr = dir === 'forward' ? client.sendForward(seq, i, data, [t.shape[0], t.shape[1]], o) : client.sendBackward(seq, i, data, [t.shape[0], t.shape[1]], o);
      sends.push(pr);
      await pr;
      idle += performance.now() - w0;
    };
    const forward = async (i: number): Promise<void> => {
      const hidden = a.spec.hasEmbedding ? undefined : await receive('forward', i, prevName);
      const c0 = performance.now();
      const r = stage.forward(i, batches[i], hidden, train ? { train: true, dropout, gradScale } : { train: false });
      if (r.lossSum !== undefined) { lossSum += r.lossSum; labelTokens += r.count ?? 0; }
      const dt = performance.now() - c0;
      if (r.hidden) await ship(this.nextClient!, 'forward', i, r.hidden);
      fwd += dt;
      this.metrics?.stageDuration.observe({ phase: 'forward' }, dt / 1000);
    };
    const backward = async (i: number): Promise<void> => {
      const d = a.spec.hasHead ? undefined : await receive('backward', i, nextName);
      const c0 = performance.now();
      const dx = stage.backward(i, d);
      const dt = performance.now() - c0;
      if (dx) await ship(this.prevClient!, 'backward', i, dx);
      bwd += dt;
      this.metrics?.stageDuration.observe({ phase: 'backward' }, dt / 1000);
    };

    if (!train) {
      for (let i = 0; i < m; i++) await forward(i);
    } else {
      // 1F1B: stage s runs (p − 1 − s) warm-up forwards, then alternates one forward and one backward,
      // then drains the remaining backwards; at most p − s micro-batches are in flight on this stage.
      const warmup = Math.min(p - 1 - s, m);
      let f = 0, b = 0;
      while (f < warmup) await forward(f++);
      while (f < m) { await forward(f++); await backward(b++); }
      while (b < m) await backward(b++);
    }
    await Promise.all(sends);
    const pipelineMs = performance.now() - t0;
    let arMs = 0, normSq = 0;
    if (train) {
      if (this.allreduce) {
        const r0 = performance.now();
        await this.allReduceGrads(seq);
        arMs = performance.now() - r0;
        this.metrics?.allReduceDuration.observe(arMs / 1000);
      }
      normSq = gradNormSq(this.be, this.params);
    }
    const mem = this.be.memoryInUse();
    this.metrics?.memoryInUse.set({ device: this.be.name }, mem);
    return {
      lossSum, labelTokens, gradNormSq: normSq, forwardSeconds: fwd / 1000, backwardSeconds: bwd / 1000, allreduceSeconds: arMs / 1000, optimizerSeconds: 0,
      grpcBytesSent: (this.prevClient?.stats.bytesSent ?? 0) + (this.nextClient?.stats.bytesSent ?? 0), grpcBytesReceived: 0,
      natsBytesSent: this.allreduce?.stats.bytesSent ?? 0, natsBytesReceived: this.allreduce?.stats.bytesReceived ?? 0,
      memoryInUseBytes: mem, checkpointBytes: 0, checkpointSeconds: 0, pipelineSeconds: pipelineMs / 1000, idleSeconds: idle / 1000,
    };
  }

  /** All-reduce of every LoRA gradient of this stage as one flat buffer, in the stage's fixed parameter order. */
  private async allReduceGrads(seq: number): Promise<void> {
    const grads: Tensor[] = this.params.flatMap((q) => [q.dA, q.dB]);
    const n = grads.reduce((acc, g) => acc + g.size, 0);
    const flat = new Float32Array(n); // [Σ sizes]
    let off = 0;
    for (const g of grads) { flat.set(this.be.download(g) as Float32Array, off); off += g.size; }
    const s0 = this.allreduce!.stats.bytesSent, r0 = this.allreduce!.stats.bytesReceived;
    await this.allreduce!.allReduceSum(seq, flat);
    this.metrics?.sentBytes.inc({ transport: 'nats' }, this.allreduce!.stats.bytesSent - s0);
    this.metrics?.receivedBytes.inc({ transport: 'nats' }, this.allreduce!.stats.bytesReceived - r0);
    off = 0;
    for (const g of grads) { this.overwrite(g, flat.subarray(off, off + g.size)); off += g.size; }
  }

  /** Clipping and AdamW with the coordinator's coefficient and learning rate (core/train/step.ts applyUpdate). */
  applyUpdate(u: ApplyUpdate): number {
    const { a } = this.need();
    const t0 = performance.now();
    applyUpdate(this.be, this.params, { step: u.step, lr: u.lr, clipCoef: u.clipCoef }, a.train);
    this.metrics?.step.set(u.step + 1);
    return (performance.now() - t0) / 1000;
  }

  /** StageState bytes of this stage (weights, and moments when asked). */
  stateBytes(includeMoments: boolean): Uint8Array {
    const { a } = this.need();
    return encodeStageState(this.be, a.stage, this.params, includeMoments);
  }

  /** Closes peer connections (the loaded stage is dropped with the runner's references). */
  async release(): Promise<void> {
    this.inbox.abort('stage released');
    this.prevClient?.close(); this.nextClient?.close();
    this.prevClient = this.nextClient = undefined;
    this.allreduce?.close(); this.allreduce = undefined;
    if (this.nc) { await this.nc.close().catch(() => {}); this.nc = undefined; }
    this.stage?.reset();
    this.stage = undefined; this.params = []; this.a = undefined;
  }
}
