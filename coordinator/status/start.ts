// `coordinator start` with reporting, until the job loop calls startReporting itself: serves the status page and
// /metrics on http_port, writes train_log.jsonl, loss.svg (and TensorBoard files), and draws the training bar with
// log lines above it, all through runJob's `observers`. The loop still logs its own step/eval/checkpoint lines
// (consoleObserver, asked for lines instead of its cli-progress bar), so the terminal observer here draws the bar only.
// The worker table reaches the observers through the workers executor's onWorkers (the loop does not pass it yet).
import type { JobConfig } from '../job.ts';
import { runJob, type RunOptions } from '../run.ts';
import { startReporting } from './index.ts';
import { notify } from '../observers.ts';
import { printAboveBar } from '../../common/terminal.ts';

export async function runWithReporting(job: JobConfig, opts: RunOptions = {}): ReturnType<typeof runJob> {
  // stdout and stderr are usually the same terminal: a printed line clears the bar first and redraws it after
  const print = printAboveBar(opts.print);
  const reporting = await startReporting(job, { progress: opts.progress, terminal: opts.progress ? 'bar' : 'none', print });
  try {
    const observers = [...reporting.observers, ...(opts.observers ?? [])];
    return await runJob(job, { ...opts, print, progress: false, observers, onWorkers: (ws) => notify(observers, 'onWorkers', ws) });
  } finally {
    await reporting.close();
  }
}
