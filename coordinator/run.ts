// The job loop: where a reader sees a training run end to end, whatever executes the steps.
//
//   config → tokenizer + dataset → step plan (which samples, which lr) → fingerprints → resume from a checkpoint
//   → executor: the stages in this process, or on worker processes (coordinator/executor.ts)
//   → for each optimizer step: plan → executor.step (forward, backward, all-reduce, clip, AdamW) → record → observers
//     (log line / progress bar, metrics) → evaluation and checkpoints when due
//   → final checkpoint, adapter (PEFT), evaluation, before/after answers, summary.json.
//
// A recoverable executor failure (a lost worker) pauses the run, rolls back to the last checkpoint (or the initial
// state) and starts the executor again; the step plan depends only on the step number, so every sample is still
// trained exactly once.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { jobLayout, loraConfigOf, microBatchPlan, type JobConfig } from './job.ts';
import type { StepExecutor, StepTiming } from './executor.ts';
import { InProcessExecutor } from './in-process.ts';
import { WorkersExecutor, type WorkersOptions } from './distributed/workers.ts';
import type { Answer, JobObserver, MicroBatchEvent } from './events.ts';
import { notify } from './observers.ts';
import { startReporting, type Reporting } from './status/index.ts';
import { printAboveBar } from '../common/terminal.ts';
import { jobMetricsObserver } from './metrics-observer.ts';
import { checkRunLength, lingerForScrape, logRecover, type StopSignals } from './lifecycle.ts';
import { RecoveryBudget } from './distributed/recovery-budget.ts';
import { Backoff, isConnectionError, sleep } from '../common/connection.ts';
import { compareAnswers } from './answer.ts';
import { packingOptions, probeLength } from './features.ts';
import { buildDataset } from './data/dataset.ts';
import { createBackend } from '../core/engine/index.ts';
import type { Backend } from '../core/engine/backend.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { StepPlanner } from '../core/train/steps.ts';
import { MicroBatchSplitRetry, type MicroBatchSplit } from '../core/train/micro-split.ts';
import { checkFingerprints } from '../core/train/step.ts';
import { saveAdapter } from '../core/model/adapter.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { fingerprint, loadCheckpoint, newestValidCheckpoint, removeStaleTemps, saveCheckpoint, type Checkpoint, type TrainerState } from '../common/checkpoint.ts';
import { ConfigError, DqloraError } from '../common/errors.ts';
import { logger } from '../common/log.ts';
import { createCoordinatorMetrics, serveMetrics, type CoordinatorMetrics, type MetricsServer } from '../common/metrics.ts';

const log = logger('job');

export interface RunOutcome {
  readonly adapterDir: string;
  readonly steps: number;
  readonly firstLoss: number;
  readonly lastLoss: number;
  readonly evalLoss: number | null;
  readonly answers: Answer[];
  readonly tokensPerSecond: number;
  /** Per-step measurements (transfer and all-reduce fields are 0 in one process). */
  readonly timings: StepTiming[];
  /** Recoveries from lost workers during this invocation. */
  readonly recoveries: number;
  /** The micro-batch size asked for, auto's pick and every out-of-memory split (also in summary.json). */
  readonly microBatch: RunMicroBatch;
}

/** summary.json's `microBatch`. */
export interface RunMicroBatch {
  readonly requested: number | 'auto';
  /** Sequences per optimizer step and replica (unchanged by splits). */
  readonly batchSize: number;
  /** Sequences per micro-batch at the end of the run. */
  readonly rows: number;
  readonly auto?: { readonly rows: number; readonly probed: boolean; readonly tried: MicroBatchEvent['tried'] };
  readonly splits: readonly MicroBatchSplit[];
}

export interface RunOptions extends WorkersOptions {
  /** Show a progress bar on stderr (TTY) — otherwise a log line per `log_every` steps. */
  readonly progress?: boolean;
  /** Stop after this many optimizer steps in this invocation (tests of resume). */
  readonly stopAfter?: number;
  /** Print function for user-facing output (default: stdout). */
  readonly print?: (s: string) => void;
  /** The backend of an in-process run (default: job.backend). */
  readonly backend?: Backend;
  /** More observers of the run. */
  readonly observers?: JobObserver[];
  /**
   * The run's reporting (status page, train_log.jsonl, loss.svg, terminal) when the caller started it
   * (coordinator/status startReporting) and closes it; by default the loop starts its own from the job.
   */
  readonly reporting?: Reporting;
  /** SIGTERM/SIGINT (coordinator/lifecycle.ts installStopSignals): stop at the next step boundary with a checkpoint. */
  readonly stop?: StopSignals;
  /** Back-off between recoveries (default: 1 s doubling to 60 s). */
  readonly recoveryBackoff?: Backoff;
}

/** A run a stop signal ended: where it stopped and the checkpoint to resume from ('' = none yet). */
export interface StopInfo { readonly signalName: string; readonly step: number; readonly totalSteps: number; readonly checkpointDir: string }

/** What outlives the loop: the metrics and their server, for the final scrapes. */
interface Held { server?: MetricsServer; metrics?: CoordinatorMetrics; reporting?: Reporting }

/** runJob, then — with a metrics endpoint — its final state served for DQLORA_METRICS_LINGER_S before closing. */
export async function runJob(job: JobConfig, opts: RunOptions = {}): Promise<RunOutcome & { stopped?: StopInfo }> {
  const held: Held = {};
  try {
    return await runJobLoop(job, opts, held);
  } catch (e) {
    held.metrics?.setJobState('failed'); // also for failures before the first step (data, model, workers)
    throw e;
  } finally {
    await held.reporting?.close();
    if (held.server) {
      await lingerForScrape(undefined, opts.stop?.abort);
      await held.server.close();
    }
  }
}

async function runJobLoop(job: JobConfig, opts: RunOptions, held: Held): Promise<RunOutcome & { stopped?: StopInfo }> {
  // Printed lines go above the training bar (stdout and stderr are usually the same terminal).
  const print = printAboveBar(opts.print);
  const t = job.training, d = job.distributed;
  const distributed = d.workers !== 0;
  const { stages: S, replicas: R } = jobLayout(job);
  if (!distributed && R !== 1) {
    throw new ConfigError('distributed.replicas > 1 needs workers (distributed.workers: local or N)', { hint: 'use distributed.workers: local to start them on this machine' });
  }
  const be = distributed ? undefined : opts.backend ?? await createBackend(job.backend);
  const cfg = loadModelConfig(job.model);
  const tok = loadTokenizer(job.model);
  const lora = loraConfigOf(job, cfg);
  log.info({ backend: be?.name ?? job.backend, model: job.model, type: cfg.modelType, layers: cfg.numLayers, hidden: cfg.hiddenSize, stages: S, replicas: R, workers: d.workers }, 'loading');
  // /metrics and the probes' /healthz before the slow work (tokenizing a large dataset): a starting job is alive.
  const metrics = held.metrics = createCoordinatorMetrics({ defaultLabels: { job: job.name } });
  if (d.metrics_port >= 0) { held.server = await serveMetrics(metrics.registry, d.metrics_port); log.info({ port: held.server.port }, 'metrics on /metrics'); }
  // The status page, /status and /metrics on http_port, train_log.jsonl, loss.svg, TensorBoard files, the terminal.
  const reporting = opts.reporting ?? (held.reporting = await startReporting(job, { metrics, metricsFromEvents: false, progress: opts.progress, print }));

  // ---- data, step plan, fingerprints ----
  const ds = buildDataset({
    trainPath: job.data.train, validationPath: job.data.validation, validationSplit: job.data.validation_split || undefined,
    dedup: job.data.dedup, seed: t.seed, maxLength: job.data.max_length, onError: job.data.on_error,
  }, tok);
  log.info({ ...ds.stats, train: ds.train.length, validation: ds.validation.length }, 'dataset ready');
  const padId = tok.padId ?? tok.eosId ?? 0;
  // micro_batch_size: auto plans one micro-batch of batch_size per step until the probe (below) has picked the size.
  const mbPlan = microBatchPlan(job);
  let planner = new StepPlanner(ds.train, {
    epochs: t.epochs, maxSteps: t.max_steps, microBatchSize: mbPlan.microBatchSize, gradAccum: mbPlan.gradAccum, replicas: R,
    lr: t.lr, schedule: t.schedule, warmupSteps: t.warmup_steps, seed: t.seed, padId, packing: packingOptions(job),
  });
  const totalSteps = planner.totalSteps;
  // R = 1 runs share their fingerprint with a one-process run (either resumes the other's checkpoints); the replica
  // count changes which samples form a step, so it is part of the fingerprint when R > 1.
  // The run's length (max_steps, epochs) is checked apart (checkRunLength): a finished run may be extended.
  const trainingFp = { ...t, resume: undefined, log_every: undefined, eval_every: undefined, save_every: undefined, keep_checkpoints: undefined, max_steps: undefined, epochs: undefined };
  const fingerprints = {
    configHash: fingerprint({ lora: job.lora, training: R === 1 ? trainingFp : { ...trainingFp, replicas: R }, quant: job.quantization, model: cfg.raw }),
    dataHash: fingerprint(ds.train.map((e) => Array.from(e.inputIds).concat([-1], Array.from(e.labels)))),
  };
  const fresh = (): TrainerState => ({ step: 0, totalSteps, stepsPerEpoch: planner.stepsPerEpoch, ...fingerprints, history: [], evalHistory: [] });
  let state = fresh();

  // ---- resume ----
  mkdirSync(job.output_dir, { recursive: true });
  let lastCheckpoint: Checkpoint | undefined;
  const rollBackTo = (ck: Checkpoint | undefined): void => {
    state = ck ? { ...ck.state, totalSteps, history: [...ck.state.history], evalHistory: [...ck.state.evalHistory] } : fresh();
  };
  // Temp dirs of crashed checkpoint writes go; resume and recovery take the newest VALID checkpoint on disk
  // (what the workers will load), printing each newer one skipped and why.
  removeStaleTemps(job.output_dir);
  const newestValid = (maxStep?: number): Checkpoint | undefined => {
    const { checkpoint, skipped } = newestValidCheckpoint(job.output_dir, { maxStep });
    for (const k of skipped) print(`skipping checkpoint ${k.dir}: ${k.reason}`);
    return checkpoint;
  };
  if (t.resume !== false) {
    const found = typeof t.resume === 'string' ? undefined : newestValid();
    const dir = typeof t.resume === 'string' ? t.resume : found?.dir;
    if (dir) {
      const ck = found ?? loadCheckpoint(dir);
      checkFingerprints(dir, ck.state, fingerprints);
      if (checkRunLength(dir, ck.state, totalSteps) === 'extend') print(`extending the finished run of ${ck.state.totalSteps} steps to ${totalSteps}`);
      lastCheckpoint = ck;
      rollBackTo(ck);
      log.info({ checkpoint: dir, step: state.step }, 'resumed');
      print(`resumed from ${dir} at step ${state.step}/${totalSteps}`);
    } else if (typeof t.resume === 'string') throw new ConfigError(`training.resume: ${t.resume} does not exist`);
  }

  // ---- observers and the executor ----
  const jobMetrics = jobMetricsObserver(metrics, { replicas: R, microBatches: t.grad_accum, saveEvery: t.save_every });
  const observers: JobObserver[] = [...reporting.observers, jobMetrics, ...(opts.observers ?? [])];
  const backoff = opts.recoveryBackoff ?? new Backoff();
  // distributed.max_recoveries per 10 minutes, not per job: a long job survives occasional failures forever.
  const budget = new RecoveryBudget({ max: d.max_recoveries });
  let stoppedBy: string | undefined;
  /** When the current run of connection failures began (undefined: none since the last good step). */
  let outageSince: number | undefined;
  let executor: StepExecutor | undefined;
  const timings: StepTiming[] = [];
  let recoveries = 0;
  const startStep = state.step;
  let first = state.history.at(-1)?.loss ?? NaN, last = NaN;
  let tokensSeen = 0, stepSeconds = 0;
  const t0 = performance.now();
  let final: { dir: string; modules: Checkpoint['modules'] } | undefined;
  let evalLoss: number | null = null;
  let baseAnswers: string[] = [];
  // The micro-batch size in use: requested (or auto's pick), then each out-of-memory split (core/train/micro-split.ts).
  const microBatch: { -readonly [K in keyof RunMicroBatch]: RunMicroBatch[K] } & { splits: MicroBatchSplit[] } = {
    requested: t.micro_batch_size, batchSize: mbPlan.microBatchSize * mbPlan.gradAccum, rows: mbPlan.microBatchSize, splits: [],
  };
  const onSplit = (sp: MicroBatchSplit): void => {
    microBatch.splits.push(sp);
    microBatch.rows = sp.toRows;
    const where = sp.phase === 'train' ? `step ${sp.step}` : `evaluation after step ${sp.step}`;
    print(`${where}: out of device memory with micro-batches of ${sp.fromRows} sequence(s); running it again with micro-batches of ${sp.toRows} (${sp.fromMicroBatches} → ${sp.toMicroBatches} micro-batches per ${sp.phase === 'train' ? 'step' : 'evaluation'}: the same examples and loss normaliser) and keeping that size for the rest of the run`);
    notify(observers, 'onMicroBatch', { step: sp.phase === 'train' ? sp.step - 1 : sp.step, reason: 'out-of-memory', rows: sp.toRows, previousRows: sp.fromRows, batchSize: microBatch.batchSize, message: sp.error });
  };
  try {
    executor = distributed
      ? await WorkersExecutor.open(job, { ...opts, cfg, lora, stages: S, replicas: R, totalSteps, padId, metrics, print, onSplit, onWorkers: (ws) => { opts.onWorkers?.(ws); notify(observers, 'onWorkers', ws); } })
      : InProcessExecutor.open(job, { be: be!, cfg, lora, stages: S, tok, padId, microBatchSize: mbPlan.microBatchSize, progress: opts.progress, onSplit });
    const ex = executor;
    if (mbPlan.auto) {
      // Config validation keeps auto to one process (job.ts checkMicroBatchSettings).
      if (!(ex instanceof InProcessExecutor)) throw new ConfigError('training.micro_batch_size: auto needs a one-process run (distributed.workers: 0)');
      const T = probeLength(job, ds.train);
      const a = ex.autoMicroBatchSize(mbPlan.microBatchSize, T);
      planner = planner.withMicroBatchSize(a.rows);
      microBatch.rows = a.rows;
      microBatch.auto = a;
      const tried = a.tried.map((x) => `${x.rows} ${x.fits ? 'fits' : 'out of memory'}`).join(', ');
      print(`micro_batch_size: auto → ${a.rows} (gradient accumulation ${mbPlan.microBatchSize / a.rows} for batch_size ${mbPlan.microBatchSize}; ${a.probed ? `probed with ${T}-token sequences: ${tried}` : 'the cpu backend without DQLORA_MEM_LIMIT_BYTES is not probed'})`);
    }
    notify(observers, 'onStart', {
      name: job.name, outputDir: job.output_dir, totalSteps, startStep, stepsPerEpoch: planner.stepsPerEpoch, stages: S, replicas: R,
      executor: ex.kind, backend: ex.backend, trainExamples: ds.train.length, validationExamples: ds.validation.length, resumedFrom: lastCheckpoint?.dir,
    });
    notify(observers, 'onMicroBatch', { step: startStep, reason: mbPlan.auto ? 'auto' : 'requested', rows: microBatch.rows, batchSize: microBatch.batchSize, ...(microBatch.auto ? { tried: microBatch.auto.tried } : {}) });
    // Answers of the base model (LoRA branch off), for the before/after comparison (in-process: the model is here).
    if (ex.answer && job.compare.prompts.length) baseAnswers = ex.answer(job.compare.prompts, false);

    const evaluate = async (): Promise<number> => {
      const ev = await ex.evaluate(ds.validation);
      state.evalHistory.push({ step: state.step, loss: ev.loss, perplexity: ev.perplexity });
      notify(observers, 'onEval', { step: state.step, ...ev });
      return ev.loss;
    };
    const checkpoint = async (): Promise<{ dir: string; modules: Checkpoint['modules'] }> => {
      const c0 = performance.now();
      const snap = await ex.snapshot(true);
      const dir = saveCheckpoint(job.output_dir, { state, modules: snap.modules, moments: snap.moments, loraConfig: lora }, job.model, t.keep_checkpoints);
      lastCheckpoint = { dir, state: structuredClone(state), modules: snap.modules, moments: snap.moments, loraConfig: lora };
      notify(observers, 'onCheckpoint', { step: state.step, dir, bytes: snap.bytes, seconds: (performance.now() - c0) / 1000 });
      return { dir, modules: snap.modules };
    };

    // ---- the steps; recover from lost workers ----
    const stopAt = opts.stopAfter !== undefined ? Math.min(totalSteps, startStep + opts.stopAfter) : totalSteps;
    let started = false;
    for (;;) {
      try {
        if (!started) { await ex.start(lastCheckpoint); started = true; }
        while (state.step < stopAt) {
          // Signals are delivered by the event loop; an in-process step never yields to it, so let it turn once.
          if (opts.stop) await new Promise<void>((r) => setImmediate(r));
          if (opts.stop?.requested) { stoppedBy = opts.stop.signalName; jobMetrics.stopping(); break; }
          const s0 = performance.now();
          const input = planner.input(state.step);
          const out = await ex.step(input);
          const r = planner.record(state, input, out);
          const seconds = (performance.now() - s0) / 1000;
          tokensSeen += r.tokens; stepSeconds += seconds;
          if (Number.isNaN(first)) first = r.loss;
          last = r.loss;
          timings.push({ step: r.step, seconds, bubble: out.bubble, grpcBytes: out.grpcBytes, natsBytes: out.natsBytes,
            allreduceSeconds: Math.max(0, ...out.stageTimings.map((x) => x.allreduceSeconds)), idleSeconds: Math.max(0, ...out.stageTimings.map((x) => x.idleSeconds)), eventLoopLagP99: out.eventLoopLagP99, stages: out.stageTimings });
          notify(observers, 'onStep', { ...r, totalSteps, seconds, tokensPerSecond: tokensSeen / stepSeconds, bubble: out.bubble, stageTimings: out.stageTimings });
          backoff.reset(); outageSince = undefined;
          if (!Number.isFinite(r.loss)) throw new ConfigError(`loss became ${r.loss} at step ${r.step}`, { hint: 'lower training.lr or check the data' });
          if (t.eval_every > 0 && r.step % t.eval_every === 0 && ds.validation.length) await evaluate();
          if (t.save_every > 0 && r.step % t.save_every === 0 && r.step < totalSteps) await checkpoint();
        }
        final = await checkpoint();
        if (state.step >= totalSteps && ds.validation.length && !stoppedBy) {
          // The last step may have just been evaluated (eval_every divides it): the weights are the same, reuse it.
          const done = state.evalHistory.at(-1);
          evalLoss = done && done.step === state.step ? done.loss : await evaluate();
        }
        break;
      } catch (e) {
        if (!ex.recoverable(e)) throw e;
        // The workers stop; the loop goes on from the newest valid checkpoint (the one on disk may have been damaged
        // since) once start() has re-assigned the stages.
        const pauseAndRollBack = (reason: string): void => {
          ex.pause(reason);
          if (lastCheckpoint) lastCheckpoint = newestValid(state.step);
          rollBackTo(lastCheckpoint);
          started = false;
        };
        if (e instanceof MicroBatchSplitRetry) {
          // Not a failure (no recovery spent, no back-off): the steps since the last checkpoint run again with the
          // smaller micro-batches (onSplit has said so).
          pauseAndRollBack(e.message);
          print(`re-assigning the stages; going on from ${lastCheckpoint?.dir || 'the initial state'} (step ${state.step}) with micro-batches of ${e.split.toRows}`);
          continue;
        }
        const msg = (e as Error).message.split('\n')[0];
        // An outage (NATS restarting, connections refused) within distributed.outage_window_s is ridden out: the
        // same pause, roll-back and back-off, but it does not use up a recovery.
        const outage = isConnectionError(e) || /connection refused|ECONNREFUSED|ECONNRESET|UNAVAILABLE|cannot reach/i.test((e as Error).message);
        if (outage) outageSince ??= Date.now();
        const riddenOut = outage && Date.now() - outageSince! < d.outage_window_s * 1000;
        print(`worker failure at step ${state.step}: ${msg}`);
        // A counted failure spends the budget of the sliding window (and waits its growing back-off); an outage
        // being ridden out waits the outage back-off.
        let wait: number;
        if (riddenOut) wait = backoff.next();
        else { recoveries++; wait = budget.spend(msg); }
        const failedAt = state.step;
        pauseAndRollBack(msg);
        notify(observers, 'onRecovery', { step: state.step, attempt: recoveries, reason: msg, resumeFrom: lastCheckpoint?.dir ?? '' });
        logRecover({ step: failedAt, attempt: recoveries, maxRecoveries: d.max_recoveries, reason: msg, resumeFrom: lastCheckpoint?.dir ?? '', backoffMs: wait, ...(riddenOut ? { outageSeconds: (Date.now() - outageSince!) / 1000 } : {}) });
        print(`paused; resuming from ${lastCheckpoint?.dir || 'the initial state'} (step ${state.step}) in ${(wait / 1000).toFixed(1)} s, once ${S * R} workers are connected`);
        // A stop signal during the wait: the last checkpoint is the resume point (the workers are gone: no new one).
        if (!(await sleep(wait, opts.stop?.abort))) {
          stoppedBy = opts.stop?.signalName;
          final = lastCheckpoint ? { dir: lastCheckpoint.dir, modules: lastCheckpoint.modules } : undefined;
          break;
        }
      }
    }
  } catch (e) {
    notify(observers, 'onEnd', { status: 'failed', step: state.step, totalSteps, firstLoss: first, lastLoss: last, evalLoss, seconds: (performance.now() - t0) / 1000, tokensPerSecond: tokensSeen / stepSeconds, answers: [], error: (e as Error).message });
    throw e;
  } finally {
    await executor?.close({ jobOver: !stoppedBy });
  }
  const seconds = (performance.now() - t0) / 1000;
  const tokensPerSecond = tokensSeen / stepSeconds;
  const outcome = { steps: state.step, firstLoss: first, lastLoss: last, tokensPerSecond, timings, recoveries, microBatch };
  if (state.step < totalSteps || stoppedBy) {
    const ckDir = final?.dir ?? '';
    if (!stoppedBy) print(`stopped at step ${state.step}/${totalSteps}; checkpoint ${ckDir}`);
    const adapterDir = ckDir ? join(ckDir, 'adapter') : '';
    notify(observers, 'onEnd', { status: 'stopped', step: state.step, totalSteps, firstLoss: first, lastLoss: last, evalLoss: null, seconds, tokensPerSecond, adapterDir, answers: [] });
    return { ...outcome, adapterDir, evalLoss: null, answers: [], ...(stoppedBy ? { stopped: { signalName: stoppedBy, step: state.step, totalSteps, checkpointDir: ckDir } } : {}) };
  }

  // ---- outputs: adapter, before/after answers, summary ----
  const adapterDir = join(job.output_dir, 'adapter');
  saveAdapter(adapterDir, final!.modules, lora, job.model);
  let answers: Answer[] = [];
  const prompts = job.compare.prompts;
  if (prompts.length) {
    if (executor!.answer) {
      const tuned = executor!.answer(prompts, true);
      answers = prompts.map((p, i) => ({ prompt: p, base: baseAnswers[i], tuned: tuned[i] }));
    } else if (d.workers === 'local') {
      // The local workers have exited and freed their devices: the whole model fits in this process now.
      answers = await compareAnswers(job, adapterDir);
    } else {
      print(`compare.prompts: answer them with \`coordinator generate --model ${job.model} --adapter ${adapterDir} ...\` (the coordinator holds no model in remote deployments)`);
    }
  }
  const summary = {
    steps: state.step, firstLoss: first, lastLoss: last, evalLoss, tokensPerSecond, seconds: stepSeconds, wallSeconds: seconds, adapterDir,
    answers, dataset: ds.stats, microBatch, ...(distributed ? { distributed: { stages: S, replicas: R, recoveries } } : {}),
  };
  writeFileSync(join(job.output_dir, 'summary.json'), JSON.stringify(summary, null, 1) + '\n');
  print(`trained ${state.step - startStep} steps in ${seconds.toFixed(1)} s (${tokensPerSecond.toFixed(0)} tokens/s): loss ${first.toFixed(4)} → ${last.toFixed(4)}${evalLoss !== null ? `, validation loss ${evalLoss.toFixed(4)} (perplexity ${Math.exp(evalLoss).toFixed(2)})` : ''}`);
  print(`adapter saved to ${adapterDir}`);
  notify(observers, 'onEnd', { status: 'succeeded', step: state.step, totalSteps, firstLoss: first, lastLoss: last, evalLoss, seconds, tokensPerSecond, adapterDir, answers });
  return { ...outcome, adapterDir, evalLoss, answers };
}
