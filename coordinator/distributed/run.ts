// The distributed job (distributed.workers: 'local' | N): the coordinator holds no model tensors; S stages ×
// R replicas of workers do the math. One optimizer step, end to end (the same semantics as Trainer.step):
//
//   plan[step][replica][micro] (core/train/batch.ts) → micro-batches → gradScale = 1 / label tokens of
//   the whole step (all replicas) → RunStep to every worker → workers run 1F1B among themselves over the
//   Pipeline service, then all-reduce their stage's LoRA gradients over NATS → each reports ‖g_stage‖² and
//   (last stage) its loss sum → global norm, clip coefficient, scheduled lr → ApplyUpdate → AdamW on every
//   worker → one log line, metrics, (eval, checkpoint).
//
// Failures: a worker that dies, stalls or fails a command fails the step with its id, stage and replica.
// The job then pauses (Abort to the survivors), waits for enough workers (a replacement registering), and
// re-assigns every stage restoring the last checkpoint — or the initial state when there is none yet —
// then continues. Checkpoints are written by the coordinator only, atomically (coordinator/checkpoint.ts),
// from the workers' uploaded state, so a failure can never leave a torn one.
import { compareAnswers } from '../answer.ts';
import crypto from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { JobConfig } from '../job.ts';
import { loraConfigOf, type RunOptions, type RunOutcome } from '../run.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { saveAdapter, type LoraTensors } from '../../core/model/adapter.ts';
import type { LoraConfig } from '../../core/model/llama.ts';
import { buildDataset } from '../data/dataset.ts';
import { makeMicroBatch, planSteps, stepsPerEpoch, type MicroBatch } from '../../core/train/batch.ts';
import type { Example } from '../data/tokenize.ts';
import { lrMultiplier, warmupSteps } from '../../core/train/schedule.ts';
import { fingerprint, listCheckpoints, loadCheckpoint, saveCheckpoint, type OptimizerMoments, type TrainerState } from '../../common/checkpoint.ts';
import { ControlPlane, WorkerCommandError, WorkerLostError, type WorkerHandle } from './control.ts';
import { assignWorkers, planStages } from './plan.ts';
import { spawnLocalWorkers, startLocalNats, type LocalNats, type LocalWorkers } from './local.ts';
import { decodeStageState } from '../../wire/state.ts';
import type { WorkerTrainConfig } from '../../worker/runtime/stage-runner.ts';
import { i32ToTensor, u8ToTensor, DEFAULT_CHUNK_BYTES } from '../../wire/tensor.ts';
import { CheckpointError, ConfigError, DqloraError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import { createCoordinatorMetrics, serveMetrics, type MetricsServer } from '../../common/metrics.ts';
import type { MicroBatch as WireMicroBatch, StepReport } from '../../proto/gen/dqlora/v1/control.ts';

const log = logger('coordinator');

export interface DistributedOptions extends RunOptions {
  /** Control service address (overrides distributed.listen). */
  readonly listen?: string;
  /** NATS URL (overrides distributed.nats_url). */
  readonly natsUrl?: string;
  /** Job token workers must present (default: $DQLORA_JOB_TOKEN, else a random one — fine for local mode). */
  readonly jobToken?: string;
  /** Called once the Control service listens (tests and scripts start workers from here). */
  readonly onListening?: (address: string, jobToken: string) => void;
}

/** Per-step measurements (bench/distributed.ts reads them). */
export interface StepTiming {
  readonly step: number;
  readonly seconds: number;
  /** Mean over workers of idle / schedule wall time. */
  readonly bubble: number;
  readonly grpcBytes: number;
  readonly natsBytes: number;
  /** Slowest worker's all-reduce time in this step (s). */
  readonly allreduceSeconds: number;
  /** Slowest worker's time waiting on other stages (activation/gradient transfer + the bubble) (s). */
  readonly idleSeconds: number;
}

export interface DistributedOutcome extends RunOutcome {
  readonly timings: StepTiming[];
  readonly recoveries: number;
}

/** Any failure the job recovers from by rolling back to the last checkpoint. */
function recoverable(e: unknown): e is DqloraError {
  return e instanceof WorkerLostError || e instanceof WorkerCommandError;
}

/** Resolves with all values, or rejects with the first failure; later failures are swallowed (no unhandled rejections). */
function all<T>(ps: Promise<T>[]): Promise<T[]> {
  for (const p of ps) p.catch(() => { /* the first one is reported by Promise.all */ });
  return Promise.all(ps);
}

/**
 * Runs the job on workers, then — with local workers, once they have exited and freed their devices — answers
 * compare.prompts with the base and the fine-tuned model in this process (remote deployments print how to run
 * `coordinator generate` instead: the coordinator holds no model there).
 */
export async function runDistributed(job: JobConfig, opts: DistributedOptions = {}): Promise<DistributedOutcome> {
  const out = await trainDistributed(job, opts);
  const done = out.adapterDir === join(job.output_dir, 'adapter');
  if (!done || job.compare.prompts.length === 0) return out;
  if (job.distributed.workers !== 'local') {
    (opts.print ?? ((x: string) => process.stdout.write(x + '\n')))(`compare.prompts: answer them with \`coordinator generate --model ${job.model} --adapter ${out.adapterDir} ...\` (the coordinator holds no model in remote deployments)`);
    return out;
  }
  return { ...out, answers: await compareAnswers(job, out.adapterDir) };
}

async function trainDistributed(job: JobConfig, opts: DistributedOptions = {}): Promise<DistributedOutcome> {
  const print = opts.print ?? ((s: string) => process.stdout.write(s + '\n'));
  const d = job.distributed, t = job.training;
  const cfg = loadModelConfig(job.model);
  const tok = loadTokenizer(job.model);
  const lora = loraConfigOf(job, cfg);
  const S = d.stages === 'auto' ? 1 : d.stages;
  const R = d.replicas === 'auto' ? (typeof d.workers === 'number' ? Math.max(1, Math.floor(d.workers / S)) : 1) : d.replicas;
  const local = d.workers === 'local';
  if (typeof d.workers === 'number' && d.workers < S * R) throw new ConfigError(`distributed.workers = ${d.workers} is fewer than stages × replicas = ${S * R}`, { hint: 'every (stage, replica) needs its own worker; extra workers are kept as spares' });
  const { specs, bytes: stageBytes } = planStages(cfg, S);

  const ds = buildDataset({
    trainPath: job.data.train, validationPath: job.data.validation, validationSplit: job.data.validation_split || undefined,
    dedup: job.data.dedup, seed: t.seed, maxLength: job.data.max_length, onError: job.data.on_error,
  }, tok);
  if (ds.train.length === 0) throw new ConfigError('the training set is empty', { hint: 'check data.train (and the dedup / validation split settings)' });
  log.info({ ...ds.stats, train: ds.train.length, validation: ds.validation.length }, 'dataset ready');
  const padId = tok.padId ?? tok.eosId ?? 0;
  const planOpts = { microBatchSize: t.micro_batch_size, gradAccum: t.grad_accum, replicas: R, seed: t.seed };
  const spe = stepsPerEpoch(ds.train.length, planOpts);
  const totalSteps = t.max_steps ?? Math.ceil(t.epochs * spe);
  const warmup = warmupSteps(t.warmup_steps, totalSteps);
  // The same fingerprints as the single-process run (so R = 1 checkpoints move between the two); the
  // replica count changes which samples form a step, so it is part of the fingerprint when R > 1.
  const trainingFp = { ...t, resume: undefined, log_every: undefined, eval_every: undefined, save_every: undefined, keep_checkpoints: undefined };
  const configHash = fingerprint({ lora: job.lora, training: R === 1 ? trainingFp : { ...trainingFp, replicas: R }, quant: job.quantization, model: cfg.raw });
  const dataHash = fingerprint(ds.train.map((e) => Array.from(e.inputIds).concat([-1], Array.from(e.labels))));
  const fresh = (): TrainerState => ({ step: 0, totalSteps, stepsPerEpoch: spe, configHash, dataHash, history: [], evalHistory: [] });
  let state = fresh();

  mkdirSync(job.output_dir, { recursive: true });
  let lastCheckpoint = '';
  const restoreFrom = (dir: string): void => {
    const ck = loadCheckpoint(dir);
    if (ck.state.configHash !== configHash) throw new CheckpointError(`checkpoint ${dir} was written by a job with other training settings`, { hint: 'start a fresh run (training.resume: false or another output_dir), or restore the original job.yaml' });
    if (ck.state.dataHash !== dataHash) throw new CheckpointError(`checkpoint ${dir} was written for other training data`, { hint: 'the dataset changed since the checkpoint; start a fresh run' });
    state = { ...ck.state, history: [...ck.state.history], evalHistory: [...ck.state.evalHistory] };
    lastCheckpoint = dir;
  };
  if (t.resume !== false) {
    const dir = typeof t.resume === 'string' ? t.resume : listCheckpoints(job.output_dir).at(-1)?.dir;
    if (dir) {
      restoreFrom(dir);
      log.info({ checkpoint: dir, step: state.step }, 'resumed');
      print(`resumed from ${dir} at step ${state.step}/${totalSteps}`);
    } else if (typeof t.resume === 'string') throw new ConfigError(`training.resume: ${t.resume} does not exist`);
  }

  const jobId = `${job.name.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 40)}-${crypto.randomBytes(3).toString('hex')}`;
  const givenToken = opts.jobToken ?? process.env.DQLORA_JOB_TOKEN;
  if (!givenToken && !local) throw new ConfigError('remote workers need a job token: pass --job-token or set DQLORA_JOB_TOKEN (the same on the workers)');
  // Local workers get a random token through their environment (never on the command line or in logs).
  const jobToken = givenToken ?? crypto.randomBytes(16).toString('hex');
  const metrics = createCoordinatorMetrics({ defaultLabels: { job: job.name } });
  const hbTimeout = d.heartbeat_timeout_s * 1000;
  const plane = new ControlPlane({ jobId, jobToken, heartbeatIntervalMs: Math.max(100, Math.round(hbTimeout / 5)), heartbeatTimeoutMs: hbTimeout, metrics });
  plane.progress.totalSteps = totalSteps;
  let metricsServer: MetricsServer | undefined;
  let workers: LocalWorkers | undefined;
  let nats: LocalNats | undefined;
  const stepTimeout = d.step_timeout_s * 1000;
  try {
    const address = await plane.listen(opts.listen ?? d.listen);
    print(`coordinator: job ${jobId}, control service on ${address}, ${S} stage(s) × ${R} replica(s)`);
    if (d.metrics_port >= 0) { metricsServer = await serveMetrics(metrics.registry, d.metrics_port); log.info({ port: metricsServer.port }, 'metrics on /metrics'); }
    let natsUrl = opts.natsUrl ?? d.nats_url;
    if (R > 1 && !natsUrl) {
      if (!local) throw new ConfigError('distributed.replicas > 1 needs a NATS server for the gradient all-reduce', { hint: 'set distributed.nats_url or pass --nats nats://HOST:4222' });
      nats = await startLocalNats();
      natsUrl = nats.url;
    }
    opts.onListening?.(address, jobToken);
    if (local) workers = spawnLocalWorkers(S * R, { coordinator: address, jobToken, backend: job.backend });

    const trainConfig: WorkerTrainConfig = {
      seed: t.seed, beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weightDecay: t.weight_decay,
      blocksize: job.quantization.blocksize, doubleQuant: job.quantization.double_quant, gradientCheckpointing: t.gradient_checkpointing,
      stepTimeoutMs: stepTimeout, chunkBytes: DEFAULT_CHUNK_BYTES,
    };
    let layout: WorkerHandle[][] | undefined; // [replica][stage]
    let generation = 0, seq = 1, recoveries = 0;

    /** Waits for S×R connected workers, plans, and (re-)assigns every stage; restores `lastCheckpoint` when set. */
    const assign = async (): Promise<WorkerHandle[][]> => {
      plane.jobState = 'waiting-for-workers';
      const need = S * R;
      await plane.waitUntil(() => plane.ready().length >= need, d.wait_timeout_s * 1000, () => `waiting for ${need} workers (${plane.ready().length} connected)`);
      const ready = plane.ready().sort((a, b) => a.registeredAt - b.registeredAt || Number(a.id.slice(1)) - Number(b.id.slice(1)));
      const slots = assignWorkers(ready.map((w) => ({ id: w.id, freeMemoryBytes: Number(w.device?.freeMemoryBytes ?? 0), w })), stageBytes, R).map((row) => row.map((x) => x.w));
      for (const w of plane.workers.values()) { w.stage = -1; w.replica = -1; }
      generation++;
      const firstSeq = seq;
      plane.jobState = 'loading';
      const loraJson = JSON.stringify(lora satisfies LoraConfig);
      await all(slots.flatMap((row, r) => row.map((w, s) => {
        w.stage = s; w.replica = r;
        const sp = specs[s];
        return plane.request(w, { $case: 'assignStage', assignStage: {
          jobId, stageIndex: s, numStages: S, replicaIndex: r, numReplicas: R, firstLayer: sp.firstLayer, lastLayer: sp.lastLayer - 1,
          hasEmbedding: sp.hasEmbedding, hasHead: sp.hasHead, modelDir: job.model, loraConfigJson: loraJson, trainConfigJson: JSON.stringify(trainConfig),
          natsUrl: R > 1 ? natsUrl : '', prevStageAddress: s > 0 ? row[s - 1].address : '', nextStageAddress: s < S - 1 ? row[s + 1].address : '',
          resumeFromDir: lastCheckpoint, firstSeq, generation,
        } }, Math.max(stepTimeout, 600_000));
      })));
      log.info({ generation, layout: slots.map((row) => row.map((w) => w.id).join(' → ')), resumeFrom: lastCheckpoint || undefined, step: state.step }, 'stages assigned');
      plane.jobState = 'training';
      return slots;
    };

    const planCache = new Map<number, number[][][][]>();
    const planFor = (epoch: number): number[][][][] => {
      let p = planCache.get(epoch);
      if (!p) { planCache.clear(); p = planSteps(ds.train.length, { ...planOpts, epoch }); planCache.set(epoch, p); }
      return p;
    };

    const wireBatches = (mbs: MicroBatch[], s: number): WireMicroBatch[] => mbs.map((mb, i) => ({
      index: i,
      inputIds: s === 0 ? i32ToTensor(mb.ids, [mb.B, mb.T]) : undefined,
      targets: s === S - 1 ? i32ToTensor(mb.targets, [mb.B, mb.T]) : undefined,
      keyMask: u8ToTensor(Uint8Array.from(mb.keyMask), [mb.B, mb.T]),
      positions: i32ToTensor(mb.positions, [mb.B, mb.T]),
      sampleIds: i32ToTensor(mb.sampleIds, [mb.B]),
    }));

    /** Sends one RunStep per worker (micro-batches of replica r to replica r) and waits for every report. */
    const runOnAll = async (lay: WorkerHandle[][], perReplica: MicroBatch[][], step: number, epoch: number, labelTokens: number, lr: number, forwardOnly: boolean): Promise<StepReport[][]> => {
      const mySeq = seq++;
      const reqs = lay.map((row, r) => row.map((w, s) => plane.request(w, { $case: 'runStep', runStep: {
        step, epoch, microBatches: wireBatches(perReplica[r], s), lossNormaliser: labelTokens, lr, forwardOnly, seq: mySeq,
      } }, stepTimeout)));
      const flat = await all(reqs.flat());
      return lay.map((row, r) => row.map((_, s) => flat[r * S + s]));
    };

    let tokensSeen = 0, stepSeconds = 0;
    const timings: StepTiming[] = [];
    let grpcBytesBefore = 0, natsBytesBefore = 0;
    const trainStep = async (lay: WorkerHandle[][]): Promise<void> => {
      const s = state.step, t0 = performance.now();
      const epoch = Math.floor(s / spe);
      const plan = planFor(epoch)[s % spe];
      // 1. the step's micro-batches; the loss normaliser counts the label tokens of all replicas
      const micro = plan.map((rep) => rep.map((ix) => makeMicroBatch(ix.map((i) => ds.train[i]), { padId, sampleIds: ix })));
      const labelTokens = micro.flat().reduce((a, m) => a + m.labelCount, 0);
      const gradScale = labelTokens > 0 ? 1 / labelTokens : 0;
      const lr = t.lr * lrMultiplier(t.schedule, s, totalSteps, warmup);
      // 2. pipeline schedule + all-reduce on the workers
      const reps = await runOnAll(lay, micro, s, epoch, labelTokens, lr, false);
      // 3. global norm: Σ over stages of the stage's ‖g‖² (every replica holds the same reduced gradients)
      let normSq = 0;
      for (let st = 0; st < S; st++) {
        normSq += reps[0][st].stats!.gradNormSq;
        for (let r = 1; r < R; r++) if (reps[r][st].stats!.gradNormSq !== reps[0][st].stats!.gradNormSq) log.warn({ stage: st, replica: r }, 'replicas disagree on the reduced gradient norm (all-reduce results differ)');
      }
      const gradNorm = Math.sqrt(normSq);
      const coef = t.max_grad_norm > 0 ? Math.min(1, t.max_grad_norm / (gradNorm + 1e-6)) : 1;
      // 4. clip + AdamW everywhere
      await all(lay.flat().map((w) => plane.request(w, { $case: 'applyUpdate', applyUpdate: { step: s, lr, clipCoef: coef } }, stepTimeout)));
      let lossSum = 0;
      for (let r = 0; r < R; r++) lossSum += reps[r][S - 1].stats!.lossSum;
      const loss = lossSum * gradScale;
      let tokens = 0;
      for (const mb of micro.flat()) for (let i = 0; i < mb.keyMask.length; i++) tokens += mb.keyMask[i];
      state.step = s + 1;
      state.history.push({ step: s + 1, loss, lr, gradNorm, tokens });
      // measurements
      const seconds = (performance.now() - t0) / 1000;
      const all1 = reps.flat().map((x) => x.stats!);
      const bubble = all1.reduce((a, x) => a + (x.pipelineSeconds > 0 ? x.idleSeconds / x.pipelineSeconds : 0), 0) / all1.length;
      log.debug({ step: s + 1, workers: reps.flatMap((row, r) => row.map((x, st) => ({ stage: st, replica: r, fwd: +x.stats!.forwardSeconds.toFixed(3), bwd: +x.stats!.backwardSeconds.toFixed(3), idle: +x.stats!.idleSeconds.toFixed(3), schedule: +x.stats!.pipelineSeconds.toFixed(3), allreduce: +x.stats!.allreduceSeconds.toFixed(3) }))) }, 'step timings');
      const grpcNow = all1.reduce((a, x) => a + x.grpcBytesSent, 0), natsNow = all1.reduce((a, x) => a + x.natsBytesSent, 0);
      timings.push({ step: s + 1, seconds, bubble, grpcBytes: grpcNow - grpcBytesBefore, natsBytes: natsNow - natsBytesBefore,
        allreduceSeconds: Math.max(...all1.map((x) => x.allreduceSeconds)), idleSeconds: Math.max(...all1.map((x) => x.idleSeconds)) });
      grpcBytesBefore = grpcNow; natsBytesBefore = natsNow;
      tokensSeen += tokens; stepSeconds += seconds;
      metrics.loss.set(loss); metrics.learningRate.set(lr); metrics.gradNorm.set(gradNorm); metrics.tokensPerSecond.set(tokens / seconds);
      metrics.tokens.inc(tokens); metrics.steps.inc(); metrics.stepDuration.observe(seconds); metrics.pipelineBubble.set(bubble);
      reps.forEach((row) => row.forEach((x, st) => {
        metrics.stageDuration.observe({ stage: String(st), phase: 'forward' }, x.stats!.forwardSeconds);
        metrics.stageDuration.observe({ stage: String(st), phase: 'backward' }, x.stats!.backwardSeconds);
        if (R > 1) metrics.allReduceDuration.observe({ stage: String(st) }, x.stats!.allreduceSeconds);
      }));
      plane.progress.step = state.step; plane.progress.lastLoss = loss;
      if (state.step % t.log_every === 0) log.info({ step: state.step, total: totalSteps, loss: +loss.toFixed(5), lr, gradNorm: +gradNorm.toFixed(4), epoch: +(state.step / spe).toFixed(3), tokensPerSec: Math.round(tokens / seconds), bubble: +bubble.toFixed(3), ms: Math.round(seconds * 1000) }, 'step');
      if (!Number.isFinite(loss)) throw new ConfigError(`loss became ${loss} at step ${state.step}`, { hint: 'lower training.lr or check the data' });
    };

    const evaluate = async (lay: WorkerHandle[][], examples: Example[]): Promise<{ loss: number; perplexity: number; tokens: number }> => {
      const perReplica: MicroBatch[][] = Array.from({ length: R }, () => []);
      for (let i = 0, j = 0; i < examples.length; i += t.micro_batch_size, j++) {
        const ix = Array.from({ length: Math.min(t.micro_batch_size, examples.length - i) }, (_, k) => i + k);
        perReplica[j % R].push(makeMicroBatch(ix.map((k) => examples[k]), { padId, sampleIds: ix }));
      }
      const reps = await runOnAll(lay, perReplica, state.step, 0, 0, 0, true);
      let lossSum = 0, count = 0;
      for (let r = 0; r < R; r++) { lossSum += reps[r][S - 1].stats!.lossSum; count += reps[r][S - 1].stats!.labelTokens; }
      const loss = count > 0 ? lossSum / count : NaN;
      metrics.evalLoss.set(loss);
      return { loss, perplexity: Math.exp(loss), tokens: count };
    };

    /** Collects every stage's state (replica 0) and writes checkpoint `state.step`. */
    const collect = async (lay: WorkerHandle[][], includeMoments: boolean): Promise<{ modules: LoraTensors[]; moments: OptimizerMoments[]; bytes: number }> => {
      const got = await all(lay[0].map(async (w, s) => {
        const rep = await plane.request(w, { $case: 'uploadState', uploadState: { step: state.step, includeMoments } }, stepTimeout);
        const bytes = plane.takeState(w, rep.commandId);
        const st = decodeStageState(bytes, `state of stage ${s} from worker ${w.id}`);
        if (st.stage !== s) throw new CheckpointError(`worker ${w.id} sent the state of stage ${st.stage}, expected stage ${s}`);
        if (includeMoments && !st.moments) throw new CheckpointError(`worker ${w.id} sent no optimizer moments for stage ${s}`);
        return { ...st, bytes: bytes.byteLength };
      }));
      return { modules: got.flatMap((g) => g.modules), moments: got.flatMap((g) => g.moments ?? []), bytes: got.reduce((a, g) => a + g.bytes, 0) };
    };
    const checkpoint = async (lay: WorkerHandle[][]): Promise<{ dir: string; modules: LoraTensors[] }> => {
      const c0 = performance.now();
      const { modules, moments, bytes } = await collect(lay, true);
      const dir = saveCheckpoint(job.output_dir, { state, modules, moments, loraConfig: lora }, job.model, t.keep_checkpoints);
      lastCheckpoint = dir;
      metrics.checkpointDuration.observe((performance.now() - c0) / 1000); metrics.checkpointSize.set(bytes);
      log.info({ dir, step: state.step }, 'checkpoint written');
      return { dir, modules };
    };

    // ---- the job: (re)assign → steps → final checkpoint, adapter, eval; recover on worker failures ----
    const startStep = state.step;
    let first = state.history.at(-1)?.loss ?? NaN, last = NaN;
    const stopAt = opts.stopAfter !== undefined ? Math.min(totalSteps, startStep + opts.stopAfter) : totalSteps;
    const t0 = performance.now();
    let final: { dir: string; modules: LoraTensors[] } | undefined;
    let evalLoss: number | null = null;
    for (;;) {
      try {
        layout ??= await assign();
        while (state.step < stopAt) {
          await trainStep(layout);
          const r = state.history.at(-1)!;
          if (Number.isNaN(first)) first = r.loss;
          last = r.loss;
          if (t.eval_every > 0 && state.step % t.eval_every === 0 && ds.validation.length) {
            const ev = await evaluate(layout, ds.validation);
            state.evalHistory.push({ step: state.step, loss: ev.loss, perplexity: ev.perplexity });
            log.info({ step: state.step, evalLoss: +ev.loss.toFixed(5), perplexity: +ev.perplexity.toFixed(3) }, 'eval');
          }
          if (t.save_every > 0 && state.step % t.save_every === 0 && state.step < totalSteps) await checkpoint(layout);
        }
        final = await checkpoint(layout);
        if (state.step >= totalSteps && ds.validation.length) {
          const ev = await evaluate(layout, ds.validation);
          evalLoss = ev.loss;
          state.evalHistory.push({ step: state.step, loss: ev.loss, perplexity: ev.perplexity });
        }
        break;
      } catch (e) {
        if (!recoverable(e)) throw e;
        recoveries++;
        const msg = e.message.split('\n')[0];
        print(`worker failure at step ${state.step}: ${msg}`);
        if (recoveries > d.max_recoveries) throw new DqloraError(`giving up after ${d.max_recoveries} recoveries; last failure: ${msg}`, { cause: e, hint: 'check the workers\' logs; raise distributed.max_recoveries to keep trying' });
        plane.jobState = 'paused';
        for (const w of plane.ready()) plane.tell(w, { $case: 'abort', abort: { reason: msg } });
        layout = undefined;
        if (lastCheckpoint) restoreFrom(lastCheckpoint); else state = fresh();
        print(`paused; resuming from ${lastCheckpoint || 'the initial state'} (step ${state.step}) once ${S * R} workers are connected`);
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    if (state.step < totalSteps) {
      print(`stopped at step ${state.step}/${totalSteps}; checkpoint ${final!.dir}`);
      return { adapterDir: join(final!.dir, 'adapter'), steps: state.step, firstLoss: first, lastLoss: last, evalLoss: null, answers: [], tokensPerSecond: tokensSeen / stepSeconds, timings, recoveries };
    }
    const adapterDir = join(job.output_dir, 'adapter');
    saveAdapter(adapterDir, final!.modules, lora, job.model);
    const summary = { steps: state.step, firstLoss: first, lastLoss: last, evalLoss, tokensPerSecond: tokensSeen / stepSeconds, seconds: stepSeconds, wallSeconds: seconds, adapterDir, answers: [], dataset: ds.stats, distributed: { stages: S, replicas: R, recoveries } };
    writeFileSync(join(job.output_dir, 'summary.json'), JSON.stringify(summary, null, 1) + '\n');
    print(`trained ${state.step - startStep} steps in ${seconds.toFixed(1)} s (${(tokensSeen / stepSeconds).toFixed(0)} tokens/s while stepping): loss ${first.toFixed(4)} → ${last.toFixed(4)}${evalLoss !== null ? `, validation loss ${evalLoss.toFixed(4)} (perplexity ${Math.exp(evalLoss).toFixed(2)})` : ''}`);
    print(`adapter saved to ${adapterDir}`);
    return { adapterDir, steps: state.step, firstLoss: first, lastLoss: last, evalLoss, answers: [], tokensPerSecond: tokensSeen / stepSeconds, timings, recoveries };
  } finally {
    plane.jobState = 'done';
    plane.closing = true;
    for (const w of plane.ready()) plane.tell(w, { $case: 'shutdown', shutdown: { reason: 'job finished' } });
    await workers?.stop();
    await plane.close();
    await nats?.stop();
    await metricsServer?.close();
  }
}
