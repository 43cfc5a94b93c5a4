// worker/allreduce.ts against a real nats-server (max_payload 64 KiB so every buffer is chunked), one
// connection per rank as separate workers would have.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, headers, type Msg, type NatsConnection } from '@nats-io/transport-node';
import { NatsAllReduce, AllReduceTimeoutError, deriveAllReduceKey } from '../../worker/allreduce.ts';
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

const KEY = deriveAllReduceKey('test-job-token', 'all-reduce-tests');
let jobSeq = 0;
const jobId = (): string => `job-${process.pid}-${jobSeq++}`;

for (const [R, n] of [[2, 50_001], [3, 70_001], [4, 100_003], [3, 2], [4, 1]] as const) {
  test(`R=${R}, ${n} floats: every rank ends with the fixed-order float32 sum, bit for bit, over 3 steps`, { skip }, async () => {
    const ncs = await connections(R);
    const job = jobId();
    const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 1, rank, worldSize: R, timeoutMs: 10_000, key: KEY }));
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
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 3, timeoutMs: 600, key: KEY }));
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
  const ar = new NatsAllReduce(ncs[0], { jobId: job, stage: 2, rank: 0, worldSize: 3, timeoutMs: 400, key: KEY });
  new NatsAllReduce(ncs[1], { jobId: job, stage: 2, rank: 1, worldSize: 3, timeoutMs: 400, key: KEY }); // joins, never calls
  await assert.rejects(ar.allReduceSum(0, new Float32Array(10)), (e: unknown) =>
    e instanceof AllReduceTimeoutError && e.phase === 'join' && e.missingRanks.join() === '2' && /waiting for rank\(s\) 2 to join/.test(e.message));
  ar.close();
});

test('replicas with different buffer lengths get a WireError, not a wrong sum', { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 2000, key: KEY }));
  const res = await Promise.allSettled([ars[0].allReduceSum(0, new Float32Array(100)), ars[1].allReduceSum(0, new Float32Array(101))]);
  for (const r of res) {
    assert.equal(r.status, 'rejected');
    assert.ok((r as PromiseRejectedResult).reason instanceof WireError);
    assert.match(String((r as PromiseRejectedResult).reason.message), /buffer of 10[01] elements/);
  }
  for (const ar of ars) ar.close();
});

test('forged, tampered, replayed and stale chunks injected by a third connection are refused and counted; the sums stay bit-identical', { skip }, async () => {
  const ncs = await connections(3);
  const job = jobId();
  const ars = ncs.slice(0, 2).map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 5000, key: KEY }));
  const rng = new Philox(77);
  const n = 50_001; // 2 chunks per slice under the 64 KiB max_payload: each rank gets 2 rs + 2 ag messages a step
  // The attacker sees every message of the job (it can subscribe like anyone on the server).
  const seen: Msg[] = [];
  let attack = false;
  const attacker = ncs[2];
  attacker.subscribe(`dqlora.${job}.ar.>`, { callback: (_e, m) => {
    if (m.headers?.get('x-injected') || m.subject.endsWith('.ready')) return;
    seen.push(m);
    if (!attack) return;
    // Replay it at once (the bucket may still be running at the receiver), and send a tampered copy.
    const h1 = headers(); h1.set('dq', m.headers!.get('dq')); h1.set('x-injected', '1');
    attacker.publish(m.subject, m.data.slice(), { headers: h1 });
    const bad = m.data.slice(); bad[7] ^= 0x10;
    const h2 = headers(); h2.set('dq', m.headers!.get('dq')); h2.set('x-injected', '1');
    attacker.publish(m.subject, bad, { headers: h2 });
  } });
  await attacker.flush();
  const run = async (step: number): Promise<void> => {
    const inputs = [gradients(rng, n), gradients(rng, n)];
    const expected = referenceSum(inputs);
    await Promise.all(ars.map((ar, r) => ar.allReduceSum(step, inputs[r])));
    for (let r = 0; r < 2; r++) assert.ok(bitsEqual(inputs[r], expected), `rank ${r} step ${step} differs from the fixed-order sum`);
  };
  const settle = async (cond: () => boolean): Promise<void> => {
    for (let t0 = Date.now(); !cond() && Date.now() - t0 < 5000;) await new Promise((r) => setTimeout(r, 10));
  };
  await run(3);
  await settle(() => seen.length === 8);
  assert.equal(seen.length, 8);
  assert.deepEqual(ars.map((a) => a.stats.rejected), [0, 0]);
  // 1. A replay of step 3 after it finished.
  const old = seen.find((m) => m.subject.endsWith('.rs.0'))!;
  const h = headers(); h.set('dq', old.headers!.get('dq')); h.set('x-injected', '1');
  attacker.publish(old.subject, old.data, { headers: h });
  // 2. Forged from scratch for the next step: a header sealed with a guessed key, and no header at all.
  const forger = new NatsAllReduce(attacker, { jobId: job, stage: 0, rank: 1, worldSize: 2, timeoutMs: 500, key: deriveAllReduceKey('guessed-token', job) });
  (forger as unknown as { joined: Set<number> }).joined.add(0); // skip its join barrier: it only wants to publish
  void forger.allReduceSum(4, new Float32Array(n).fill(1e30)).catch(() => {});
  const h0 = headers(); h0.set('x-injected', '1');
  attacker.publish(`dqlora.${job}.ar.0.rs.0`, new Uint8Array(new Float32Array([999, 999]).buffer), { headers: h0 });
  await attacker.flush();
  await new Promise((r) => setTimeout(r, 100));
  const afterForgery = ars.map((a) => a.stats.rejected);
  assert.deepEqual(afterForgery, [4, 0]); // rank 0: the replay, the headerless chunk, the forger's 2 chunks
  assert.equal(ars[0].stats.staleDropped, 1);
  // 3. During step 4 every genuine message is replayed and tampered with as it flies.
  forger.close();
  attack = true;
  await run(4);
  await settle(() => ars.every((a, r) => a.stats.rejected - afterForgery[r] >= 8));
  await attacker.flush();
  await new Promise((r) => setTimeout(r, 50));
  // Each rank receives 4 genuine messages a step: 4 replays + 4 tampered copies refused, on top of the forgeries.
  const forged = afterForgery.map((v, r) => ars[r].stats.rejected - v);
  assert.deepEqual(forged, [8, 8]);
  await run(5); // and the next step is unaffected
  await assert.rejects(ars[0].allReduceSum(5, new Float32Array(n)), /step 5 bucket 0 is not after the last completed step 5/);
  for (const ar of ars) ar.close();
});

test('buckets: several all-reduces of one step in flight at once, started in different orders per rank, each bit-identical to the fixed-order sum', { skip }, async () => {
  const R = 3;
  const ncs = await connections(R);
  const job = jobId();
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 2, rank, worldSize: R, timeoutMs: 10_000, key: KEY }));
  const rng = new Philox(91);
  const sizes = [40_000, 7, 100_003, 16_320 * 3];
  for (const step of [0, 1]) {
    const inputs = sizes.map((n) => Array.from({ length: R }, () => gradients(rng, n)));
    const bufs = inputs.map((per) => per.map((x) => Float32Array.from(x)));
    const orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]];
    await Promise.all(ars.map(async (ar, rank) => {
      const calls: Promise<void>[] = [];
      for (const b of orders[rank]) {
        calls.push(ar.allReduceBucket(step, b, bufs[b][rank])); // not awaited: all buckets in flight together
        await new Promise((r) => setTimeout(r, (rank * 3 + b) % 5));
      }
      await Promise.all(calls);
    }));
    for (let b = 0; b < sizes.length; b++) {
      const expected = referenceSum(inputs[b]);
      for (let rank = 0; rank < R; rank++) assert.ok(bitsEqual(bufs[b][rank], expected), `step ${step} bucket ${b} rank ${rank}`);
    }
  }
  assert.deepEqual(ars.map((a) => a.stats.rejected), [0, 0, 0]);
  await assert.rejects(ars[0].allReduceBucket(0, 5, new Float32Array(3)), /step 0 bucket 5 started after step 1/);
  for (const ar of ars) ar.close();
});

test('a rank with another key is not heard: the others time out naming it, and nothing of it is summed', { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const a = new NatsAllReduce(ncs[0], { jobId: job, stage: 0, rank: 0, worldSize: 2, timeoutMs: 500, key: KEY });
  const b = new NatsAllReduce(ncs[1], { jobId: job, stage: 0, rank: 1, worldSize: 2, timeoutMs: 500, key: deriveAllReduceKey('other-token', job) });
  const buf = new Float32Array([1, 2, 3]);
  const res = await Promise.allSettled([a.allReduceSum(0, buf), b.allReduceSum(0, new Float32Array([5, 5, 5]))]);
  assert.ok(res[0].status === 'rejected' && (res[0] as PromiseRejectedResult).reason instanceof AllReduceTimeoutError);
  assert.deepEqual(Array.from(buf), [1, 2, 3]);
  assert.ok(a.stats.rejected > 0);
  a.close(); b.close();
});

test('invalid options are ConfigErrors', { skip }, async () => {
  const [nc] = await connections(1);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a.b', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, key: KEY }), /cannot be a NATS subject token/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1 }), /a key of at least 16 bytes is required with 2 replicas \(got none\)/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, key: new Uint8Array(8) }), /got 8 bytes/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 2, worldSize: 2, timeoutMs: 1, key: KEY }), /rank 2 outside 0\.\.1/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, maxPayload: MAX_PAYLOAD * 2, key: KEY }), /exceeds the server's max_payload 65536/);
});
