// `coordinator status [--url URL | --output DIR] [--json]`: the running job's /status in a terminal. Registered on
// the coordinator's commander program by registerStatusCli, which also adds the options the reporting needs:
// `--log-format json|pretty` (every command) and `start --http-port N`.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { ConfigError, DqloraError } from '../../common/errors.ts';
import { setLogFormat, type LogFormat } from '../../common/log.ts';
import type { StatusSnapshot } from './state.ts';
import { formatDuration } from './terminal.ts';
import { STATUS_FILE, STATUS_URL_FILE } from './index.ts';

/** `coordinator status` could not reach the job (a runtime failure, exit 1; a wrong invocation is a ConfigError, exit 2). */
export class StatusUnavailableError extends DqloraError {}

const num = (v: number | null, f: (x: number) => string): string => (v === null ? '–' : f(v));

/** The snapshot as terminal text (what `coordinator status` prints). */
export function formatStatus(s: StatusSnapshot, url = ''): string {
  const L: string[] = [];
  const j = s.job;
  L.push(`job ${j?.name ?? '?'} — ${s.state}${j ? ` (${j.executor === 'workers' ? `${j.stages} stage(s) × ${j.replicas} replica(s) of workers` : 'one process'}, backend ${j.backend})` : ''}${url ? `  ${url}` : ''}`);
  const pct = s.totalSteps ? ` (${((100 * s.step) / s.totalSteps).toFixed(0)} %)` : '';
  L.push(`step ${s.step}/${s.totalSteps}${pct}${s.epoch !== null ? `  epoch ${s.epoch.toFixed(2)}` : ''}  elapsed ${formatDuration(s.elapsedSeconds)}  ETA ${s.etaSeconds === null ? '–' : formatDuration(s.etaSeconds)}`);
  L.push(`loss ${num(s.loss, (x) => x.toFixed(4))}  eval loss ${num(s.evalLoss, (x) => x.toFixed(4))}${s.perplexity !== null ? ` (perplexity ${s.perplexity.toFixed(2)})` : ''}  lr ${num(s.lr, (x) => x.toExponential(3))}  grad norm ${num(s.gradNorm, (x) => x.toFixed(4))}`);
  L.push(`tokens/s ${num(s.tokensPerSecond, (x) => x.toFixed(0))} (mean ${num(s.meanTokensPerSecond, (x) => x.toFixed(0))})${s.bubble !== null && j?.executor === 'workers' ? `  pipeline bubble ${(100 * s.bubble).toFixed(1)} %` : ''}`);
  const c = s.lastCheckpoint;
  L.push(`last checkpoint: ${c ? `step ${c.step} → ${c.dir} (${(c.bytes / 2 ** 20).toFixed(2)} MiB, ${c.seconds.toFixed(2)} s)` : 'none yet'}`);
  const timing = new Map((s.lastStep?.stageTimings ?? []).map((t) => [`${t.stage}/${t.replica}`, t]));
  const rows = s.workers.length ? s.workers.map((w) => ({ id: w.id, stage: w.stage, replica: w.replica, state: w.state }))
    : [...timing.values()].map((t) => ({ id: '-', stage: t.stage, replica: t.replica, state: s.state }));
  if (rows.length) {
    L.push('workers / stages (last step, seconds):');
    L.push('  ' + ['id', 'stage', 'replica', 'state', 'forward', 'backward', 'waiting', 'all-reduce'].map((h, i) => h.padEnd(i === 0 ? 14 : 10)).join(''));
    for (const r of rows) {
      const t = timing.get(`${r.stage}/${r.replica}`);
      const cells = [r.id, String(r.stage), String(r.replica), r.state, ...(t ? [t.forwardSeconds, t.backwardSeconds, t.idleSeconds, t.allreduceSeconds].map((x) => x.toFixed(3)) : ['-', '-', '-', '-'])];
      L.push('  ' + cells.map((h, i) => h.padEnd(i === 0 ? 14 : 10)).join('').trimEnd());
    }
  }
  const mb = s.microBatch;
  if (mb) L.push(`micro-batch size ${mb.rows} of ${mb.batchSize} sequences per step${mb.reason === 'auto' ? ' (micro_batch_size: auto)' : ''}${mb.splits ? `, after ${mb.splits} out-of-memory split(s)` : ''}`);
  for (const r of s.recoveries) L.push(`recovery ${r.attempt} at step ${r.step}: ${r.reason} → resumed from ${r.resumeFrom || 'the initial state'}`);
  if (s.end?.error) L.push(`error: ${s.end.error}`);
  for (const a of s.answers) {
    L.push(`━━ ${a.prompt}`);
    L.push(`  base model : ${a.base || '(empty)'}`);
    L.push(`  fine-tuned : ${a.tuned || '(empty)'}`);
  }
  return L.join('\n');
}

/**
 * Where the status comes from: --url; else output_dir/status-url (a running job); else output_dir/status.json (the
 * final status of a job that has ended).
 */
export function resolveStatusSource(o: { url?: string; output?: string }): { url: string } | { file: string } {
  if (o.url) {
    let u: URL;
    try { u = new URL(o.url); } catch { throw new ConfigError(`--url ${o.url} is not a URL`, { hint: 'e.g. --url http://127.0.0.1:8470 (the job prints its status page URL at start)' }); }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new ConfigError(`--url ${o.url}: expected http:// or https://`);
    return { url: o.url.replace(/\/+$/, '') };
  }
  if (!o.output) throw new ConfigError('which job? give --url URL (printed when the job starts) or --output DIR (the job\'s output_dir)');
  const f = join(o.output, STATUS_URL_FILE), done = join(o.output, STATUS_FILE);
  if (existsSync(f)) return { url: readFileSync(f, 'utf8').trim() };
  if (existsSync(done)) return { file: done };
  throw new ConfigError(`neither ${f} nor ${done} exists`, { hint: 'is this a job\'s output_dir (with http_port ≥ 0 while it runs)? or give --url' });
}

export async function fetchStatus(url: string, timeoutMs = 5000): Promise<StatusSnapshot> {
  let res: Response;
  try {
    res = await fetch(`${url}/status`, { signal: AbortSignal.timeout(timeoutMs) });
  } catch (e) {
    const c = (e as { cause?: { code?: string; message?: string } }).cause;
    const cause = c?.code ?? c?.message ?? (e as Error).message;
    throw new StatusUnavailableError(`cannot reach ${url}/status (${cause})`, { hint: 'is the job still running? a finished job stops serving; its output_dir has train_log.jsonl and loss.svg' });
  }
  if (!res.ok) throw new StatusUnavailableError(`${url}/status answered HTTP ${res.status}`, { hint: 'is this the coordinator\'s status URL?' });
  return await res.json() as StatusSnapshot;
}

const portArg = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < -1 || n > 65535) throw new InvalidArgumentError('expected a port 0..65535 (0 = OS-assigned) or -1 (no HTTP server)');
  return n;
};

/** Adds `status`, the global `--log-format` and `start --http-port` to the coordinator's program. */
export function registerStatusCli(program: Command, print: (s: string) => void = (s) => process.stdout.write(s + '\n')): void {
  program.addOption(new Option('--log-format <format>', 'log lines on stderr: pretty (default on a terminal) or json').choices(['json', 'pretty']));
  program.hook('preAction', (cmd) => {
    const f = cmd.opts().logFormat as LogFormat | undefined;
    if (f) setLogFormat(f);
  });
  const start = program.commands.find((c) => c.name() === 'start');
  if (start) {
    start.addOption(new Option('--http-port <port>', 'serve the status page, /status and /metrics on this port (0 = OS-assigned, -1 = off; overrides http_port)').argParser(portArg));
    start.hook('preAction', (cmd) => {
      const p = cmd.opts().httpPort as number | undefined;
      if (p !== undefined) process.env.DQLORA_HTTP_PORT = String(p);
    });
  }
  program.command('status')
    .description("a running job's status: step, ETA, loss, eval loss, lr, grad norm, tokens/s, workers and stages, last checkpoint")
    .option('--url <url>', 'the status URL the job printed at start (http://HOST:PORT)')
    .option('--output <dir>', "the job's output_dir (reads the URL from output_dir/status-url)")
    .option('--json', 'print /status as JSON')
    .action(async (o: { url?: string; output?: string; json?: boolean }) => {
      const src = resolveStatusSource(o);
      const s = 'url' in src ? await fetchStatus(src.url) : JSON.parse(readFileSync(src.file, 'utf8')) as StatusSnapshot;
      print(o.json ? JSON.stringify(s, null, 1) : formatStatus(s, 'url' in src ? src.url : `(ended; ${src.file})`));
    });
}
