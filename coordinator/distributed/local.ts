// Local launcher (distributed.workers: 'local'): the real distributed path on one machine. Starts the
// worker processes (`node bin/worker.js start ...`) on 127.0.0.1 and, when replicas > 1 and no NATS URL
// was given, a private nats-server on a free loopback port. A worker that dies is replaced by a fresh one
// (a few times at most), which is what a supervisor (Kubernetes) does for remote workers; a worker that
// stalls (no heartbeat within the timeout, e.g. SIGSTOP) is killed (SIGKILL) so that it is replaced too.
//
// Nothing outlives the coordinator: every child gets a pipe on its stdin that only the coordinator holds.
// When the coordinator dies — even by kill -9 — the kernel closes it; workers exit on that (and when their
// parent pid changes: common/parent-watch.ts), and nats-server runs under a small sh watchdog that stops it
// then. The private nats-server requires per-job credentials (random user and password in its config file,
// passed to the local workers through their environment — never on a command line) and is restarted on the
// same port when it exits while the job runs.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cpuThreads } from '../../common/container.ts';
import { ConfigError, DqloraError } from '../../common/errors.ts';
import { forwardChildLog, logger } from '../../common/log.ts';
import { PARENT_PID_ENV } from '../../common/parent-watch.ts';
import type { ControlPlane } from './control.ts';

const log = logger('local');
const ROOT = join(import.meta.dirname, '..', '..');

export interface LocalWorkers {
  readonly pids: () => number[];
  /** SIGKILLs our child `pid` (a stalled worker) so that it is replaced; false when it is not one of ours. */
  kill(pid: number, why: string): boolean;
  stop(): Promise<void>;
}

/**
 * GPUs the local workers are spread over: $CUDA_VISIBLE_DEVICES when set, else the GPUs `nvidia-smi -L` lists;
 * empty when there is none (cpu workers, or no NVIDIA driver).
 */
export function localGpus(env: NodeJS.ProcessEnv = process.env): string[] {
  const vis = env.CUDA_VISIBLE_DEVICES;
  if (vis !== undefined && vis.trim() !== '') return vis.split(',').map((x) => x.trim()).filter((x) => x !== '' && x !== '-1');
  const r = spawnSync('nvidia-smi', ['-L'], { encoding: 'utf8', timeout: 10_000 });
  if (r.status !== 0 || !r.stdout) return [];
  return r.stdout.split('\n').map((l) => /^GPU (\d+):/.exec(l)?.[1]).filter((x): x is string => x !== undefined);
}

export interface LocalWorkerOptions {
  coordinator: string;
  jobToken: string;
  backend: string;
  maxRespawns?: number;
  gpus?: string[];
  /** Extra environment for the workers (the private nats-server's credentials: LocalNats.workerEnv). */
  env?: Record<string, string>;
}

/**
 * Spawns `n` workers that register with `coordinator`; respawns dead ones up to `maxRespawns` times in total.
 * With a cuda/auto backend and G GPUs, worker slot i sees only GPU i mod G (CUDA_VISIBLE_DEVICES), so S × R workers
 * spread one per GPU — or share GPUs round-robin when there are fewer GPUs than workers.
 */
export function spawnLocalWorkers(n: number, o: LocalWorkerOptions): LocalWorkers {
  const procs = new Set<ChildProcess>();
  let stopping = false, respawns = 0;
  const gpus = o.backend === 'cpu' ? [] : (o.gpus ?? localGpus());
  const start = (slot: number): void => {
    // Workers log JSON to a pipe; forwardChildLog prints their lines in this process's format, above the progress bar.
    // Secrets travel in the environment (readable only by this user), never in argv (visible in `ps`).
    const env: NodeJS.ProcessEnv = { ...process.env, ...o.env, DQLORA_JOB_TOKEN: o.jobToken, DQLORA_LOG_FORMAT: 'json', [PARENT_PID_ENV]: String(process.pid) };
    // CPU workers share this machine's cores: each gets its share (the stages of a pipeline compute in parallel).
    env.DQLORA_CPU_THREADS ??= String(Math.max(1, Math.floor(cpuThreads() / n)));
    if (gpus.length > 0) env.CUDA_VISIBLE_DEVICES = gpus[slot % gpus.length];
    // DQLORA_WORKER_ENTRY: another worker entry script (e.g. an esbuild bundle on a machine without node_modules).
    const entry = process.env.DQLORA_WORKER_ENTRY ?? join(ROOT, 'bin', 'worker.js');
    // stdin: a pipe only this process holds — it closes when the coordinator dies, and the worker exits then.
    const p = spawn(process.execPath, [entry, 'start', '--coordinator', o.coordinator, '--device', o.backend, '--listen', '127.0.0.1:0'], {
      stdio: ['pipe', 'inherit', 'pipe'], env,
    });
    forwardChildLog(p.stderr!);
    p.stdin!.on('error', () => { /* the worker is gone; its exit event says so */ });
    log.debug({ pid: p.pid, slot, gpu: env.CUDA_VISIBLE_DEVICES }, 'local worker started');
    procs.add(p);
    p.on('exit', (code, signal) => {
      procs.delete(p);
      if (stopping) return;
      log.warn({ pid: p.pid, code, signal }, 'local worker exited');
      if (respawns < (o.maxRespawns ?? 3)) { respawns++; log.info({ slot }, 'starting a replacement worker'); start(slot); }
    });
  };
  for (let i = 0; i < n; i++) start(i);
  return {
    pids: () => [...procs].map((p) => p.pid!).filter(Boolean),
    kill(pid, why) {
      const p = [...procs].find((x) => x.pid === pid);
      if (!p || stopping) return false;
      log.warn({ pid, why }, 'killing a stalled local worker (SIGKILL); a replacement starts when it has exited');
      p.kill('SIGKILL');
      return true;
    },
    async stop() {
      stopping = true;
      await Promise.all([...procs].map((p) => new Promise<void>((res) => {
        if (p.exitCode !== null || p.signalCode !== null) return res();
        const t = setTimeout(() => p.kill('SIGKILL'), 5000);
        p.once('exit', () => { clearTimeout(t); res(); });
        p.kill('SIGTERM');
        // A stopped (SIGSTOP) worker cannot act on SIGTERM; SIGCONT lets it.
        p.kill('SIGCONT');
      })));
    },
  };
}

/**
 * Kills local workers the control plane declares lost while they still run (stalled: SIGSTOP, a hung
 * event loop), so that spawnLocalWorkers replaces them; a worker that died is replaced already. Call once
 * after both exist: `superviseLocalWorkers(plane, workers)`.
 */
export function superviseLocalWorkers(plane: ControlPlane, workers: LocalWorkers): void {
  plane.onLost((w, err) => {
    if (plane.closing || w.pid === undefined) return;
    workers.kill(w.pid, err.message.split('\n')[0]);
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const a = s.address(); const port = typeof a === 'object' && a ? a.port : 0; s.close(() => resolve(port)); });
  });
}

export interface LocalNats {
  url: string;
  /** The per-job credentials, as the environment the workers read them from (DQLORA_NATS_USER / _PASSWORD). */
  workerEnv: Record<string, string>;
  /** Times the server was restarted after exiting while the job ran. */
  readonly restarts: () => number;
  /** The nats-server process id (changes on a restart); undefined between a crash and its restart. */
  readonly pid: () => number | undefined;
  stop(): Promise<void>;
}

/**
 * Runs `cmd args...` and stops it (SIGTERM) when this wrapper's stdin closes — i.e. when the process holding
 * the other end dies, however it dies. The wrapper exits with the command's status. sh, so that it works for
 * any binary (nats-server cannot watch its parent itself).
 */
const WATCHDOG_SH = [
  // fd 3 = the lifeline, taken before any `&`: an asynchronous list's stdin is /dev/null
  'exec 3<&0',
  '"$@" </dev/null 3<&- & child=$!',
  "trap 'kill -TERM $child 2>/dev/null' TERM INT HUP",
  '( while read -r _ <&3; do :; done; kill -TERM $child 2>/dev/null ) & watcher=$!',
  'exec 3<&-',
  'code=0; while kill -0 $child 2>/dev/null; do wait $child; code=$?; done',
  'kill $watcher 2>/dev/null; exit $code',
].join('\n');

/** Spawns `cmd` under the stdin watchdog (see WATCHDOG_SH); its stdin pipe is the lifeline. */
export function spawnWithLifeline(cmd: string, args: string[], stderr: 'pipe' | 'ignore' | 'inherit' = 'pipe'): ChildProcess {
  const p = spawn('/bin/sh', ['-c', WATCHDOG_SH, 'dqlora-watchdog', cmd, ...args], { stdio: ['pipe', 'ignore', stderr] });
  p.stdin!.on('error', () => { /* gone */ });
  return p;
}

/** The nats-server process under a watchdog started by spawnWithLifeline: the wrapper's child running nats-server (Linux /proc). */
function childPid(wrapperPid: number | undefined): number | undefined {
  if (wrapperPid === undefined) return undefined;
  try {
    for (const e of readdirSync('/proc')) {
      if (!/^\d+$/.test(e)) continue;
      try {
        const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
        const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        if (Number(rest[1]) === wrapperPid && stat.includes('(nats-server)')) return Number(e);
      } catch { /* exited meanwhile */ }
    }
  } catch { /* no /proc (not Linux): the pid is only for logs and tests */ }
  return undefined;
}

/**
 * Starts nats-server on a free loopback port with per-job credentials (max_payload 8 MiB: headroom; the all-reduce
 * caps its own messages at 1 MiB, which measured cheaper); restarts it on the same port (back-off 0.25 s → 5 s, at
 * most `maxRestarts`) when it exits.
 */
export async function startLocalNats(opts: { maxRestarts?: number } = {}): Promise<LocalNats> {
  if (spawnSync('nats-server', ['--version'], { stdio: 'ignore' }).error) {
    throw new ConfigError('distributed.replicas > 1 needs NATS for the gradient all-reduce, and nats-server is not on PATH', { hint: 'install nats-server (apt-get install nats-server) or pass --nats nats://HOST:4222' });
  }
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-nats-'));
  const user = `dqlora-${crypto.randomBytes(4).toString('hex')}`, password = crypto.randomBytes(24).toString('hex');
  const conf = join(dir, 'nats.conf');
  const run = async (port: number): Promise<ChildProcess | undefined> => {
    writeFileSync(conf, `listen: "127.0.0.1:${port}"\nmax_payload: 8388608\nauthorization {\n  user: "${user}"\n  password: "${password}"\n}\n`, { mode: 0o600 });
    const p = spawnWithLifeline('nats-server', ['-c', conf]);
    let err = '';
    p.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-2000); });
    if (await waitPort(port, p, 10_000)) return p;
    p.stdin!.end(); p.kill('SIGTERM');
    log.warn({ port, stderr: err.trim().split('\n').slice(-3).join(' | ') }, 'nats-server did not come up');
    return undefined;
  };
  let port = 0, proc: ChildProcess | undefined;
  for (let attempt = 0; attempt < 4 && !proc; attempt++) { port = await freePort(); proc = await run(port); }
  if (!proc) {
    rmSync(dir, { recursive: true, force: true });
    throw new DqloraError('could not start a local nats-server (4 attempts)');
  }
  log.info({ port, pid: childPid(proc.pid) }, 'local nats-server started (per-job credentials)');
  let stopping = false, restarts = 0;
  const maxRestarts = opts.maxRestarts ?? 20;
  const watch = (p: ChildProcess): void => {
    p.once('exit', (code, signal) => {
      if (stopping) return;
      proc = undefined;
      log.error({ port, code, signal }, 'the local nats-server exited; restarting it');
      void (async () => {
        for (let wait = 250; !stopping && restarts < maxRestarts; wait = Math.min(5000, wait * 2)) {
          restarts++;
          await new Promise((r) => setTimeout(r, wait));
          if (stopping) return;
          const q = await run(port);
          if (q) {
            if (stopping) { q.stdin!.end(); q.kill('SIGTERM'); return; }
            proc = q; watch(q);
            log.warn({ port, restarts }, 'local nats-server restarted');
            return;
          }
        }
        if (!stopping) log.error({ port, restarts }, 'giving up restarting the local nats-server');
      })();
    });
  };
  watch(proc);
  return {
    url: `nats://127.0.0.1:${port}`,
    workerEnv: { DQLORA_NATS_USER: user, DQLORA_NATS_PASSWORD: password },
    restarts: () => restarts,
    pid: () => childPid(proc?.pid),
    async stop() {
      stopping = true;
      const p = proc;
      if (p && p.exitCode === null && p.signalCode === null) {
        const exited = new Promise<void>((r) => p.once('exit', () => r()));
        p.stdin!.end(); p.kill('SIGTERM');
        const t = setTimeout(() => p.kill('SIGKILL'), 3000);
        await exited; clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function waitPort(port: number, p: ChildProcess, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve) => {
    const attempt = (): void => {
      if (p.exitCode !== null) return resolve(false);
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => { s.destroy(); if (Date.now() > deadline) resolve(false); else setTimeout(attempt, 25); });
    };
    attempt();
  });
}
