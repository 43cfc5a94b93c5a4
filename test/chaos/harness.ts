// The chaos suite's harness: one small distributed job (2 stages × 2 replicas of local CPU workers, a private
// nats-server), run through the real CLI (`node bin/coordinator.js start -c job.yaml`) so the experiments do
// not depend on how the job loop is written inside. Faults are injected from outside, by process id, at
// seeded moments: after the coordinator has logged step k, plus a seeded delay.
//
// What every experiment asserts against the undisturbed run of the same job:
//   - the final adapter file is byte-identical;
//   - every sample was trained exactly once: the final trainer_state.json history has each step 1..N exactly
//     once, in order, with the reference's loss, learning rate and token count — the step plan is a pure
//     function of (seed, epoch, step), so equal per-step losses and tokens mean the same samples were trained
//     from the same weights, and a sample trained twice (or skipped) would shift every later step.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { Philox } from '../helpers/prng.ts';

export const ROOT = join(import.meta.dirname, '..', '..');
export const STEPS = 12;

/** Trials per experiment: 1 in `npm test`, $CHAOS_TRIALS in `npm run test:chaos`. */
export const TRIALS = Math.max(1, Number(process.env.CHAOS_TRIALS ?? 1));
/** Base seed of the fault moments ($CHAOS_SEED to replay a failure). */
export const SEED = Number(process.env.CHAOS_SEED ?? 20261206);

let assets: { model: string; trainPath: string; validationPath: string } | undefined;
export const work = mkdtempSync(join(tmpdir(), 'dqlora-chaos-'));

/** Writes job.yaml for output directory `out` (relative paths resolved by the CLI against the job file). */
export function writeJob(out: string, overrides: { distributed?: Record<string, unknown>; training?: Record<string, unknown> } = {}): string {
  assets ??= tinyExampleSetup(join(work, 'assets'));
  mkdirSync(out, { recursive: true });
  const job = {
    name: 'chaos', model: assets.model, output_dir: join(out, 'run'), backend: 'cpu',
    data: { train: assets.trainPath, max_length: 48 },
    lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: 'all-linear' },
    training: { max_steps: STEPS, micro_batch_size: 2, grad_accum: 2, lr: 3e-3, schedule: 'cosine', warmup_steps: 1, save_every: 2, keep_checkpoints: 3, log_every: 1, eval_every: 0, max_grad_norm: 0.05, ...overrides.training },
    distributed: { stages: 2, replicas: 2, workers: 'local', heartbeat_timeout_s: 2, step_timeout_s: 20, wait_timeout_s: 60, max_recoveries: 6, ...overrides.distributed },
  };
  const path = join(out, 'job.yaml');
  writeFileSync(path, stringify(job));
  return path;
}

export interface CliRun {
  readonly proc: ChildProcess;
  /** Resolves when the coordinator exits: its status, stdout and stderr. */
  readonly done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>;
  /** Resolves once the coordinator has logged optimizer step `k` (rejects if it exits first). */
  afterStep(k: number): Promise<void>;
  /** Steps the coordinator logged so far. */
  lastStep(): number;
}

/** Starts `coordinator start -c job.yaml` (JSON logs at info level on stderr, which the harness reads). */
export function startCli(jobPath: string, extraArgs: string[] = [], env: Record<string, string> = {}): CliRun {
  const proc = spawn(process.execPath, [join(ROOT, 'bin', 'coordinator.js'), 'start', '-c', jobPath, '--no-progress', ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DQLORA_LOG_LEVEL: 'info', DQLORA_LOG_FORMAT: 'json', NODE_TEST_CONTEXT: '', ...env },
  });
  let stdout = '', stderr = '', last = 0, buf = '';
  const waiters: { k: number; resolve(): void; reject(e: Error): void }[] = [];
  proc.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => {
    const text = d.toString();
    stderr += text;
    buf += text;
    const lines = buf.split('\n');
    buf = lines.pop()!;
    for (const l of lines) {
      if (!l.startsWith('{')) continue;
      try {
        // the job loop's per-step log line: {"mod": "job", "msg": "step", "step": k, "total": N, ...}
        const o = JSON.parse(l) as { mod?: string; msg?: string; step?: number; total?: number };
        if (o.msg === 'step' && typeof o.step === 'number' && typeof o.total === 'number') last = Math.max(last, o.step);
      } catch { /* a partial line of another process */ }
    }
    for (const w of waiters.filter((x) => last >= x.k)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(); }
  });
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) => {
    proc.on('exit', (code, signal) => {
      // stdio may still hold the last lines
      setTimeout(() => {
        for (const w of waiters.splice(0)) w.reject(new Error(`the coordinator exited (${code ?? signal}) before step ${w.k}:\n${stdout}\n${stderr.slice(-3000)}`));
        resolve({ code, signal, stdout, stderr });
      }, 50);
    });
  });
  return {
    proc, done, lastStep: () => last,
    afterStep: (k) => (last >= k ? Promise.resolve() : new Promise<void>((resolve, reject) => { waiters.push({ k, resolve, reject }); })),
  };
}

/** Children of `pid` (from /proc), recursively. */
export function descendants(pid: number): { pid: number; comm: string; cmdline: string }[] {
  const byParent = new Map<number, number[]>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const l = byParent.get(ppid) ?? [];
      l.push(Number(e));
      byParent.set(ppid, l);
    } catch { /* exited meanwhile */ }
  }
  const out: { pid: number; comm: string; cmdline: string }[] = [];
  const walk = (p: number): void => {
    for (const c of byParent.get(p) ?? []) {
      try {
        out.push({ pid: c, comm: readFileSync(`/proc/${c}/comm`, 'utf8').trim(), cmdline: readFileSync(`/proc/${c}/cmdline`, 'utf8').split('\0').join(' ') });
      } catch { continue; }
      walk(c);
    }
  };
  walk(pid);
  return out;
}

export const workerPids = (coordinatorPid: number): number[] => descendants(coordinatorPid).filter((p) => p.cmdline.includes('worker.js') && p.cmdline.includes(' start')).map((p) => p.pid);
export const natsPids = (coordinatorPid: number): number[] => descendants(coordinatorPid).filter((p) => p.comm === 'nats-server').map((p) => p.pid);

export function alive(pid: number): boolean {
  try { process.kill(pid, 0); } catch { return false; }
  // a zombie is dead for our purposes
  try { return !/^\S+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8')); } catch { return false; }
}

export async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * A seeded fault moment: after step k (1 ≤ k ≤ STEPS − 4) plus a delay of 0..maxDelayMs. A step takes ~0.2 s
 * here and the log line that announces it reaches the harness late on a loaded machine: the last steps are
 * left out so that the fault lands while the job still runs.
 */
export function faultMoment(experiment: number, trial: number, maxDelayMs = 300): { step: number; delayMs: number; pick: (n: number) => number } {
  const rng = new Philox(SEED + 1000 * experiment + trial);
  return { step: 1 + rng.int(STEPS - 4), delayMs: rng.int(maxDelayMs), pick: (n) => rng.int(n) };
}

export interface RunResult { adapter: Buffer; history: { step: number; loss: number; lr: number; tokens: number }[] }

/** The final adapter bytes and the final checkpoint's step history of a finished run under `out`. */
export function result(out: string): RunResult {
  const run = join(out, 'run');
  const adapter = readFileSync(join(run, 'adapter', 'adapter_model.safetensors'));
  const final = join(run, 'checkpoints', `step-${String(STEPS).padStart(6, '0')}`, 'trainer_state.json');
  if (!existsSync(final)) throw new Error(`no final checkpoint ${final}`);
  const st = JSON.parse(readFileSync(final, 'utf8')) as { history: RunResult['history'] };
  return { adapter, history: st.history.map((h) => ({ step: h.step, loss: h.loss, lr: h.lr, tokens: h.tokens })) };
}
