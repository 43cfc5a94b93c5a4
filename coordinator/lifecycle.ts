// A job's life outside its steps: whether to run at all (a finished output_dir), how to stop on SIGTERM / SIGINT
// (checkpoint within the grace period, a documented exit code, the resume command), how long to wait between
// recoveries and outages (common/connection.ts), and how recover / fatal events are logged (structured JSON, one
// `event` field to filter on).
//
// The job loop calls these; none of them runs a step. Exit codes (documented in README "Exit codes"):
//   0   succeeded, or output_dir already holds the finished run (nothing to do)
//   1   failed: a fatal error (bad input, recoveries exhausted); the message says what to do
//   75  stopped by SIGTERM / SIGINT after writing a checkpoint: resumable (EX_TEMPFAIL; a Kubernetes Job's
//       podFailurePolicy ignores it, so a preempted coordinator does not count against backoffLimit)
//   130 interrupted without a checkpoint: a second signal, or no checkpoint within the grace period
import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { listCheckpoints } from '../common/checkpoint.ts';
import { DqloraError } from '../common/errors.ts';
import { sleep } from '../common/connection.ts';
import { logger, type Logger } from '../common/log.ts';

export { EXIT } from '../common/errors.ts';
import { EXIT } from '../common/errors.ts';

const log = logger('lifecycle');

// ---- a finished output_dir ------------------------------------------------------------------------------------

export interface FinishedRun {
  /** Optimizer steps done = the run's total. */
  readonly step: number;
  readonly totalSteps: number;
  readonly checkpointDir: string;
  readonly adapterDir: string;
  /** When summary.json was written. */
  readonly finishedAt: Date;
}

/**
 * The finished run in `outputDir`, or null. Finished = the final adapter and summary.json exist and the newest
 * complete checkpoint has done all its steps (the loop writes the final checkpoint before the adapter and the
 * summary last). Reads three small files; runs before any slow work (dataset, model).
 */
export function finishedRun(outputDir: string): FinishedRun | null {
  const summary = join(outputDir, 'summary.json');
  const adapterDir = join(outputDir, 'adapter');
  if (!existsSync(summary) || !existsSync(join(adapterDir, 'adapter_model.safetensors'))) return null;
  const newest = listCheckpoints(outputDir).at(-1);
  if (!newest) return null;
  let state: { step?: unknown; totalSteps?: unknown };
  try {
    state = JSON.parse(readFileSync(join(newest.dir, 'trainer_state.json'), 'utf8')) as typeof state;
  } catch {
    return null; // a torn state file: the loop's own checks report it when it resumes
  }
  if (typeof state.step !== 'number' || typeof state.totalSteps !== 'number' || state.step < state.totalSteps) return null;
  return { step: state.step, totalSteps: state.totalSteps, checkpointDir: newest.dir, adapterDir, finishedAt: statSync(summary).mtime };
}

export type StartDecision =
  | { readonly action: 'run' }
  /** Nothing to do: print `message`, exit 0, touch nothing. */
  | { readonly action: 'done'; readonly message: string; readonly finished: FinishedRun }
  /** --fresh on a finished run: train from step 0 (training.resume: false). */
  | { readonly action: 'fresh'; readonly message: string }
  /** --max-steps above the finished count: resume from the final checkpoint and train on. */
  | { readonly action: 'extend'; readonly message: string; readonly finished: FinishedRun };

/** What `coordinator start` does with `outputDir`, given --fresh and --max-steps. */
export function startDecision(outputDir: string, o: { fresh?: boolean; maxSteps?: number } = {}): StartDecision {
  const f = finishedRun(outputDir);
  if (!f) return { action: 'run' };
  if (o.fresh) return { action: 'fresh', message: `${outputDir} holds a finished run (${f.step} steps); --fresh: training again from step 0 (its checkpoints, adapter and summary are removed first)` };
  if (o.maxSteps !== undefined && o.maxSteps > f.step) {
    return { action: 'extend', finished: f, message: `${outputDir} holds a finished run of ${f.step} steps; --max-steps ${o.maxSteps}: resuming from ${f.checkpointDir} to train ${o.maxSteps - f.step} more` };
  }
  const why = o.maxSteps !== undefined ? ` (--max-steps ${o.maxSteps} is not above the ${f.step} steps done)` : '';
  return {
    action: 'done', finished: f,
    message: `${outputDir} already holds a finished run: ${f.step}/${f.totalSteps} steps, adapter ${f.adapterDir}, finished ${f.finishedAt.toISOString()}${why}. `
      + 'Nothing to do; nothing was changed. To train again from scratch pass --fresh; to train further pass --max-steps N with N above '
      + `${f.step}; or choose another output_dir.`,
  };
}

/**
 * --fresh: removes the earlier run's checkpoints, adapter and summary.json (nothing else in output_dir), so that
 * neither a later resume nor the finished-run check can pick up a checkpoint of the old run.
 */
export function clearRunOutputs(outputDir: string): string[] {
  const removed: string[] = [];
  for (const p of [join(outputDir, 'checkpoints'), join(outputDir, 'adapter'), join(outputDir, 'summary.json')]) {
    if (existsSync(p)) { rmSync(p, { recursive: true, force: true }); removed.push(p); }
  }
  return removed;
}

/**
 * A checkpoint's run length against this job's: equal, or a finished run extended (more steps; `--max-steps N`
 * above the finished count). Anything else would silently change the learning-rate schedule under the steps
 * already trained, so it is refused, naming both lengths. (The fingerprint leaves max_steps/epochs out so that an
 * extension can resume; this check keeps every other change of length out.)
 */
export function checkRunLength(dir: string, ck: { step: number; totalSteps: number }, totalSteps: number): 'same' | 'extend' {
  if (ck.totalSteps === totalSteps) return 'same';
  if (ck.step >= ck.totalSteps && totalSteps > ck.totalSteps) return 'extend';
  throw new DqloraError(`checkpoint ${dir} belongs to a run of ${ck.totalSteps} steps (at step ${ck.step}); this job has ${totalSteps}`, {
    hint: ck.step >= ck.totalSteps
      ? `that run is finished: --max-steps N above ${ck.totalSteps} trains further from it; --fresh starts over`
      : `training.max_steps / epochs changed mid-run: restore them to finish the run (${ck.totalSteps} steps), or start over with --fresh (or another output_dir)`,
  });
}

// ---- SIGTERM / SIGINT ------------------------------------------------------------------------------------------

export interface StopSignals {
  /** True once SIGTERM or SIGINT arrived: finish or abort the step in flight, checkpoint, exit EXIT.stopped. */
  readonly requested: boolean;
  /** The signal received ('SIGTERM' | 'SIGINT'), when requested. */
  readonly signalName: string | undefined;
  /** Aborted on the first signal: pass it to waits (back-off, worker waits) so they end at once. */
  readonly abort: AbortSignal;
  /** Resolves on the first signal. */
  readonly whenRequested: Promise<string>;
  /** Removes the handlers and the grace timer (call when the job ends). */
  dispose(): void;
}

export interface StopSignalOptions {
  /**
   * Time from the first signal to the forced exit (EXIT.interrupted) when the checkpoint is not written by then.
   * Default: DQLORA_STOP_GRACE_S, else 50 s. Keep it below the pod's terminationGracePeriodSeconds (the kubelet
   * SIGKILLs after that): the manifests set 90 s and DQLORA_STOP_GRACE_S=75.
   */
  readonly graceMs?: number;
  /** For tests: the process whose signals to handle, and how to exit. */
  readonly proc?: Pick<NodeJS.Process, 'on' | 'off'>;
  readonly exit?: (code: number) => void;
  readonly log?: Logger;
}

export function defaultGraceMs(env: NodeJS.ProcessEnv = process.env): number {
  const s = Number(env.DQLORA_STOP_GRACE_S);
  return Number.isFinite(s) && s > 0 ? s * 1000 : 50_000;
}

/**
 * Handles SIGTERM and SIGINT: the first asks the loop to stop (it writes a checkpoint and exits EXIT.stopped);
 * a second one, or the grace period running out, exits at once with EXIT.interrupted.
 */
export function installStopSignals(o: StopSignalOptions = {}): StopSignals {
  const proc = o.proc ?? process;
  const exit = o.exit ?? ((c: number) => process.exit(c));
  const l = o.log ?? log;
  const graceMs = o.graceMs ?? defaultGraceMs();
  const ac = new AbortController();
  let signalName: string | undefined;
  let resolve!: (s: string) => void;
  const whenRequested = new Promise<string>((r) => { resolve = r; });
  let timer: NodeJS.Timeout | undefined;
  const handler = (sig: NodeJS.Signals): void => {
    if (signalName) {
      l.warn({ event: 'stop', signal: sig, forced: true }, `${sig} again: exiting now without a checkpoint`);
      exit(EXIT.interrupted);
      return;
    }
    signalName = sig;
    l.warn({ event: 'stop', signal: sig, graceSeconds: graceMs / 1000 }, `${sig}: stopping after a checkpoint (again to exit at once)`);
    timer = setTimeout(() => {
      l.error({ event: 'stop', signal: sig, forced: true, graceSeconds: graceMs / 1000 }, `no checkpoint within ${graceMs / 1000} s of ${sig}: exiting without one`);
      exit(EXIT.interrupted);
    }, graceMs);
    timer.unref();
    ac.abort(new StopRequested(sig));
    resolve(sig);
  };
  proc.on('SIGTERM', handler);
  proc.on('SIGINT', handler);
  return {
    get requested() { return signalName !== undefined; },
    get signalName() { return signalName; },
    abort: ac.signal,
    whenRequested,
    dispose() {
      proc.off('SIGTERM', handler);
      proc.off('SIGINT', handler);
      if (timer) clearTimeout(timer);
    },
  };
}

/** The abort reason of StopSignals.abort: a wait cut short by a stop request (not a failure). */
export class StopRequested extends DqloraError {
  constructor(readonly signalName: string) { super(`stopped by ${signalName}`); }
}

/**
 * The command that resumes this run: the same invocation without --stop-after and --fresh (a resume must not
 * start over). `argv` is process.argv; the program is shown as `npx coordinator`.
 */
export function resumeCommand(argv: readonly string[] = process.argv): string {
  const args = argv.slice(2);
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--fresh') continue;
    if (a === '--stop-after') { i++; continue; }
    if (a.startsWith('--stop-after=')) continue;
    out.push(a);
  }
  return ['npx coordinator', ...out.map(shellQuote)].join(' ');
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The lines printed when a signal stopped the run after its checkpoint. */
export function stoppedMessage(o: { signalName: string; step: number; totalSteps: number; checkpointDir: string; argv?: readonly string[] }): string {
  return `stopped by ${o.signalName} at step ${o.step}/${o.totalSteps}; checkpoint ${o.checkpointDir}\n`
    + `resume with: ${resumeCommand(o.argv)}\n`
    + `(exit code ${EXIT.stopped}: stopped, resumable)`;
}

// Back-off, sleep, connection errors and riding out outages live in common/connection.ts (workers use them too).

// ---- structured recover / fatal events --------------------------------------------------------------------------

export interface RecoverEventFields {
  readonly step: number;
  readonly attempt: number;
  readonly maxRecoveries: number;
  readonly reason: string;
  readonly resumeFrom: string;
  readonly backoffMs: number;
  readonly worker?: string;
  readonly stage?: number;
  /** Set when the failure is part of a connection outage being ridden out (not counted as a recovery). */
  readonly outageSeconds?: number;
}

/** One JSON log line per recovery: {event: "recover", step, attempt, maxRecoveries, reason, resumeFrom, backoffMs, …}. */
export function logRecover(f: RecoverEventFields, l: Logger = log): void {
  l.warn({ event: 'recover', ...f }, `recovering (${f.attempt}/${f.maxRecoveries}) from step ${f.step}: ${f.reason}; resuming from ${f.resumeFrom || 'the initial state'} in ${(f.backoffMs / 1000).toFixed(1)} s`);
}

/** The fatal error as one JSON log line: {event: "fatal", error, hint?, kind, step?}; no stack for user mistakes. */
export function logFatal(e: unknown, ctx: { step?: number } = {}, l: Logger = log): void {
  const user = e instanceof DqloraError;
  const msg = e instanceof Error ? e.message.split('\n  hint: ')[0] : String(e);
  l.fatal({
    event: 'fatal', kind: e instanceof Error ? e.name : typeof e, error: msg,
    ...(user && e.hint ? { hint: e.hint } : {}), ...ctx,
    ...(!user && e instanceof Error ? { stack: e.stack } : {}),
  }, `job failed: ${msg}`);
}

// ---- the last scrape ----------------------------------------------------------------------------------------------

/**
 * Keeps the process (and its /metrics) up for `ms` after the job ended, so Prometheus scrapes the final state
 * (job state succeeded/failed, last loss, eval loss). Ends early on SIGTERM/SIGINT. Default from
 * DQLORA_METRICS_LINGER_S (the manifests set 2 scrape intervals), else 0.
 */
export async function lingerForScrape(ms = Number(process.env.DQLORA_METRICS_LINGER_S ?? 0) * 1000, abort?: AbortSignal): Promise<void> {
  if (!(ms > 0)) return;
  log.info({ event: 'linger', seconds: ms / 1000 }, 'job ended: serving the final metrics before exiting');
  await sleep(ms, abort);
}
