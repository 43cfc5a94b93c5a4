// Starts a real nats-server for a test on an OS-assigned free port (127.0.0.1 only).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface NatsServerHandle {
  url: string;
  port: number;
  /** Kills the server and removes its temp dir; resolves when the process has exited. */
  stop(): Promise<void>;
}

export interface NatsServerOptions {
  /** Server's max_payload in bytes (default: the server's own, 1 MiB). */
  maxPayload?: number;
  /** Extra nats-server config lines, e.g. `max_pending: 536870912`. */
  extraConfig?: string[];
}

/** Undefined when nats-server is on PATH; otherwise the reason, for `t.skip(...)` / `{ skip }`. */
export function natsServerMissing(): string | undefined {
  const r = spawnSync('nats-server', ['--version'], { stdio: 'ignore' });
  return r.error ? 'nats-server is not installed (apt-get install nats-server); skipping the NATS tests' : undefined;
}

/** A port the OS just handed out (there is a small window in which another process could take it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

function waitForPort(port: number, proc: ChildProcess, log: () => string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = (): void => {
      if (proc.exitCode !== null) return reject(new Error(`nats-server exited with code ${proc.exitCode} before listening on ${port}:\n${log()}`));
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(); });
      s.once('error', () => {
        s.destroy();
        if (Date.now() > deadline) reject(new Error(`nats-server did not listen on 127.0.0.1:${port} within ${timeoutMs} ms:\n${log()}`));
        else setTimeout(attempt, 25);
      });
    };
    attempt();
  });
}

export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServerHandle> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-nats-'));
  // Retry on the rare race where someone else takes the port between freePort() and the server's bind.
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const conf = path.join(dir, 'nats.conf');
    const lines = ['listen: "127.0.0.1:' + port + '"'];
    if (opts.maxPayload !== undefined) lines.push(`max_payload: ${opts.maxPayload}`);
    lines.push(...(opts.extraConfig ?? []));
    fs.writeFileSync(conf, lines.join('\n') + '\n');
    const proc = spawn('nats-server', ['-c', conf, '-a', '127.0.0.1', '-p', String(port)], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-4000); });
    try {
      await waitForPort(port, proc, () => stderr, 10_000);
    } catch (e) {
      proc.kill('SIGKILL');
      if (attempt < 3) continue;
      fs.rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    const exited = new Promise<void>((res) => (proc.exitCode !== null ? res() : proc.once('exit', () => res())));
    return {
      url: `nats://127.0.0.1:${port}`,
      port,
      async stop() {
        if (proc.exitCode === null) proc.kill('SIGTERM');
        const t = setTimeout(() => proc.kill('SIGKILL'), 3000);
        await exited;
        clearTimeout(t);
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  }
}

export interface ConfiguredNats {
  readonly url: string;
  /** HTTP monitoring port (/healthz). */
  readonly monitorPort: number;
  stop(): Promise<void>;
}

/**
 * Runs nats-server with a given config file (e.g. the one the manifests ship), moved to 127.0.0.1 and free client and
 * monitoring ports by -a/-p/-m (nothing else of the config changes); NATS_USER / NATS_PASSWORD come from `env`.
 * Resolves once the server accepts connections; a server that never does fails with its stderr.
 */
export async function startNatsWithConfig(confPath: string, env: Record<string, string>): Promise<ConfiguredNats> {
  const [port, mon] = [await freePort(), await freePort()];
  const proc = spawn('nats-server', ['-c', confPath, '-a', '127.0.0.1', '-p', String(port), '-m', String(mon)], {
    env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-4000); });
  const exited = new Promise<void>((res) => proc.once('exit', () => res()));
  const stop = async (): Promise<void> => { proc.kill('SIGTERM'); await exited; };
  const deadline = Date.now() + 10_000;
  try {
    await new Promise<void>((resolve, reject) => {
      const attempt = (): void => {
        const s = net.connect(port, '127.0.0.1');
        s.once('connect', () => { s.destroy(); resolve(); });
        s.once('error', () => { s.destroy(); if (Date.now() > deadline) reject(new Error(`nothing listens on ${port}\n${stderr}`)); else setTimeout(attempt, 25); });
      };
      attempt();
    });
  } catch (e) {
    await stop();
    throw e;
  }
  return { url: `nats://127.0.0.1:${port}`, monitorPort: mon, stop };
}
