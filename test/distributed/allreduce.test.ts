// worker/allreduce.ts (NatsAllReduce, on the caller's thread) and worker/allreduce-thread.ts (ThreadedAllReduce,
// the same protocol on a receive and a send thread with connections of their own) against a real nats-server
// (max_payload 64 KiB so every buffer is chunked), one connection per rank as separate workers would have. The
// behaviour tests run against both implementations; a job may mix them (same wire protocol).
import crypto from 'node:crypto';
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect, headers, type Msg, type NatsConnection } from '@nats-io/transport-node';
import { NatsAllReduce, AllReduceTimeoutError, deriveAllReduceKey, type AllReduceStats, type NatsAllReduceOptions } from '../../worker/allreduce.ts';
import { ThreadedAllReduce } from '../../worker/allreduce-thread.ts';
import { ConfigError, WireError } from '../../common/errors.ts';
import { ConnectionError } from '../../common/connection.ts';
import { setLogTerminal } from '../../common/log.ts';
import { Terminal } from '../../common/terminal.ts';
import { startNatsServer, natsServerMissing, freePort, type NatsServerHandle } from '../helpers/nats.ts';
import { Philox } from '../helpers/prng.ts';

const skip = natsServerMissing();
const MAX_PAYLOAD = 65536;
let server: NatsServerHandle | undefined;
const conns: NatsConnection[] = [];

before(async () => {
  if (!skip) server = await startNatsServer({ maxPayload: MAX_PAYLOAD });
});
after(async () => {
  // Every thread has exited once closed (or the test file would not end).
  for (const ar of threaded) ar.close();
  await Promise.all(threaded.map((ar) => ar.whenClosed()));
  await Promise.all(conns.map((c) => c.close()));
  await server?.stop();
});

async function connections(n: number): Promise<NatsConnection[]> {
  const out: NatsConnection[] = [];
  for (let i = 0; i < n; i++) out.push(await connect({ servers: server!.url, name: `test-rank-${i}` }));
  conns.push(...out);
  return out;
}

type Impl = 'inline' | 'thread' | 'thread2'; // thread2: ThreadedAllReduce without its gather thread
const IMPLS: Impl[] = ['inline', 'thread'];
interface AllReduce {
  readonly stats: AllReduceStats;
  allReduceSum(step: number, buf: Float32Array): Promise<void>;
  allReduceBucket(seq: number, bucket: number, buf: Float32Array): Promise<void>;
  close(): void;
}
const threaded: ThreadedAllReduce[] = [];

/** A rank of either implementation: inline on `nc`, threaded with connections of its own to the same server. */
async function rank(impl: Impl, nc: NatsConnection, opts: NatsAllReduceOptions, url = server!.url): Promise<AllReduce> {
  if (impl === 'inline') return new NatsAllReduce(nc, opts);
  const ar = await ThreadedAllReduce.start({ ...opts, url, gatherThread: impl === 'thread' });
  threaded.push(ar);
  return ar;
}

/** One rank per connection. */
function ranks(impl: Impl, ncs: NatsConnection[], opts: (rank: number) => NatsAllReduceOptions): Promise<AllReduce[]> {
  return Promise.all(ncs.map((nc, r) => rank(impl, nc, opts(r))));
}

/** A copy in shared memory (what the compute thread hands the all-reduce: the threads use it in place). */
function shared(x: Float32Array): Float32Array {
  const b = new Float32Array(new SharedArrayBuffer(x.byteLength));
  b.set(x);
  return b;
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

for (const impl of [...IMPLS, 'thread2' as const]) for (const [R, n] of [[2, 50_001], [3, 70_001], [4, 100_003], [3, 2], [4, 1]] as const) {
  test(`${impl}: R=${R}, ${n} floats: every rank ends with the fixed-order float32 sum, bit for bit, over 3 steps`, { skip }, async () => {
    const ncs = await connections(R);
    const job = jobId();
    const ars = await ranks(impl, ncs, (rank) => ({ jobId: job, stage: 1, rank, worldSize: R, timeoutMs: 10_000, key: KEY }));
    const rng = new Philox(R * 1000 + n);
    for (const step of [0, 1, 5]) {
      const inputs = Array.from({ length: R }, () => gradients(rng, n));
      const expected = referenceSum(inputs);
      const bufs = inputs.map(shared);
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

for (const impl of IMPLS) test(`${impl}: R=1 is a no-op that leaves the buffer untouched`, { skip }, async () => {
  const [nc] = await connections(1);
  const ar = await rank(impl, nc, { jobId: jobId(), stage: 0, rank: 0, worldSize: 1, timeoutMs: 100 });
  const buf = new Float32Array([1, 2, 3]);
  await ar.allReduceSum(0, buf);
  assert.deepEqual(Array.from(buf), [1, 2, 3]);
  assert.equal(ar.stats.messagesSent, 0);
  ar.close();
});

for (const impl of IMPLS) test(`${impl}: a rank that never calls: the others fail with AllReduceTimeoutError naming it`, { skip }, async () => {
  const ncs = await connections(3);
  const job = jobId();
  const ars = await ranks(impl, ncs, (rank) => ({ jobId: job, stage: 0, rank, worldSize: 3, timeoutMs: 600, key: KEY }));
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

for (const impl of IMPLS) test(`${impl}: a rank that never joins: the join barrier times out naming it`, { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ar = await rank(impl, ncs[0], { jobId: job, stage: 2, rank: 0, worldSize: 3, timeoutMs: 400, key: KEY });
  const idle = await rank(impl, ncs[1], { jobId: job, stage: 2, rank: 1, worldSize: 3, timeoutMs: 400, key: KEY }); // joins, never calls
  await assert.rejects(ar.allReduceSum(0, new Float32Array(10)), (e: unknown) =>
    e instanceof AllReduceTimeoutError && e.phase === 'join' && e.missingRanks.join() === '2' && /waiting for rank\(s\) 2 to join/.test(e.message));
  ar.close(); idle.close();
});

for (const impl of IMPLS) test(`${impl}: replicas with different buffer lengths get a WireError, not a wrong sum`, { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ars = await ranks(impl, ncs, (rank) => ({ jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 2000, key: KEY }));
  const res = await Promise.allSettled([ars[0].allReduceSum(0, new Float32Array(100)), ars[1].allReduceSum(0, new Float32Array(101))]);
  for (const r of res) {
    assert.equal(r.status, 'rejected');
    assert.ok((r as PromiseRejectedResult).reason instanceof WireError);
    assert.match(String((r as PromiseRejectedResult).reason.message), /buffer of 10[01] elements/);
  }
  for (const ar of ars) ar.close();
});

// ---- the `dq` header as someone else on the server sees it (layout: the header of worker/allreduce.ts) ----
const HDR = 54, NONCE_AT = 40, NONCE = 12;
const dqOf = (m: Msg): Buffer => Buffer.from(m.headers!.get('dq'), 'base64url');

/** Ways to turn a genuine message into one that must be refused; each returns the new dq value and payload. */
const VARIANTS: Record<string, (job: string, dq: Buffer, data: Uint8Array) => [string, Uint8Array]> = {
  replayed: (_job, dq, data) => [dq.toString('base64url'), data],
  // (m.data may be a Buffer, whose slice() is a view: copy with Uint8Array.from.)
  'tampered payload byte': (_job, dq, data) => { const d = Uint8Array.from(data); d[d.length >> 1] ^= 0x10; return [dq.toString('base64url'), d]; },
  'tampered header byte': (_job, dq, data) => { const b = Buffer.from(dq); b[20] ^= 1; return [b.toString('base64url'), data]; }, // the chunk index
  'forged tag': (_job, dq, data) => { const b = Buffer.from(dq); b[HDR + 5] ^= 0x40; return [b.toString('base64url'), data]; },
  // What a worker of the previous release sends: header version 1 with a valid HMAC-SHA256 under the job's secret.
  'header version 1': (job, dq, data) => {
    const b = Buffer.alloc(72);
    dq.copy(b, 0, 0, 40);
    b[0] = 1;
    crypto.createHmac('sha256', KEY).update(job).update(b.subarray(0, 40)).update(data).digest().copy(b, 40);
    return [b.toString('base64'), data];
  },
};

function publishVariant(nc: NatsConnection, job: string, m: Msg, variant: string): void {
  const [dq, data] = VARIANTS[variant](job, dqOf(m), m.data);
  const h = headers(); h.set('dq', dq); h.set('x-injected', '1');
  nc.publish(m.subject, data, { headers: h });
}

async function settle(cond: () => boolean): Promise<void> {
  for (let t0 = Date.now(); !cond() && Date.now() - t0 < 5000;) await new Promise((r) => setTimeout(r, 10));
}

for (const impl of IMPLS) test(`${impl}: forged, tampered, replayed, version-1 and stale chunks injected by a third connection are refused and counted; the sums stay bit-identical`, { skip }, async () => {
  const ncs = await connections(3);
  const job = jobId();
  const ars = await ranks(impl, ncs.slice(0, 2), (rank) => ({ jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 5000, key: KEY }));
  const rng = new Philox(77);
  const n = 50_001; // 2 chunks per slice under the 64 KiB max_payload: each rank gets 2 rs + 2 ag messages a step
  // The attacker sees every message of the job (it can subscribe like anyone on the server).
  const seen: Msg[] = [];
  let attack = false;
  const attacker = ncs[2];
  attacker.subscribe(`dqlora.${job}.ar.>`, { callback: (_e, m) => {
    if (m.headers?.get('x-injected') || m.subject.endsWith('.ready')) return;
    seen.push(m);
    // While the step runs at the receiver: a replay, and each kind of altered copy, at once.
    if (attack) for (const v of Object.keys(VARIANTS)) publishVariant(attacker, job, m, v);
  } });
  await attacker.flush();
  const run = async (step: number): Promise<void> => {
    const inputs = [gradients(rng, n), gradients(rng, n)];
    const expected = referenceSum(inputs);
    await Promise.all(ars.map((ar, r) => ar.allReduceSum(step, inputs[r])));
    for (let r = 0; r < 2; r++) assert.ok(bitsEqual(inputs[r], expected), `rank ${r} step ${step} differs from the fixed-order sum`);
  };
  await run(3);
  await settle(() => seen.length === 8);
  assert.equal(seen.length, 8);
  assert.deepEqual(ars.map((a) => a.stats.rejected), [0, 0]);
  // 1. A replay of step 3 after it finished.
  const old = seen.find((m) => m.subject.endsWith('.rs.0'))!;
  publishVariant(attacker, job, old, 'replayed');
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
  // 3. During step 4 every genuine message is replayed, and altered in each way, as it flies.
  forger.close();
  attack = true;
  await run(4);
  const variants = Object.keys(VARIANTS).length;
  await settle(() => ars.every((a, r) => a.stats.rejected - afterForgery[r] >= 4 * variants));
  await attacker.flush();
  await new Promise((r) => setTimeout(r, 50));
  // Each rank receives 4 genuine messages a step: 4 copies of each variant refused, on top of the forgeries.
  const forged = afterForgery.map((v, r) => ars[r].stats.rejected - v);
  assert.deepEqual(forged, [4 * variants, 4 * variants]);
  await run(5); // and the next step is unaffected
  await assert.rejects(ars[0].allReduceSum(5, new Float32Array(n)), /step 5 bucket 0 is not after the last completed step 5/);
  for (const ar of ars) ar.close();
});

test('each refused message is counted and logged with its reason: a bad tag, another header version, a finished step, no header', { skip }, async () => {
  const lines: string[] = [];
  const prev = setLogTerminal(new Terminal({ write: (s: string) => { lines.push(s); } }));
  try {
    const ncs = await connections(3);
    const job = jobId();
    const ars = ncs.slice(0, 2).map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 5000, key: KEY }));
    const seen: Msg[] = [];
    const attacker = ncs[2];
    attacker.subscribe(`dqlora.${job}.ar.0.rs.1`, { callback: (_e, m) => { if (!m.headers?.get('x-injected')) seen.push(m); } });
    await attacker.flush();
    const inputs = [Float32Array.from([1, 2, 3]), Float32Array.from([10, 20, 30])];
    await Promise.all(ars.map((ar, r) => ar.allReduceSum(0, inputs[r])));
    await settle(() => seen.length === 1);
    const genuine = seen[0]; // rank 0's contribution to rank 1's slice, step 0 (finished now)
    const cases: [string, RegExp][] = [
      ['forged tag', /refused 1 message\(s\), latest: bad tag \(forged, corrupted, or another job's key\)/],
      ['tampered payload byte', /latest: bad tag/],
      ['tampered header byte', /latest: bad tag/],
      ['header version 1', /latest: header version 1, this rank speaks only version 2 \(a worker of another dqlora release in the job\?\)/],
      ['replayed', /latest: a message of step 0 bucket 0, which this rank has finished/],
    ];
    const rank1 = ars[1] as unknown as { rejectLog: { last: number } };
    for (const [variant, reason] of cases) {
      const before = ars[1].stats.rejected;
      rank1.rejectLog.last = 0; // the log is rate-limited to a line per 2 s: let this one through
      lines.length = 0;
      publishVariant(attacker, job, genuine, variant);
      await settle(() => ars[1].stats.rejected === before + 1);
      assert.equal(ars[1].stats.rejected, before + 1, variant);
      assert.match(lines.join(''), reason, variant);
    }
    rank1.rejectLog.last = 0;
    lines.length = 0;
    const h = headers(); h.set('x-injected', '1');
    attacker.publish(genuine.subject, genuine.data, { headers: h });
    await settle(() => ars[1].stats.rejected === cases.length + 1);
    assert.match(lines.join(''), /latest: missing header/);
    assert.deepEqual([ars[0].stats.rejected, ars[1].stats.rejected, ars[1].stats.staleDropped], [0, cases.length + 1, 1]);
    assert.deepEqual(Array.from(inputs[1]), [11, 22, 33]);
    for (const ar of ars) ar.close();
  } finally {
    setLogTerminal(prev);
  }
});

for (const impl of IMPLS) test(`${impl}: nonces never repeat under the job key: 64 random bits per instance ‖ its message counter, across ranks, steps and a restart that re-runs a step`, { skip }, async () => {
  const R = 3;
  const ncs = await connections(R + 1);
  const job = jobId();
  const nonces: Buffer[] = [];
  const spy = ncs[R];
  spy.subscribe(`dqlora.${job}.ar.>`, { callback: (_e, m) => { nonces.push(dqOf(m).subarray(NONCE_AT, NONCE_AT + NONCE)); } });
  await spy.flush();
  const rng = new Philox(5);
  const n = 120_001; // 160 KB slices: 3 chunks each under 64 KiB
  // Two lives of the same job: the second re-runs steps 0 and 1 with the same key (as after a restart).
  for (const life of [0, 1]) {
    const ars = await ranks(impl, ncs.slice(0, R), (rank) => ({ jobId: job, stage: 0, rank, worldSize: R, timeoutMs: 10_000, key: KEY }));
    for (const step of [0, 1]) {
      const inputs = Array.from({ length: R }, () => gradients(rng, n));
      const expected = referenceSum(inputs);
      await Promise.all(ars.map((ar, r) => ar.allReduceSum(step, inputs[r])));
      for (let r = 0; r < R; r++) assert.ok(bitsEqual(inputs[r], expected), `life ${life} step ${step} rank ${r}`);
    }
    await Promise.all(ncs.map((nc) => nc.flush()));
    for (const ar of ars) ar.close();
    if (impl === 'thread') await Promise.all((ars as ThreadedAllReduce[]).map((ar) => ar.whenClosed())); // (their connections flushed)
  }
  await spy.flush();
  const dataMessages = 2 * 2 * R * R * 3; // lives × steps × ranks × (R−1 reduce-scatter slices + 1 all-gather slice) × 3 chunks
  assert.ok(nonces.length > dataMessages, `${nonces.length} messages seen`); // and the join barrier's announcements
  assert.equal(new Set(nonces.map((x) => x.toString('hex'))).size, nonces.length, 'a nonce repeated');
  // One random prefix per instance (3 ranks × 2 lives), each with its own counter from 0.
  const counters = new Map<string, number[]>();
  for (const x of nonces) {
    const k = x.subarray(0, 8).toString('hex');
    counters.set(k, [...(counters.get(k) ?? []), x.readUInt32LE(8)]);
  }
  assert.equal(counters.size, 2 * R);
  for (const cs of counters.values()) assert.ok(cs.includes(0) && new Set(cs).size === cs.length);
});

test('an instance refuses to send past 2^32 messages (its nonce counter would wrap) and says to make a new one', { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ars = ncs.map((nc, rank) => new NatsAllReduce(nc, { jobId: job, stage: 0, rank, worldSize: 2, timeoutMs: 1000, key: KEY }));
  await Promise.all(ars.map((ar) => ar.allReduceSum(0, new Float32Array(10))));
  (ars[0] as unknown as { sender: { sealer: { sent: number } } }).sender.sealer.sent = 2 ** 32 - 1; // one nonce left
  const res = await Promise.allSettled(ars.map((ar) => ar.allReduceSum(1, new Float32Array(100_000)))); // 2 chunks to send
  assert.equal(res[0].status, 'rejected');
  assert.match(String((res[0] as PromiseRejectedResult).reason.message), /rank 0: this instance has sent 2\^32 messages, its nonce counter is spent\n {2}hint: create a new NatsAllReduce/);
  assert.equal(res[1].status, 'rejected'); // rank 1 never gets rank 0's second chunk
  for (const ar of ars) ar.close();
});

for (const impl of IMPLS) test(`${impl}: buckets: several all-reduces of one step in flight at once, started in different orders per rank, each bit-identical to the fixed-order sum`, { skip }, async () => {
  const R = 3;
  const ncs = await connections(R);
  const job = jobId();
  const ars = await ranks(impl, ncs, (rank) => ({ jobId: job, stage: 2, rank, worldSize: R, timeoutMs: 10_000, key: KEY }));
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

for (const impl of IMPLS) test(`${impl}: a rank with another key is not heard: the others time out naming it, and nothing of it is summed`, { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const a = await rank(impl, ncs[0], { jobId: job, stage: 0, rank: 0, worldSize: 2, timeoutMs: 500, key: KEY });
  const b = await rank(impl, ncs[1], { jobId: job, stage: 0, rank: 1, worldSize: 2, timeoutMs: 500, key: deriveAllReduceKey('other-token', job) });
  const buf = new Float32Array([1, 2, 3]);
  const res = await Promise.allSettled([a.allReduceSum(0, buf), b.allReduceSum(0, new Float32Array([5, 5, 5]))]);
  assert.ok(res[0].status === 'rejected' && (res[0] as PromiseRejectedResult).reason instanceof AllReduceTimeoutError);
  assert.deepEqual(Array.from(buf), [1, 2, 3]);
  assert.ok(a.stats.rejected > 0);
  a.close(); b.close();
});

for (const impl of IMPLS) test(`${impl}: messages are at most 1 MiB by default, also when the server allows 8 MiB`, { skip }, async () => {
  const big = await startNatsServer({ maxPayload: 8 << 20 });
  const ncs = await Promise.all([0, 1].map(() => connect({ servers: big.url })));
  try {
    const job = jobId();
    const ars = await Promise.all(ncs.map((nc, r) => rank(impl, nc, { jobId: job, stage: 0, rank: r, worldSize: 2, timeoutMs: 5000, key: KEY }, big.url)));
    const bufs = [new Float32Array(768 << 10).fill(1), new Float32Array(768 << 10).fill(2)]; // 3 MiB: 1.5 MiB slices
    await Promise.all(ars.map((ar, r) => ar.allReduceSum(0, bufs[r])));
    assert.ok(bufs.every((b) => b.every((x) => x === 3)));
    // Each rank: its copy of the other's slice and its reduced slice, 2 chunks each (1 MiB less the header reserve).
    assert.deepEqual(ars.map((a) => a.stats.messagesSent), [4, 4]);
    for (const ar of ars) ar.close();
    if (impl === 'thread') await Promise.all((ars as ThreadedAllReduce[]).map((ar) => ar.whenClosed()));
  } finally {
    await Promise.all(ncs.map((nc) => nc.close()));
    await big.stop();
  }
});

test('invalid options are ConfigErrors', { skip }, async () => {
  const [nc] = await connections(1);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a.b', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, key: KEY }), /cannot be a NATS subject token/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1 }), /a key of at least 16 bytes is required with 2 replicas \(got none\)/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, key: new Uint8Array(8) }), /got 8 bytes/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 2, worldSize: 2, timeoutMs: 1, key: KEY }), /rank 2 outside 0\.\.1/);
  assert.throws(() => new NatsAllReduce(nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, maxPayload: MAX_PAYLOAD * 2, key: KEY }), /exceeds the server's max_payload 65536/);
});

test('thread: invalid options are the same ConfigErrors, from start()', { skip }, async () => {
  const [nc] = await connections(1);
  await assert.rejects(rank('thread', nc, { jobId: 'a.b', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, key: KEY }), (e: unknown) => e instanceof ConfigError && /cannot be a NATS subject token/.test(e.message));
  await assert.rejects(rank('thread', nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1, maxPayload: MAX_PAYLOAD * 2, key: KEY }), /exceeds the server's max_payload 65536/);
});

test('thread: a refused connection names the address', { skip }, async () => {
  const [nc] = await connections(1);
  const url = `nats://127.0.0.1:${await freePort()}`;
  await assert.rejects(rank('thread', nc, { jobId: 'a', stage: 0, rank: 0, worldSize: 2, timeoutMs: 1000, key: KEY }, url), (e: unknown) =>
    e instanceof ConnectionError && e.message.includes(`cannot reach NATS at ${url}`));
});

test('a job may mix the implementations (same wire protocol): inline and threaded ranks end with the same fixed-order sum, bit for bit', { skip }, async () => {
  const R = 3, n = 90_001;
  const ncs = await connections(R);
  const job = jobId();
  const impls: Impl[] = ['thread', 'inline', 'thread2'];
  const ars = await Promise.all(ncs.map((nc, r) => rank(impls[r], nc, { jobId: job, stage: 0, rank: r, worldSize: R, timeoutMs: 10_000, key: KEY })));
  const rng = new Philox(4242);
  for (const step of [0, 1]) {
    const inputs = Array.from({ length: R }, () => gradients(rng, n));
    const expected = referenceSum(inputs);
    const bufs = inputs.map((x, r) => (r === 0 ? shared(x) : Float32Array.from(x))); // shared in place, or copied in and out
    await Promise.all(ars.map((ar, r) => ar.allReduceSum(step, bufs[r])));
    for (let r = 0; r < R; r++) assert.ok(bitsEqual(bufs[r], expected), `step ${step} rank ${r} (${impls[r]})`);
  }
  for (const ar of ars) ar.close();
});

for (const impl of IMPLS) test(`${impl}: close() during a call: the call fails at once, saying so`, { skip }, async () => {
  const ncs = await connections(2);
  const job = jobId();
  const ars = await ranks(impl, ncs, (r) => ({ jobId: job, stage: 0, rank: r, worldSize: 2, timeoutMs: 30_000, key: KEY }));
  await Promise.all(ars.map((ar) => ar.allReduceSum(0, shared(new Float32Array(1000)))));
  const call = ars[0].allReduceSum(1, shared(new Float32Array(1000))); // rank 1 never calls
  await new Promise((r) => setTimeout(r, 100));
  const t0 = Date.now();
  ars[0].close();
  await assert.rejects(call, /closed during/);
  assert.ok(Date.now() - t0 < 1000, `took ${Date.now() - t0} ms`);
  ars[1].close();
  if (impl === 'thread') {
    // Both threads of both ranks exit, connections closed.
    await Promise.all((ars as ThreadedAllReduce[]).map((ar) => ar.whenClosed()));
    await assert.rejects(ars[0].allReduceSum(2, new Float32Array(10)), /used after close/);
  }
});

test('thread: a NATS server gone mid-call fails the call at once, naming NATS (not a timeout blaming a peer)', { skip }, async () => {
  const own = await startNatsServer({ maxPayload: MAX_PAYLOAD });
  const ncs = await Promise.all([0, 1].map(() => connect({ servers: own.url, maxReconnectAttempts: -1 })));
  try {
    const job = jobId();
    const ars = await Promise.all(ncs.map((nc, r) => rank('thread', nc, { jobId: job, stage: 0, rank: r, worldSize: 2, timeoutMs: 30_000, key: KEY }, own.url)));
    await Promise.all(ars.map((ar) => ar.allReduceSum(0, shared(new Float32Array(1000)))));
    const call = ars[0].allReduceSum(1, shared(new Float32Array(1000))); // rank 1 never calls
    await new Promise((r) => setTimeout(r, 100));
    const failed = assert.rejects(call, /cannot reach NATS at .*: the all-reduce's (receive|send|gather) connection dropped/);
    const t0 = Date.now();
    await own.stop();
    await failed;
    assert.ok(Date.now() - t0 < 3000, `took ${Date.now() - t0} ms`);
    for (const ar of ars) ar.close();
    await Promise.all((ars as ThreadedAllReduce[]).map((ar) => ar.whenClosed()));
  } finally {
    await Promise.all(ncs.map((nc) => nc.close()));
    await own.stop();
  }
});
