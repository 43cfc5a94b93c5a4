// worker/allreduce.ts against a real nats-server (max_payload 64 KiB so every buffer is chunked), one
// connection per rank as separate workers would have.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, headers, type NatsConnection } from '@nats-io/transport-node';
import { NatsAllReduce, AllReduceTimeoutError } from '../../worker/allreduce.ts';
import { WireError } from '../../common/errors.ts';
import { startNatsServer, natsServerMissing, type NatsServerHandle } from '../helpers/nats.ts';
import { Philox } from '../helpers/prng.ts';

const skip = natsServerMissing();
const MAX_PAYLOAD = 65536;
let server: NatsServerHandle | undefined;
const conns: NatsConnection[] = [];

before(async () => {
  if (!skip) server = await startNatsServer({ maxPayload: MAX_PAYLOAD });
});
after(async () => {
  await Promise.all(conns.map((c) => c.close()));
  await server?.stop();
});

async function connections(n: number): Promise<NatsConnection[]> {
  const out: NatsConnection[] = [];
  for (let i = 0; i < n; i++) out.push(await connect({ servers: server!.url, name: `test-rank-${i}` }));
  conns.push(...out);
  return out;
}

/** The contract: element-wise float32 sum in rank order 0..R−1 (no float64 accumulation). */
function referenceSum(bufs: Float32Array[]): Float32Array {
  const acc = Float32Array.from(bufs[0]);
  for (let q = 1; q < bufs.length; q++) for (let i = 0; i < acc.length; i++) acc[i] += bufs[q][i];
  return acc;
}

/** Values of mixed magnitudes, so that summing in another order changes low bits. */
function gradients(rng: Philox, n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rng.normal() * 10 ** (rng.int(9) - 4);
  return a;
}

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

let jobSeq = 0;
const jobId = (): string => `job-${process.pid}-${jobSeq++}`;

for (const [R, n] of [[2, 50_001], [3, 70_001], [4, 100_003], [3, 2], [4, 1]] as const) {
  test(`R=${R}, ${n} floats: every rank ends with the fixed-order float32 sum, bit for bit, over 3 steps`, { skip }, async () => {
    const ncs = await connections(R);
    const job = jobId();
    const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 1, rank, worldSize: R, timeoutMs: 10_000 }));
    const rng = new Philox(R * 1000 + n);
    for (const step of [0, 1, 5]) {
      const inputs = Array.from({ length: R }, () => gradients(rng, n));
      const expected = referenceSum(inputs);
      const bufs = inputs.map((x) => Float32Array.from(x));
      // Start the ranks at different times, as real replicas would.
      await Promise.all(ars.map(async (ar, rank) => {
        await new Promise((r) => setTimeout(r, rank * 7 * (step % 2)));
        await ar.allReduceSum(step, bufs[rank]);
      }));
      for (let rank = 0; rank < R; rank++) assert.ok(bitsEqual(bufs[rank], expected), `rank ${rank} step ${step} differs from the fixed-order sum`);
      if (n > 1000) {
        // The check is sensitive: summing in reverse order gives different bits somewhere.
        assert.ok(!bitsEqual(referenceSum([...inputs].reverse()), expected) || R === 2);
      }
    }
    // Large buffers really went in several chunks per slice under max_payload (unchunked: R messages a step).
    if (n * 4 / R > MAX_PAYLOAD) assert.ok(ars[0].stats.messagesSent > 3 * R, `only ${ars[0].stats.messagesSent} messages`);
    for (const ar of ars) ar.close();
  });
}

test('R=1 is a no-op that leaves the buffer untouched', { skip }, async () => {
  const [nc] = await connections(1);
  const ar = new NatsAllReduce(nc, { jobId: jobId(), stage: 0, rank: 0, worldSize: 1, timeoutMs: 100 });
  const buf = new Float32Array([1, 2, 3]);
  await ar.allReduceSum(0, buf);
  assert.deepEqual(Array.from(buf), [1, 2, 3]);
  assert.equal(ar.stats.messagesSent, 0);
});

test('a rank that never calls: the others fail with AllReduceTimeoutError naming it', { skip }, async () => {
  const ncs = await connections(3);
  const job = jobId();
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 3, timeoutMs: 600 }));
  const results = await Promise.allSettled([0, 1].map((r) => ars[r].allReduceSum(0, new Float32Array(1000).fill(r))));
  for (const res of results) {
    assert.equal(res.status, 'rejected');
    const e = (res as PromiseRejectedResult).reason;
    assert.ok(e instanceof AllReduceTimeoutError, String(e));
    assert.deepEqual(e.missingRanks, [2]);
    assert.equal(e.phase, 'reduce-scatter');
    assert.match(e.message, /step 0: rank [01] timed out after 600 ms in reduce-scatter, data missing from rank 2 \(nothing\)/);
  }
  for (const ar of ars) ar.close();
});

test('a rank that never joins: the join barrier times out naming it', { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ar = new NatsAllReduce(ncs[0], { jobId: job, stage: 2, rank: 0, worldSize: 3, timeoutMs: 400 });
  new NatsAllReduce(ncs[1], { jobId: job, stage: 2, rank: 1, worldSize: 3, timeoutMs: 400 }); // joins, never calls
  await assert.rejects(ar.allReduceSum(0, new Float32Array(10)), (e: unknown) =>
    e instanceof AllReduceTimeoutError && e.phase === 'join' && e.missingRanks.join() === '2' && /waiting for rank\(s\) 2 to join/.test(e.message));
  ar.close();
});

test('replicas with different buffer lengths get a WireError, not a wrong sum', { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 2000 }));
  const res = await Promise.allSettled([ars[0].allReduceSum(0, new Float32Array(100)), ars[1].allReduceSum(0, new Float32Array(101))]);
  for (const r of res) {
    assert.equal(r.status, 'rejected');
    assert.ok((r as PromiseRejectedResult).reason instanceof WireError);
    assert.match(String((r as PromiseRejectedResult).reason.message), /buffer of 10[01] elements/);
  }
  for (const ar of ars) ar.close();
});

test('stale messages of a completed step are dropped; the next step is unaffected', { skip }, async () => {
  const ncs = await connections(3);
  const job = jobId();
  const ars = ncs.slice(0, 2).map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 5000 }));
  const a = [new Float32Array([1, 2, 3]), new Float32Array([10, 20, 30])];
  await Promise.all(ars.map((ar, r) => ar.allReduceSum(3, a[r])));
  assert.deepEqual(Array.from(a[0]), [11, 22, 33]);
  // A late duplicate of step 3 (e.g. a retry from a restarted peer) arrives: it must not touch step 4.
  const h = headers();
  for (const [k, v] of Object.entries({ rank: '1', step: '3', chunk: '0', count: '1', off: '0', n: '3' })) h.set(k, v);
  ncs[2].publish(`dqlora.${job}.ar.0.3.rs.0`, new Uint8Array(new Float32Array([999, 999]).buffer), { headers: h });
  await ncs[2].flush();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(ars[0].stats.staleDropped, 1);
  const b = [new Float32Array([1, 1, 1]), new Float32Array([2, 2, 2])];
  await Promise.all(ars.map((ar, r) => ar.allReduceSum(4, b[r])));
  assert.deepEqual(Array.from(b[0]), [3, 3, 3]);
  assert.deepEqual(Array.from(b[1]), [3, 3, 3]);
  await assert.rejects(ars[0].allReduceSum(4, b[0]), /not after the last completed step 4/);
  for (const ar of ars) ar.close();
});

test('invalid options are ConfigErrors', { skip }, async () => {
  const [nc] = await connections(1);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a.b', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1 }), /cannot be a NATS subject token/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 2, worldSize: 2, timeoutMs: 1 }), /rank 2 outside 0\.\.1/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, maxPayload: MAX_PAYLOAD * 2 }), /exceeds the server's max_payload 65536/);
});
