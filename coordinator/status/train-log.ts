// output_dir/train_log.jsonl: one JSON object per logged step, evaluation and run end, with the keys of the Hugging
// Face Trainer's `log_history` (what LLaMA-Factory, Axolotl and plotting scripts written for them read):
//   step:  {"loss", "grad_norm", "learning_rate", "epoch", "step"}       every `log_every` steps
//   eval:  {"eval_loss", "eval_perplexity", "eval_tokens", "epoch", "step"}
//   end:   {"train_runtime", "train_loss", "train_tokens_per_second", "train_steps_per_second", "epoch", "step"}
// As in HF, a step line's "loss" is the mean over the steps since the previous line (log_every > 1 averages);
// "grad_norm" and "learning_rate" are the last step's (HF logs the scheduler's *next* rate; we log the rate the
// step used). A resumed run keeps the lines up to its start step and drops the rest, as HF restores log_history;
// a recovery that rolls back to a checkpoint does the same.
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { EvalEvent, JobEndEvent, JobObserver, JobStartEvent, RecoveryEvent, StepEvent } from '../events.ts';
import { FormatError } from '../../common/errors.ts';

export const TRAIN_LOG = 'train_log.jsonl';

export interface LogEntry {
  readonly step: number;
  readonly epoch: number;
  readonly loss?: number;
  readonly grad_norm?: number;
  readonly learning_rate?: number;
  readonly eval_loss?: number;
  readonly eval_perplexity?: number;
  readonly eval_tokens?: number;
  readonly train_runtime?: number;
  readonly train_loss?: number;
  readonly train_tokens_per_second?: number;
  readonly train_steps_per_second?: number;
}

/** Reads a train_log.jsonl; a malformed line is an error naming file:line. */
export function readTrainLog(path: string): LogEntry[] {
  if (!existsSync(path)) return [];
  const out: LogEntry[] = [];
  readFileSync(path, 'utf8').split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let v: unknown;
    try { v = JSON.parse(line); } catch (e) { throw new FormatError(`${path}:${i + 1}: not a JSON line (${(e as Error).message})`, { hint: 'the file is written by training; delete it or fix the line' }); }
    if (typeof v !== 'object' || v === null || typeof (v as LogEntry).step !== 'number') throw new FormatError(`${path}:${i + 1}: expected an object with a numeric "step"`);
    out.push(v as LogEntry);
  });
  return out;
}

export class TrainLogObserver implements JobObserver {
  private path = '';
  private pending: number[] = [];
  private epoch = 0;
  private losses: number[] = [];
  private seconds = 0;
  private tokens = 0;

  constructor(private readonly logEvery = 1) {
    if (!Number.isInteger(logEvery) || logEvery < 1) throw new RangeError(`log_every must be a positive integer, got ${logEvery}`);
  }

  onStart(e: JobStartEvent): void {
    mkdirSync(e.outputDir, { recursive: true });
    this.path = join(e.outputDir, TRAIN_LOG);
    this.truncateAfter(e.startStep);
  }

  /** A recovery rolled the run back to a checkpoint: the steps after it are trained (and logged) again. */
  onRecovery(e: RecoveryEvent): void {
    if (!this.path) return;
    this.truncateAfter(e.step);
    this.pending = [];
  }

  private truncateAfter(step: number): void {
    const kept = step > 0 ? readTrainLog(this.path).filter((x) => x.step <= step) : [];
    writeFileSync(this.path, kept.map((x) => JSON.stringify(x) + '\n').join(''));
  }

  onStep(e: StepEvent): void {
    this.epoch = e.epoch;
    this.pending.push(e.loss);
    this.losses.push(e.loss);
    this.seconds += e.seconds; this.tokens += e.tokens;
    if (e.step % this.logEvery !== 0 && e.step !== e.totalSteps) return;
    const loss = this.pending.reduce((a, b) => a + b, 0) / this.pending.length;
    this.pending = [];
    this.write({ loss, grad_norm: e.gradNorm, learning_rate: e.lr, epoch: e.epoch, step: e.step });
  }

  onEval(e: EvalEvent): void {
    this.write({ eval_loss: e.loss, eval_perplexity: e.perplexity, eval_tokens: e.tokens, epoch: this.epoch, step: e.step });
  }

  onEnd(e: JobEndEvent): void {
    if (!this.path || this.losses.length === 0) return;
    this.write({
      train_runtime: e.seconds, train_loss: this.losses.reduce((a, b) => a + b, 0) / this.losses.length,
      train_tokens_per_second: this.seconds > 0 ? this.tokens / this.seconds : 0,
      train_steps_per_second: e.seconds > 0 ? this.losses.length / e.seconds : 0,
      epoch: this.epoch, step: e.step,
    });
  }

  private write(entry: LogEntry): void {
    if (!this.path) return;
    appendFileSync(this.path, JSON.stringify(entry) + '\n');
  }
}
