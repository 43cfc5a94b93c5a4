// common/buffer-pool.ts: exact-size reuse, caps, and arrays that cannot be kept.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool } from '../../common/buffer-pool.ts';

test('an array given back is handed out again for the same size only', () => {
  const pool = new BufferPool(4, 1 << 20);
  const a = pool.take(1024);
  new Uint8Array(a).fill(9);
  pool.give(a);
  assert.notEqual(pool.take(2048), a, 'another size is a new array');
  assert.equal(pool.take(1024), a, 'the same size reuses it (contents stale, callers overwrite)');
  assert.notEqual(pool.take(1024), a, 'taken once only');
  assert.deepEqual(pool.stats, { hits: 1, misses: 3, given: 1, dropped: 0 });
});

test('the oldest arrays are dropped beyond the count and byte caps; detached and oversized ones are not kept', () => {
  const pool = new BufferPool(2, 3000);
  const [a, b, c] = [pool.take(1000), pool.take(1000), pool.take(1000)];
  pool.give(a); pool.give(b); pool.give(c);
  assert.equal(pool.size, 2);
  assert.equal(pool.take(1000), c);
  assert.equal(pool.take(1000), b);
  assert.notEqual(pool.take(1000), a, 'a was dropped');
  pool.give(pool.take(2000)); pool.give(pool.take(1500));
  assert.equal(pool.size, 1, 'byte cap: 2000 + 1500 > 3000, the older one goes');
  pool.give(new ArrayBuffer(4000));
  const moved = new ArrayBuffer(64);
  structuredClone(moved, { transfer: [moved] }); // detached: byteLength 0
  pool.give(moved);
  assert.equal(pool.size, 1);
});
