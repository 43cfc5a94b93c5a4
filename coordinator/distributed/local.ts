// Local launcher (distributed.workers: 'local'): the real distributed path on one machine. Starts the
// worker processes (`node bin/worker.js start ...`) on 127.0.0.1 and, when replicas > 1 and no NATS URL
// was given, a private nats-server on a free loopback port. A worker that dies is replaced by a fresh one
// (a few times at most), which is what a supervisor (Kubernetes) does for remote workers.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpuThreads } from '../../common/container.ts';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, DqloraError } from '../../common/errors.ts';
import { forwardChildLog, logger } from '../../common/log.ts';

const log = logger('local');
const ROOT = join(import.meta.dirname, '..', '..');

export interface LocalWorkers {
  readonly pids: () => number[];
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

/**
 * Spawns `n` workers that register with `coordinator`; respawns dead ones up to `maxRespawns` times in total.
 * With a cuda/auto backend and G GPUs, worker slot i sees only GPU i mod G (CUDA_VISIBLE_DEVICES), so S × R workers
 * spread one per GPU — or share GPUs round-robin when there are fewer GPUs than workers.
 */
export function spawnLocalWorkers(n: number, o: { coordinator: string; jobToken: string; backend: string; maxRespawns?: number; gpus?: string[] }): LocalWorkers {
  const procs = new Set<ChildProcess>();
  let stopping = false, respawns = 0;
  const gpus = o.backend === 'cpu' ? [] : (o.gpus ?? localGpus());
  const start = (slot: number): void => {
    // Workers log JSON to a pipe; forwardChildLog prints their lines in this process's format, above the progress bar.
    const env: NodeJS.ProcessEnv = { ...process.env, DQLORA_JOB_TOKEN: o.jobToken, DQLORA_LOG_FORMAT: 'json' };
    // CPU workers share this machine's cores: each gets its share (the stages of a pipeline compute in parallel).
    env.DQLORA_CPU_THREADS ??= String(Math.max(1, Math.floor(cpuThreads() / n)));
    if (gpus.length > 0) env.CUDA_VISIBLE_DEVICES = gpus[slot % gpus.length];
    // DQLORA_WORKER_ENTRY: another worker entry script (e.g. an esbuild bundle on a machine without node_modules).
    const entry = process.env.DQLORA_WORKER_ENTRY ?? join(ROOT, 'bin', 'worker.js');
    const p = spawn(process.execPath, [entry, 'start', '--coordinator', o.coordinator, '--device', o.backend, '--listen', '127.0.0.1:0'], {
      stdio: ['ignore', 'inherit', 'pipe'], env,
    });
    forwardChildLog(p.stderr!);
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
    async stop() {
      stopping = true;
      await Promise.all([...procs].map((p) => new Promise<void>((res) => {
        if (p.exitCode !== null || p.signalCode !== null) return res();
        const t = setTimeout(() => p.kill('SIGKILL'), 5000);
        p.once('exit', () => { clearTimeout(t); res(); });
        p.kill('SIGTERM');
      })));
    },
  };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const a = s.address(); const port = typeof a === 'object' && a ? a.port : 0; s.close(() => resolve(port)); });
  });
}

export interface LocalNats { url: string; stop(): Promise<void> }

/** Starts nats-server on a free loopback port (max_payload 8 MiB: fewer, larger all-reduce chunks). */
export async function startLocalNats(): Promise<LocalNats> {
  if (spawnSync('nats-server', ['--version'], { stdio: 'ignore' }).error) {
    throw new ConfigError('distributed.replicas > 1 needs NATS for the gradient all-reduce, and nats-server is not on PATH', { hint: 'install nats-server (apt-get install nats-server) or pass --nats nats://HOST:4222' });
  }
  const dir = mkdtempSync(join(tmpdir(), 'dqlora-nats-'));
  for (let attempt = 0; attempt < 4; attempt++) {
    const port = await freePort();
    const conf = join(dir, 'nats.conf');
    writeFileSync(conf, `listen: "127.0.0.1:${port}"\nmax_payload: 8388608\n`);
    const p = spawn('nats-server', ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-2000); });
    const up = await waitPort(port, p, 10_000);
    if (!up) { p.kill('SIGKILL'); continue; }
    log.info({ port }, 'local nats-server started');
    const exited = new Promise<void>((r) => (p.exitCode !== null ? r() : p.once('exit', () => r())));
    return {
      url: `nats://127.0.0.1:${port}`,
      async stop() {
        if (p.exitCode === null) p.kill('SIGTERM');
        const t = setTimeout(() => p.kill('SIGKILL'), 3000);
        await exited; clearTimeout(t);
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  rmSync(dir, { recursive: true, force: true });
  throw new DqloraError('could not start a local nats-server (4 attempts)');
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
