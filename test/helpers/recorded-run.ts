// A real one-process training run (runJob on the tiny example model) with a recording observer: the exact
// JobObserver events the job loop reported, for reporting tests to replay into observers at their own pace
// (a live page can be checked half-way, a resume can be staged). Nothing here is reconstructed or made up.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseJob, type JobConfig } from '../../coordinator/job.ts';
import { runJob, type RunOutcome } from '../../coordinator/run.ts';
import { listCheckpoints, type TrainerState } from '../../common/checkpoint.ts';
import type { CheckpointEvent, EvalEvent, JobEndEvent, JobObserver, JobStartEvent, RecoveryEvent, StepEvent } from '../../coordinator/events.ts';
import { tinyExampleSetup } from './tiny.ts';

export type RecordedEvent =
  | { kind: 'start'; e: JobStartEvent } | { kind: 'step'; e: StepEvent } | { kind: 'eval'; e: EvalEvent }
  | { kind: 'checkpoint'; e: CheckpointEvent } | { kind: 'recovery'; e: RecoveryEvent } | { kind: 'end'; e: JobEndEvent };

/** The final checkpoint's trainer_state.json: the run's own record of every step, to check reports against. */
export interface RecordedRun { job: JobConfig; outcome: RunOutcome; events: RecordedEvent[]; state: TrainerState }

export function recorder(events: RecordedEvent[]): JobObserver {
  return {
    onStart: (e) => { events.push({ kind: 'start', e: structuredClone(e) }); },
    onStep: (e) => { events.push({ kind: 'step', e: structuredClone(e) }); },
    onEval: (e) => { events.push({ kind: 'eval', e: structuredClone(e) }); },
    onCheckpoint: (e) => { events.push({ kind: 'checkpoint', e: structuredClone(e) }); },
    onRecovery: (e) => { events.push({ kind: 'recovery', e: structuredClone(e) }); },
    onEnd: (e) => { events.push({ kind: 'end', e: structuredClone(e) }); },
  };
}

/** The tiny job the reporting tests train: 8 steps, eval and checkpoint every 4, one compare prompt. */
export function tinyReportingJob(work: string, overrides: Record<string, unknown> = {}): JobConfig {
  const { model, trainPath, validationPath, prompt } = tinyExampleSetup(work, { shape: { numLayers: 2 } });
  return parseJob({
    name: 'tiny', model, output_dir: join(work, 'run'), backend: 'cpu',
    data: { train: trainPath, validation: validationPath, max_length: 64 },
    lora: { r: 4, alpha: 8, dropout: 0, target_modules: 'all-linear' },
    training: { max_steps: 8, micro_batch_size: 8, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, eval_every: 4, save_every: 4, keep_checkpoints: 100, resume: false },
    compare: { prompts: [prompt], max_new_tokens: 6 },
    ...overrides,
  }, 'tiny reporting job', work);
}

export async function recordRealRun(work: string, observers: JobObserver[] = []): Promise<RecordedRun> {
  const job = tinyReportingJob(work);
  const events: RecordedEvent[] = [];
  const outcome = await runJob(job, { progress: false, print: () => {}, observers: [recorder(events), ...observers] });
  const state = JSON.parse(readFileSync(join(listCheckpoints(job.output_dir).at(-1)!.dir, 'trainer_state.json'), 'utf8')) as TrainerState;
  return { job, outcome, events, state };
}

/** Feeds events to observers in order, as the loop does (here an observer's exception fails the test). */
export function replay(events: readonly RecordedEvent[], observers: readonly JobObserver[]): void {
  for (const r of events) {
    for (const o of observers) {
      switch (r.kind) {
        case 'start': o.onStart?.(r.e); break;
        case 'step': o.onStep?.(r.e); break;
        case 'eval': o.onEval?.(r.e); break;
        case 'checkpoint': o.onCheckpoint?.(r.e); break;
        case 'recovery': o.onRecovery?.(r.e); break;
        case 'end': o.onEnd?.(r.e); break;
      }
    }
  }
}
