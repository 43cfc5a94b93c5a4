// A real one-process training run (runJob on the tiny example model), turned into the JobObserver events the job
// loop reports: until the loop calls observers itself, reporting tests replay these. Every number comes from the
// run's own files — the final checkpoint's trainer_state.json (loss, lr, grad norm, tokens per step; evaluations),
// summary.json (final eval loss, answers, seconds) and the checkpoint directories — none is made up. What the
// files do not hold (the example counts are recomputed from the same data): per-step wall time (summary seconds / steps, the same for every step) and stage timings (a
// one-process run has none).
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parseJob, type JobConfig } from '../../coordinator/job.ts';
import { runJob, type RunOutcome } from '../../coordinator/run.ts';
import { listCheckpoints, type TrainerState } from '../../common/checkpoint.ts';
import type { CheckpointEvent, EvalEvent, JobEndEvent, JobObserver, JobStartEvent, StepEvent } from '../../coordinator/events.ts';
import { tinyExampleSetup } from './tiny.ts';
import { buildDataset } from '../../coordinator/data/dataset.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';

export type RecordedEvent =
  | { kind: 'start'; e: JobStartEvent } | { kind: 'step'; e: StepEvent } | { kind: 'eval'; e: EvalEvent }
  | { kind: 'checkpoint'; e: CheckpointEvent } | { kind: 'end'; e: JobEndEvent };

export interface RecordedRun { job: JobConfig; outcome: RunOutcome; events: RecordedEvent[]; state: TrainerState }

function dirBytes(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) n += e.isDirectory() ? dirBytes(join(dir, e.name)) : statSync(join(dir, e.name)).size;
  return n;
}

export async function recordRealRun(work: string, o: { steps?: number; evalEvery?: number; saveEvery?: number } = {}): Promise<RecordedRun> {
  const { model, trainPath, validationPath, prompt } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  const steps = o.steps ?? 8;
  const job = parseJob({
    name: 'tiny', model, output_dir: join(work, 'run'), backend: 'cpu',
    data: { train: trainPath, validation: validationPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0, target_modules: 'all-linear' },
    training: { max_steps: steps, micro_batch_size: 8, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, eval_every: o.evalEvery ?? 4, save_every: o.saveEvery ?? 4, keep_checkpoints: 100, resume: false },
    compare: { prompts: [prompt], max_new_tokens: 6 },
  }, 'recorded run', work);
  const outcome = await runJob(job, { progress: false, print: () => {} });
  const cks = listCheckpoints(job.output_dir);
  const state = JSON.parse(readFileSync(join(cks.at(-1)!.dir, 'trainer_state.json'), 'utf8')) as TrainerState;
  const summary = JSON.parse(readFileSync(join(job.output_dir, 'summary.json'), 'utf8')) as { seconds: number; tokensPerSecond: number; evalLoss: number | null; answers: JobEndEvent['answers']; dataset: { train?: number } };
  const perStep = summary.seconds / state.history.length;
  const ds = buildDataset({ trainPath: job.data.train, validationPath: job.data.validation, dedup: job.data.dedup, seed: job.training.seed, maxLength: job.data.max_length, onError: job.data.on_error }, loadTokenizer(job.model));
  const events: RecordedEvent[] = [{ kind: 'start', e: {
    name: job.name, outputDir: job.output_dir, totalSteps: state.totalSteps, startStep: 0, stepsPerEpoch: state.stepsPerEpoch, stages: 1, replicas: 1,
    executor: 'in-process', backend: 'cpu', trainExamples: ds.train.length, validationExamples: ds.validation.length,
  } }];
  let tokens = 0;
  state.history.forEach((h, i) => {
    tokens += h.tokens;
    events.push({ kind: 'step', e: { step: h.step, totalSteps: state.totalSteps, loss: h.loss, lr: h.lr, gradNorm: h.gradNorm, tokens: h.tokens, labelTokens: 0,
      epoch: h.step / state.stepsPerEpoch, seconds: perStep, tokensPerSecond: tokens / (perStep * (i + 1)), bubble: 0, stageTimings: [] } });
    for (const ev of state.evalHistory.filter((x) => x.step === h.step)) events.push({ kind: 'eval', e: { step: ev.step, loss: ev.loss, perplexity: ev.perplexity, tokens: 0 } });
    for (const c of cks.filter((c) => c.step === h.step)) events.push({ kind: 'checkpoint', e: { step: c.step, dir: c.dir, bytes: dirBytes(c.dir), seconds: 0 } });
  });
  if (summary.evalLoss !== null) events.push({ kind: 'eval', e: { step: state.step, loss: summary.evalLoss, perplexity: Math.exp(summary.evalLoss), tokens: 0 } });
  events.push({ kind: 'end', e: { status: 'succeeded', step: state.step, totalSteps: state.totalSteps, firstLoss: outcome.firstLoss, lastLoss: outcome.lastLoss, evalLoss: outcome.evalLoss,
    seconds: summary.seconds, tokensPerSecond: summary.tokensPerSecond, adapterDir: outcome.adapterDir, answers: summary.answers } });
  return { job, outcome, events, state };
}

/** Feeds events to observers in order, as the loop does (an observer's exception fails the test here). */
export function replay(events: readonly RecordedEvent[], observers: readonly JobObserver[], until = Infinity): void {
  for (const r of events) {
    if (r.kind === 'step' && r.e.step > until) return;
    for (const o of observers) {
      switch (r.kind) {
        case 'start': o.onStart?.(r.e); break;
        case 'step': o.onStep?.(r.e); break;
        case 'eval': o.onEval?.(r.e); break;
        case 'checkpoint': o.onCheckpoint?.(r.e); break;
        case 'end': o.onEnd?.(r.e); break;
      }
    }
  }
}
