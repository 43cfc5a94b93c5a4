// common/thread-priority.ts: the nice value lands on the calling thread only (Linux: per-thread), never lowers it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import os from 'node:os';
import { computeNice } from '../../common/thread-priority.ts';

test('computeNice: default 5, DQLORA_COMPUTE_NICE 0..19, anything else falls back to 5', () => {
  assert.equal(computeNice({}), 5);
  assert.equal(computeNice({ DQLORA_COMPUTE_NICE: '0' }), 0);
  assert.equal(computeNice({ DQLORA_COMPUTE_NICE: '12' }), 12);
  for (const bad of ['-3', '20', 'x', '2.5']) assert.equal(computeNice({ DQLORA_COMPUTE_NICE: bad }), 5, bad);
});

test('niceThisThread: a worker thread raises its own nice value; the main thread keeps its own', { skip: process.platform !== 'linux' && 'per-thread nice is Linux only' }, async () => {
  const before = os.getPriority();
  const src = `
    const { parentPort } = require('node:worker_threads');
    import('tsx/esm/api').then(({ register }) => { register(); return import(${JSON.stringify(new URL('../../common/thread-priority.ts', import.meta.url).href)}); }).then((m) => {
      const first = m.niceThisThread(${before + 3});
      const again = m.niceThisThread(${before + 1}); // never lowered
      parentPort.postMessage({ first, again });
    }, (e) => parentPort.postMessage({ error: String(e) }));`;
  const w = new Worker(src, { eval: true });
  const got = await new Promise<{ first?: number; again?: number; error?: string }>((res, rej) => { w.once('message', res); w.once('error', rej); });
  await w.terminate();
  assert.equal(got.error, undefined);
  assert.equal(got.first, Math.min(19, before + 3));
  assert.equal(got.again, Math.min(19, before + 3));
  assert.equal(os.getPriority(), before, 'the main thread\'s nice value changed');
});
