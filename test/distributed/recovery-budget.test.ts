// The recovery budget is per sliding time window, with exponential back-off: a fault that repeats quickly
// spends it in growing pauses and then fails with how many failures came in how long; failures far apart
// never exhaust it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RecoveryBudget } from '../../coordinator/distributed/recovery-budget.ts';
import { DqloraError } from '../../common/errors.ts';

test('a fault repeating every second: back-off 1, 2, 4 s, then a clear failure naming the count and the span', () => {
  let now = 0;
  const b = new RecoveryBudget({ max: 3, windowMs: 600_000, now: () => now });
  const delays: number[] = [];
  for (let i = 0; i < 3; i++) { delays.push(b.spend('NATS at 127.0.0.1:4222 unreachable')); now += 1000; }
  assert.deepEqual(delays, [1000, 2000, 4000]);
  assert.throws(() => b.spend('NATS at 127.0.0.1:4222 unreachable'), (e: unknown) => e instanceof DqloraError
    && /giving up: 4 failure\(s\) within 3\.0 s \(at most 3 recoveries per 600 s\); last failure: NATS at 127\.0\.0\.1:4222 unreachable/.test((e as Error).message));
});

test('one failure an hour, for days: the budget never runs out, and the back-off starts over', () => {
  let now = 0;
  const b = new RecoveryBudget({ max: 3, windowMs: 600_000, now: () => now });
  for (let h = 0; h < 72; h++) { assert.equal(b.spend(`failure ${h}`), 1000); now += 3_600_000; }
  assert.equal(b.recent, 0);
});

test('the back-off is capped', () => {
  let now = 0;
  const b = new RecoveryBudget({ max: 20, baseDelayMs: 1000, maxDelayMs: 30_000, now: () => now });
  const d: number[] = [];
  for (let i = 0; i < 8; i++) { d.push(b.spend('x')); now += 10; }
  assert.deepEqual(d, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
});
