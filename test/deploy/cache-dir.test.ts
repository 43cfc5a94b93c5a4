// The built-in example in an image whose application directory is read-only: its files go to $DQLORA_CACHE_DIR,
// and a cache path that cannot be written is a one-line error naming the path and the variable, not a stack.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { exampleCacheDir, exampleOutputDir, PACKAGE_ROOT } from '../../coordinator/example/assets.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

test('DQLORA_CACHE_DIR moves the example cache and its run; unset, both stay beside the package', () => {
  assert.equal(exampleCacheDir({ DQLORA_CACHE_DIR: '/tmp/dq' }), '/tmp/dq');
  assert.equal(exampleOutputDir({ DQLORA_CACHE_DIR: '/tmp/dq' }), '/tmp/dq/runs/example');
  assert.equal(exampleCacheDir({}), path.join(PACKAGE_ROOT, 'examples-cache'));
  assert.equal(exampleOutputDir({}), path.join(PACKAGE_ROOT, 'runs', 'example'));
});

test('`coordinator start` with an unwritable cache path: exit 2 (a usage error, README "Exit codes"), the path, the variable, no stack trace', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-cache-'));
  try {
    const file = path.join(dir, 'a-file');
    fs.writeFileSync(file, 'x');
    const r = spawnSync(process.execPath, [path.join(root, 'bin', 'coordinator.js'), 'start', '--no-progress'], {
      cwd: dir, env: { PATH: process.env.PATH ?? '', DQLORA_CACHE_DIR: path.join(file, 'cache'), DQLORA_LOG_LEVEL: 'warn' }, encoding: 'utf8', timeout: 60_000,
    });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`error: cannot write the example model and data under ${path.join(file, 'cache').replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: ENOTDIR`));
    assert.match(r.stderr, /hint: set DQLORA_CACHE_DIR to a writable directory/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
