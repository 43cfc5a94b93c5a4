// The job token comes from --job-token-file or DQLORA_JOB_TOKEN, never needs the command line: the file's
// token (trailing newline dropped) is the one presented to the coordinator; a missing or empty file is a
// clear error; --job-token still works but warns that `ps` shows it.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { resolveJobToken } from '../../common/job-token.ts';
import { ConfigError } from '../../common/errors.ts';
import { ControlPlane } from '../../coordinator/distributed/control.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const dir = mkdtempSync(join(tmpdir(), 'dqlora-token-'));
const file = (name: string, text: string, mode = 0o600): string => { const p = join(dir, name); writeFileSync(p, text); chmodSync(p, mode); return p; };

test('resolveJobToken: the file first (whitespace trimmed), then the environment, then the deprecated argument with a warning', () => {
  const warnings: string[] = [];
  const warn = (l: string): void => { warnings.push(l); };
  assert.equal(resolveJobToken({ file: file('t1', 'abc123\n'), env: { DQLORA_JOB_TOKEN: 'env' }, warn }), 'abc123');
  assert.equal(resolveJobToken({ env: { DQLORA_JOB_TOKEN: ' env-token\n' }, warn }), 'env-token');
  assert.equal(resolveJobToken({ env: {}, warn }), undefined);
  assert.deepEqual(warnings, []);
  assert.equal(resolveJobToken({ arg: 'visible', env: {}, warn }), 'visible');
  assert.match(warnings[0], /--job-token puts the secret on the command line, where every user can read it \(ps\)/);
  resolveJobToken({ file: file('t2', 'tok', 0o644), env: {}, warn });
  assert.match(warnings[1], /is readable by other users; chmod 600 it/);
  const bad: [Parameters<typeof resolveJobToken>[0], RegExp][] = [
    [{ file: join(dir, 'missing') }, /--job-token-file .*missing: cannot read it \(ENOENT\)/],
    [{ file: file('t3', '\n\n') }, /is empty/],
    [{ file: file('t4', 'two\nlines\n') }, /contains whitespace/],
    [{ file: file('t5', 'x'), arg: 'y' }, /both --job-token-file and --job-token/],
  ];
  for (const [s, re] of bad) assert.throws(() => resolveJobToken({ env: {}, warn, ...s }), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message), String(re));
});

const plane = new ControlPlane({ jobId: 'token-test', jobToken: 'the-right-token', heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 5000 });
const address = await plane.listen('127.0.0.1:0');
after(async () => { await plane.close(); });

function worker(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stderr: string }> {
  const p = spawn(process.execPath, [join(ROOT, 'bin', 'worker.js'), 'start', '--coordinator', address, '--device', 'cpu', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DQLORA_LOG_LEVEL: 'error', DQLORA_JOB_TOKEN: '', ...env },
  });
  let stderr = '';
  p.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  return new Promise((resolve) => p.on('exit', (code) => resolve({ code, stderr })));
}

test('`worker start --job-token-file`: the file\'s token is presented (a wrong one is refused by the coordinator); a missing file is a clear error', { timeout: 60_000 }, async () => {
  const before = plane.workers.size;
  const wrong = await worker(['--job-token-file', file('wrong', 'not-the-token\n')]);
  assert.equal(wrong.code, 1, wrong.stderr);
  assert.match(wrong.stderr, /Register: wrong or missing job token for job "token-test"/);
  const missing = await worker(['--job-token-file', join(dir, 'nope')]);
  assert.equal(missing.code, 2, 'a usage error (README "Exit codes")');
  assert.match(missing.stderr, /^error: --job-token-file .*nope: cannot read it \(ENOENT\)/m);
  assert.doesNotMatch(missing.stderr, /^\s+at /m, 'no stack trace');
  const none = await worker([]);
  assert.equal(none.code, 2, 'a usage error');
  assert.match(none.stderr, /no job token: pass --job-token-file PATH or set DQLORA_JOB_TOKEN/);
  assert.equal(plane.workers.size, before, 'nobody registered');
});
