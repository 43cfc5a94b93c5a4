// The step executor on worker processes (distributed.workers: 'local' | N): the coordinator holds no model
// tensors; S stages × R replicas of workers do the math. One optimizer step, as the job loop hands it over:
//
//   StepInput (micro-batches per replica, loss normaliser, lr) → RunStep to every worker → workers run 1F1B among
//   themselves over the Pipeline service, then all-reduce their stage's LoRA gradients over NATS → each reports
//   ‖g_stage‖² and (last stage) its loss sum → global norm, clip coefficient → ApplyUpdate → AdamW on every worker.
//
// Failures: a worker that dies, stalls or fails a command fails the step with its id, stage and replica
// (WorkerLostError / WorkerCommandError: recoverable). The loop then pauses (Abort to the survivors) and calls
// start() with the last checkpoint, which waits for enough workers (a replacement registering) and re-assigns
// every stage. Checkpoints are written by the coordinator (common/checkpoint.ts) from the state the workers upload.
import crypto from 'node:crypto';
import { microBatchPlan, type JobConfig } from '../job.ts';
import type { ExecutedStep, Snapshot, StepExecutor } from '../executor.ts';
import type { StageTiming } from '../events.ts';
import type { LoraConfig } from '../../core/model/llama.ts';
import type { ModelConfig } from '../../core/model/config.ts';
import { planStages } from '../../core/train/plan.ts';
import { clipCoefficient } from '../../core/train/step.ts';
import { evalBatches, type StepInput } from '../../core/train/steps.ts';
import type { Example, MicroBatch } from '../../core/train/batch.ts';
import { assignWorkers } from './assign.ts';
import { linearBytesPerParam, requiredWorkerCapabilities, stageSettings } from '../features.ts';
import { ControlPlane, WorkerCommandError, WorkerLostError, type WorkerHandle } from './control.ts';
import { spawnLocalWorkers, startLocalNats, superviseLocalWorkers, type LocalNats, type LocalWorkers } from './local.ts';
import { assignmentToWire, microBatchToWire } from '../../wire/assignment.ts';
import { decodeStageState } from '../../wire/state.ts';
import { DEFAULT_CHUNK_BYTES } from '../../wire/tensor.ts';
import type { Checkpoint } from '../../common/checkpoint.ts';
import { BackendError, CheckpointError, ConfigError } from '../../common/errors.ts';
import { isOutOfMemory } from '../../core/engine/oom.ts';
import { MicroBatchSplitRetry, capMicroBatchRows, halveRows, type MicroBatchSplit } from '../../core/train/micro-split.ts';
import { logger } from '../../common/log.ts';
import type { CoordinatorMetrics } from '../../common/metrics.ts';
import type { StepReport } from '../../proto/gen/dqlora/v1/control.ts';

const log = logger('coordinator');

export interface WorkersOptions {
  /** Control service address (overrides distributed.listen). */
  readonly listen?: string;
  /** NATS URL (overrides distributed.nats_url). */
  readonly natsUrl?: string;
  /** Job token workers must present (default: $DQLORA_JOB_TOKEN, else a random one — fine for local mode). */
  readonly jobToken?: string;
  /** Called once the Control service listens (tests and scripts start workers from here). */
  readonly onListening?: (address: string, jobToken: string) => void;
  /** The worker table on every change (id, stage, replica, state): feeds the observers' onWorkers. */
  readonly onWorkers?: (workers: { id: string; stage: number; replica: number; state: string; address: string }[]) => void;
}

/** Resolves with all values, or rejects with the first failure; later failures are swallowed (no unhandled rejections). */
function all<T>(ps: Promise<T>[]): Promise<T[]> {
  for (const p of ps) p.catch(() => { /* the first one is reported by Promise.all */ });
  return Promise.all(ps);
}

export class WorkersExecutor implements StepExecutor {
  readonly kind = 'workers';
  private layout?: WorkerHandle[][]; // [replica][stage]
  private generation = 0;
  private seq = 1;
  private grpcBefore = 0;
  private natsBefore = 0;
  private workers?: LocalWorkers;
  private nats?: LocalNats;
  private natsUrl = '';
  private readonly specs;
  private readonly stageBytes: number[];
  /** Rows per micro-batch after out-of-memory splits (undefined: as planned); only ever lowered. */
  private rowsCap?: number;
  /** Told of every out-of-memory split (the job loop prints it and tells its observers). */
  onSplit?: (s: MicroBatchSplit) => void;

  private constructor(
    private readonly job: JobConfig,
    private readonly plane: ControlPlane,
    private readonly lora: LoraConfig,
    private readonly S: number,
    private readonly R: number,
    private readonly jobId: string,
    private readonly padId: number,
    cfg: ModelConfig,
  ) {
    const p = planStages(cfg, S, linearBytesPerParam(job));
    this.specs = p.specs; this.stageBytes = p.bytes;
  }

  get backend(): string { return this.job.backend; }

  /** Starts the control service (and, in local mode, NATS and the worker processes). */
  static async open(job: JobConfig, o: WorkersOptions & { cfg: ModelConfig; lora: LoraConfig; stages: number; replicas: number; totalSteps: number; padId: number; metrics: CoordinatorMetrics; print: (s: string) => void; onSplit?: (s: MicroBatchSplit) => void }): Promise<WorkersExecutor> {
    const d = job.distributed, S = o.stages, R = o.replicas;
    const local = d.workers === 'local';
    if (typeof d.workers === 'number' && d.workers < S * R) throw new ConfigError(`distributed.workers = ${d.workers} is fewer than stages × replicas = ${S * R}`, { hint: 'every (stage, replica) needs its own worker; extra workers are kept as spares' });
    const jobId = `${job.name.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 40)}-${crypto.randomBytes(3).toString('hex')}`;
    const givenToken = o.jobToken ?? process.env.DQLORA_JOB_TOKEN;
    if (!givenToken && !local) throw new ConfigError('remote workers need a job token: pass --job-token-file PATH or set DQLORA_JOB_TOKEN (the same on the workers)');
    // Local workers get a random token through their environment (never on the command line or in logs).
    const jobToken = givenToken ?? crypto.randomBytes(16).toString('hex');
    const hbTimeout = d.heartbeat_timeout_s * 1000;
    const plane = new ControlPlane({ jobId, jobToken, heartbeatIntervalMs: Math.max(100, Math.round(hbTimeout / 5)), heartbeatTimeoutMs: hbTimeout, metrics: o.metrics, onWorkers: o.onWorkers, requiredCapabilities: requiredWorkerCapabilities(job) });
    plane.progress.totalSteps = o.totalSteps;
    const ex = new WorkersExecutor(job, plane, o.lora, S, R, jobId, o.padId, o.cfg);
    ex.onSplit = o.onSplit;
    try {
      const address = await plane.listen(o.listen ?? d.listen);
      o.print(`coordinator: job ${jobId}, control service on ${address}, ${S} stage(s) × ${R} replica(s)`);
      ex.natsUrl = o.natsUrl ?? d.nats_url;
      if (R > 1 && !ex.natsUrl) {
        if (!local) throw new ConfigError('distributed.replicas > 1 needs a NATS server for the gradient all-reduce', { hint: 'set distributed.nats_url or pass --nats nats://HOST:4222' });
        ex.nats = await startLocalNats();
        ex.natsUrl = ex.nats.url;
      }
      o.onListening?.(address, jobToken);
      if (local) { ex.workers = spawnLocalWorkers(S * R, { coordinator: address, jobToken, backend: job.backend, env: ex.nats?.workerEnv }); superviseLocalWorkers(plane, ex.workers); } // NATS credentials; stalled workers are killed and replaced
      return ex;
    } catch (e) {
      await ex.close();
      throw e;
    }
  }

  private get stepTimeout(): number { return this.job.distributed.step_timeout_s * 1000; }

  /** Waits for S×R connected workers, plans, and (re-)assigns every stage, restoring `from` when set. */
  async start(from: Checkpoint | undefined): Promise<void> {
    const { plane, S, R, job } = this;
    const settings = stageSettings(job, this.lora, { stepTimeoutMs: this.stepTimeout, chunkBytes: DEFAULT_CHUNK_BYTES });
    plane.jobState = 'waiting-for-workers';
    const need = S * R;
    await plane.waitUntil(() => plane.ready().length >= need, job.distributed.wait_timeout_s * 1000, () => `waiting for ${need} workers (${plane.ready().length} connected)`);
    const ready = plane.ready().sort((a, b) => a.registeredAt - b.registeredAt || Number(a.id.slice(1)) - Number(b.id.slice(1)));
    const slots = assignWorkers(ready.map((w) => ({ id: w.id, freeMemoryBytes: Number(w.device?.freeMemoryBytes ?? 0), w })), this.stageBytes, R).map((row) => row.map((x) => x.w));
    for (const w of plane.workers.values()) { w.stage = -1; w.replica = -1; }
    const generation = ++this.generation;
    const firstSeq = this.seq;
    plane.jobState = 'loading';
    await all(slots.flatMap((row, r) => row.map((w, s) => {
      w.stage = s; w.replica = r;
      return plane.request(w, { $case: 'assignStage', assignStage: assignmentToWire({
        jobId: this.jobId, generation, stage: s, numStages: S, replica: r, numReplicas: R, spec: this.specs[s], modelDir: job.model,
        ...settings,
        natsUrl: R > 1 ? this.natsUrl : '', prev: s > 0 ? row[s - 1].address : '', next: s < S - 1 ? row[s + 1].address : '',
        resumeFrom: from?.dir ?? '', firstSeq,
      }) }, Math.max(this.stepTimeout, 600_000));
    })));
    log.info({ generation, layout: slots.map((row) => row.map((w) => w.id).join(' → ')), resumeFrom: from?.dir, step: from?.state.step ?? 0 }, 'stages assigned');
    plane.jobState = 'training';
    plane.updateCounts(); // the worker table with its new stage assignments
    this.layout = slots;
  }

  private need(): WorkerHandle[][] {
    if (!this.layout) throw new ConfigError('the workers have no stages assigned (start() first)');
    return this.layout;
  }

  /** Sends one RunStep per worker (micro-batches of replica r to replica r) and waits for every report. */
  private async runOnAll(perReplica: readonly MicroBatch[][], step: number, epoch: number, labelTokens: number, lr: number, forwardOnly: boolean): Promise<StepReport[][]> {
    const lay = this.need(), S = this.S;
    const mySeq = this.seq++;
    const reqs = lay.map((row, r) => row.map((w, s) => this.plane.request(w, { $case: 'runStep', runStep: {
      step, epoch, microBatches: perReplica[r].map((mb, i) => microBatchToWire(mb, i, { first: s === 0, last: s === S - 1 })), lossNormaliser: labelTokens, lr, forwardOnly, seq: mySeq,
    } }, this.stepTimeout)));
    const flat = await all(reqs.flat());
    return lay.map((row, r) => row.map((_, s) => flat[r * S + s]));
  }

  async step(input: StepInput): Promise<ExecutedStep> {
    const { S, R } = this;
    // pipeline schedule + all-reduce on the workers
    // After an out-of-memory split, each planned micro-batch runs as consecutive pieces of at most rowsCap rows: the
    // same examples, padded length and loss normaliser (core/train/micro-split.ts), more micro-batches.
    const micro = input.micro.map((mbs) => capMicroBatchRows(mbs, this.rowsCap));
    const reps = await this.runOnAll(micro, input.step, input.epoch, input.labelTokens, input.lr, false)
      .catch((e: unknown) => { throw this.outOfMemory(e, micro, 'train', input.step + 1, (cap) => input.micro.map((mbs) => capMicroBatchRows(mbs, cap).length)) ?? e; });
    // global norm: Σ over stages of the stage's ‖g‖² (every replica holds the same reduced gradients)
    let normSq = 0;
    for (let st = 0; st < S; st++) {
      normSq += reps[0][st].stats!.gradNormSq;
      for (let r = 1; r < R; r++) if (reps[r][st].stats!.gradNormSq !== reps[0][st].stats!.gradNormSq) log.warn({ stage: st, replica: r }, 'replicas disagree on the reduced gradient norm (all-reduce results differ)');
    }
    const gradNorm = Math.sqrt(normSq);
    const clipCoef = clipCoefficient(gradNorm, this.job.training.max_grad_norm);
    // clip + AdamW everywhere
    await all(this.need().flat().map((w) => this.plane.request(w, { $case: 'applyUpdate', applyUpdate: { step: input.step, lr: input.lr, clipCoef } }, this.stepTimeout)));
    let lossSum = 0;
    for (let r = 0; r < R; r++) lossSum += reps[r][S - 1].stats!.lossSum;
    const stats = reps.flat().map((x) => x.stats!);
    const stageTimings: StageTiming[] = reps.flatMap((row, r) => row.map((x, st) => ({
      stage: st, replica: r, forwardSeconds: x.stats!.forwardSeconds, backwardSeconds: x.stats!.backwardSeconds, idleSeconds: x.stats!.idleSeconds,
      allreduceSeconds: x.stats!.allreduceSeconds, pipelineSeconds: x.stats!.pipelineSeconds,
      spans: x.stats!.spans.map((sp) => ({ kind: sp.kind as 'forward', micro: sp.micro, start: sp.start, end: sp.end })),
    })));
    const bubble = stats.reduce((a, x) => a + (x.pipelineSeconds > 0 ? x.idleSeconds / x.pipelineSeconds : 0), 0) / stats.length;
    log.debug({ step: input.step + 1, workers: stageTimings }, 'step timings');
    const grpcNow = stats.reduce((a, x) => a + x.grpcBytesSent, 0), natsNow = stats.reduce((a, x) => a + x.natsBytesSent, 0);
    const out = { lossSum, gradNorm, stageTimings, bubble, grpcBytes: grpcNow - this.grpcBefore, natsBytes: natsNow - this.natsBefore, eventLoopLagP99: Math.max(...stats.map((x) => x.eventLoopLagP99Seconds)) };
    this.grpcBefore = grpcNow; this.natsBefore = natsNow;
    this.plane.progress.step = input.step + 1; this.plane.progress.lastLoss = lossSum * input.gradScale;
    return out;
  }

  async evaluate(examples: readonly Example[]): Promise<{ loss: number; perplexity: number; tokens: number }> {
    const { S, R } = this;
    const size = Math.min(microBatchPlan(this.job).microBatchSize, this.rowsCap ?? Infinity);
    const batches = evalBatches(examples, size, this.padId, R);
    const reps = await this.runOnAll(batches, this.plane.progress.step, 0, 0, 0, true)
      .catch((e: unknown) => { throw this.outOfMemory(e, batches, 'eval', this.plane.progress.step, (cap) => evalBatches(examples, Math.min(size, cap), this.padId, R).map((b) => b.length)) ?? e; });
    let lossSum = 0, count = 0;
    for (let r = 0; r < R; r++) { lossSum += reps[r][S - 1].stats!.lossSum; count += reps[r][S - 1].stats!.labelTokens; }
    const loss = count > 0 ? lossSum / count : NaN;
    return { loss, perplexity: Math.exp(loss), tokens: count };
  }

  /** Collects every stage's state from replica 0. */
  async snapshot(withMoments: boolean): Promise<Snapshot> {
    const got = await all(this.need()[0].map(async (w, s) => {
      const rep = await this.plane.request(w, { $case: 'uploadState', uploadState: { step: this.plane.progress.step, includeMoments: withMoments } }, this.stepTimeout);
      const bytes = this.plane.takeState(w, rep.commandId);
      const st = decodeStageState(bytes, `state of stage ${s} from worker ${w.id}`);
      if (st.stage !== s) throw new CheckpointError(`worker ${w.id} sent the state of stage ${st.stage}, expected stage ${s}`);
      if (withMoments && !st.moments) throw new CheckpointError(`worker ${w.id} sent no optimizer moments for stage ${s}`);
      return { ...st, bytes: bytes.byteLength };
    }));
    return { modules: got.flatMap((g) => g.modules), moments: got.flatMap((g) => g.moments ?? []), bytes: got.reduce((a, g) => a + g.bytes, 0) };
  }

  /**
   * A worker that ran out of device memory. Micro-batches of more than one row: the rows cap halves, the split is
   * reported, and a MicroBatchSplitRetry tells the job loop to re-assign the stages (the aborted step ended their
   * all-reduce and pipeline state; re-assigning also frees whatever the failed step left on the device) and run on
   * from the last checkpoint with the smaller micro-batches. One row that does not fit: the job ends with an error
   * that names the worker, the size and what to change.
   */
  private outOfMemory(e: unknown, ran: readonly MicroBatch[][], phase: 'train' | 'eval', step: number, countAt: (cap: number) => number[]): Error | undefined {
    if (!(e instanceof WorkerCommandError) || !isOutOfMemory(e)) return undefined;
    const rows = Math.max(0, ...ran.flat().map((mb) => mb.B)), T = Math.max(0, ...ran.flat().map((mb) => mb.T));
    const t = this.job.training;
    const where = `worker ${e.workerId} (stage ${e.stage}, replica ${e.replica})`;
    if (rows <= 1) {
      return new BackendError(`${phase === 'train' ? `step ${step}` : `evaluation after step ${step}`}: ${where} ran out of device memory with micro-batches of ${rows} sequence(s) × ${T} tokens (training.micro_batch_size: ${t.micro_batch_size}), which cannot be split further: ${e.message}`, {
        hint: 'lower data.max_length, keep training.gradient_checkpointing on, add pipeline stages (distributed.stages), or use devices with more memory',
        cause: e,
      });
    }
    const toRows = halveRows(rows);
    this.rowsCap = toRows;
    const perReplica = (xs: number[]): number => Math.max(0, ...xs);
    const split: MicroBatchSplit = {
      step, phase, fromRows: rows, toRows, fromMicroBatches: perReplica(ran.map((r) => r.length)), toMicroBatches: perReplica(countAt(toRows)),
      error: e.message.split('\n')[0],
    };
    log.warn({ ...split }, `out of device memory on ${where}: micro-batch size ${rows} → ${toRows} for the rest of the run (the stages are re-assigned and the run goes on from the last checkpoint)`);
    this.onSplit?.(split);
    return new MicroBatchSplitRetry(split);
  }

  recoverable(e: unknown): boolean {
    return e instanceof MicroBatchSplitRetry || ((e instanceof WorkerLostError || e instanceof WorkerCommandError) && !isOutOfMemory(e));
  }

  pause(reason: string): void {
    this.plane.jobState = 'paused';
    for (const w of this.plane.ready()) this.plane.tell(w, { $case: 'abort', abort: { reason } });
    this.layout = undefined;
  }

  /** Sets the step counter the workers are told about (after a resume or a rollback). */
  atStep(step: number): void { this.plane.progress.step = step; }

  async close(o: { jobOver?: boolean } = {}): Promise<void> {
    const plane = this.plane;
    plane.jobState = 'done';
    plane.closing = true;
    if (o.jobOver ?? true) for (const w of plane.ready()) plane.tell(w, { $case: 'shutdown', shutdown: { reason: 'job finished' } });
    await this.workers?.stop();
    await plane.close();
    await this.nats?.stop();
  }
}
