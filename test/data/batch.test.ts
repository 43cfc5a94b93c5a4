import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeMicroBatch, planSteps, epochOrder, stepsPerEpoch } from '../../core/train/batch.ts';
import type { Example } from '../../coordinator/data/tokenize.ts';
import { ConfigError } from '../../common/errors.ts';

const M = -100;
const ex = (inputIds: number[], labels: number[], sourceIndex: number): Example =>
  ({ inputIds: Int32Array.from(inputIds), labels: Int32Array.from(labels), sourceIndex });

test('micro-batch: right padding, targets shifted by one, masks, positions and the label count', () => {
  const a = ex([1, 10, 11, 12, 2], [M, M, 11, 12, 2], 5);
  const b = ex([1, 20, 21], [M, M, 21], 9);
  const mb = makeMicroBatch([a, b], { padId: 0 });
  assert.equal(mb.B, 2);
  assert.equal(mb.T, 5);
  assert.deepEqual(Array.from(mb.ids), [1, 10, 11, 12, 2, /**/ 1, 20, 21, 0, 0]);
  assert.deepEqual(Array.from(mb.targets), [M, 11, 12, 2, M, /**/ M, 21, M, M, M]);
  assert.deepEqual(Array.from(mb.keyMask), [1, 1, 1, 1, 1, /**/ 1, 1, 1, 0, 0]);
  assert.deepEqual(Array.from(mb.positions), [0, 1, 2, 3, 4, /**/ 0, 1, 2, 0, 0]);
  assert.deepEqual(Array.from(mb.sampleIds), [5, 9]);
  assert.equal(mb.labelCount, 4);
  const p8 = makeMicroBatch([a, b], { padId: 7, padToMultiple: 8, sampleIds: [100, 101] });
  assert.equal(p8.T, 8);
  assert.deepEqual(Array.from(p8.ids.subarray(8)), [1, 20, 21, 7, 7, 7, 7, 7]);
  assert.deepEqual(Array.from(p8.targets.subarray(0, 8)), [M, 11, 12, 2, M, M, M, M]);
  assert.deepEqual(Array.from(p8.sampleIds), [100, 101]);
  assert.equal(p8.labelCount, 4);
  assert.throws(() => makeMicroBatch([], { padId: 0 }), ConfigError);
});

test('planSteps: every sample exactly once per epoch, over all replicas, with the last partial step kept', () => {
  for (const n of [1, 7, 64, 100, 101]) {
    for (const [mb, ga, R] of [[1, 1, 1], [4, 2, 1], [3, 2, 2], [2, 3, 4], [8, 1, 3]]) {
      const plan = planSteps(n, { microBatchSize: mb, gradAccum: ga, replicas: R, seed: 3, epoch: 1 });
      assert.equal(plan.length, stepsPerEpoch(n, { microBatchSize: mb, gradAccum: ga, replicas: R }));
      const seen = plan.flat(3);
      assert.equal(seen.length, n);
      assert.deepEqual([...seen].sort((x, y) => x - y), Array.from({ length: n }, (_, i) => i));
      // in visiting order, the samples are exactly the epoch order
      assert.deepEqual(seen, Array.from(epochOrder(n, 3, 1)));
      for (let s = 0; s < plan.length; s++) {
        assert.equal(plan[s].length, R);
        for (const replica of plan[s]) {
          assert.ok(replica.length <= ga);
          for (const micro of replica) assert.ok(micro.length >= 1 && micro.length <= mb);
          if (s < plan.length - 1) assert.deepEqual(replica.map((m) => m.length), new Array(ga).fill(mb));
        }
      }
    }
  }
});

test('planSteps: deterministic per (seed, epoch); epochs reshuffle; a step holds the same samples whatever R', () => {
  const o = { microBatchSize: 2, gradAccum: 2, replicas: 2, seed: 11, epoch: 0 };
  assert.deepEqual(planSteps(50, o), planSteps(50, o));
  assert.notDeepEqual(planSteps(50, o).flat(3), planSteps(50, { ...o, epoch: 1 }).flat(3));
  const r1 = planSteps(50, { ...o, microBatchSize: 4, replicas: 1 });
  const r2 = planSteps(50, o);
  assert.deepEqual(r1.map((s) => s.flat(2).sort()), r2.map((s) => s.flat(2).sort()));
  // the last step of 50 = 6·8 + 2: both replicas get one sample
  assert.deepEqual(r2[r2.length - 1].map((r) => r.map((m) => m.length)), [[1], [1]]);
  // fewer samples than replicas: the last replica idles
  assert.deepEqual(planSteps(1, o)[0].map((r) => r.length), [1, 0]);
  assert.throws(() => planSteps(10, { ...o, gradAccum: 0 }), ConfigError);
});
