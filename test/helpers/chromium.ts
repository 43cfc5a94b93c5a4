// Headless Chromium driven over the DevTools protocol (a small CDP client over `ws`): navigate, evaluate, wait
// for a condition, screenshot. Debian's `chromium` package (.ci/run installs it); tests skip without it.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';

export function chromiumPath(): string | null {
  for (const p of [process.env.CHROMIUM, 'chromium', 'chromium-browser', 'google-chrome']) {
    if (p && !spawnSync(p, ['--version'], { stdio: 'ignore' }).error) return p;
  }
  return null;
}

export class Browser {
  private id = 0;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly consoleErrors: string[] = [];

  private constructor(private readonly proc: ChildProcess, private readonly ws: WebSocket, private readonly profile: string) {
    // A browser that dies (or a socket that closes) fails every command still waiting for its answer.
    const fail = (why: string): void => { for (const p of this.pending.values()) p.reject(new Error(why)); this.pending.clear(); };
    proc.once('exit', (code, signal) => fail(`chromium exited (${code ?? signal})`));
    ws.once('close', () => fail('the DevTools socket closed'));
    ws.on('message', (raw) => {
      const m = JSON.parse(raw.toString()) as { id?: number; result?: unknown; error?: { message: string }; method?: string; params?: Record<string, unknown> };
      if (m.id !== undefined) {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        if (m.error) p?.reject(new Error(m.error.message)); else p?.resolve(m.result);
      } else if (m.method === 'Runtime.exceptionThrown') {
        this.consoleErrors.push(JSON.stringify((m.params as { exceptionDetails: unknown }).exceptionDetails));
      } else if (m.method === 'Runtime.consoleAPICalled' && (m.params as { type: string }).type === 'error') {
        this.consoleErrors.push(JSON.stringify((m.params as { args: unknown }).args));
      } else if (m.method === 'Log.entryAdded') {
        const e = (m.params as { entry: { level: string; text: string; url?: string } }).entry;
        if (e.level === 'error') this.consoleErrors.push(`${e.text} ${e.url ?? ''}`);
      }
    });
  }

  static async launch(exe: string, size = { width: 1280, height: 1400 }): Promise<Browser> {
    const profile = mkdtempSync(join(tmpdir(), 'dqlora-chromium-'));
    const proc = spawn(exe, ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check',
      '--remote-debugging-port=0', `--user-data-dir=${profile}`, `--window-size=${size.width},${size.height}`, 'about:blank'], { stdio: ['ignore', 'ignore', 'pipe'] });
    const wsUrl = await new Promise<string>((resolve, reject) => {
      let err = '';
      const timer = setTimeout(() => reject(new Error(`chromium did not start in 20 s:\n${err}`)), 20_000);
      proc.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        const m = /DevTools listening on (ws:\/\/\S+)/.exec(err);
        if (m) { clearTimeout(timer); resolve(m[1]); }
      });
      proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`chromium exited (${code}):\n${err}`)); });
    });
    const port = new URL(wsUrl).port;
    const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json() as { type: string; webSocketDebuggerUrl: string }[];
    const page = targets.find((t) => t.type === 'page');
    if (!page) throw new Error('chromium has no page target');
    const ws = new WebSocket(page.webSocketDebuggerUrl, { perMessageDeflate: false });
    await new Promise<void>((res, rej) => { ws.once('open', () => res()); ws.once('error', rej); });
    const b = new Browser(proc, ws, profile);
    await b.send('Runtime.enable');
    await b.send('Log.enable');
    await b.send('Page.enable');
    return b;
  }

  send(method: string, params: Record<string, unknown> = {}): Promise<unknown> {
    if (this.ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error(`chromium is gone (${method})`));
    const id = ++this.id;
    this.ws.send(JSON.stringify({ id, method, params }));
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
  }

  async navigate(url: string): Promise<void> { await this.send('Page.navigate', { url }); }

  /** Evaluates `expr` in the page (promises awaited) and returns its JSON value. */
  async eval<T>(expr: string): Promise<T> {
    const r = await this.send('Runtime.evaluate', { expression: expr, awaitPromise: true, returnByValue: true }) as { result: { value: T }; exceptionDetails?: { text: string; exception?: { description?: string } } };
    if (r.exceptionDetails) throw new Error(`page: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
    return r.result.value;
  }

  /** Polls `expr` until it is truthy; returns its value. */
  async waitFor<T>(expr: string, timeoutMs = 10_000, what = expr): Promise<T> {
    const t0 = Date.now();
    for (;;) {
      const v = await this.eval<T>(expr).catch(() => undefined);
      if (v) return v;
      if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async screenshot(): Promise<Buffer> {
    const r = await this.send('Page.captureScreenshot', { format: 'png', captureBeyondViewport: true }) as { data: string };
    return Buffer.from(r.data, 'base64');
  }

  async close(): Promise<void> {
    this.ws.close();
    const exited = (): boolean => this.proc.exitCode !== null || this.proc.signalCode !== null;
    if (!exited()) {
      const gone = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      const t = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(t);
    }
    // Chromium's helper processes may still be writing into the profile for a moment after the browser exits; a
    // profile they keep busy past the retries is left in the temp dir rather than failing the test that used it.
    try {
      rmSync(this.profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
    } catch (e) {
      process.stderr.write(`chromium profile ${this.profile} not removed: ${(e as Error).message}\n`);
    }
  }
}
