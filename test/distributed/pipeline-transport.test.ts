// worker/transport/pipeline.ts over real gRPC on 127.0.0.1 with OS-assigned ports.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { startPipelineServer, PipelineClient, PipelineSendError, type PipelineServerHandle } from '../../worker/transport/pipeline.ts';
import { chunkTensor, decodeChunk, f32ToBf16Tensor, f32ToTensor, type HostTensor, type TensorChunk } from '../../wire/tensor.ts';
import { decodeChunkFast, encodeChunkFast } from '../../worker/transport/chunk-codec.ts';
import { ActivationChunk } from '../../proto/gen/dqlora/v1/pipeline.ts';
import { WireError } from '../../common/errors.ts';
import { createWorkerMetrics } from '../../common/metrics.ts';
import { Philox } from '../helpers/prng.ts';

interface Received { dir: 'forward' | 'backward'; step: number; mb: number; t: HostTensor }
const received: Received[] = [];
let server: PipelineServerHandle;
const metrics = createWorkerMetrics({ processMetrics: false });
const clients: PipelineClient[] = [];

function client(opts: Partial<ConstructorParameters<typeof PipelineClient>[1]> = {}): PipelineClient {
  const c = new PipelineClient(server.address, { jobId: 'job-1', jobToken: 'secret-token', deadlineMs: 20_000, ...opts });
  clients.push(c);
  return c;
}

before(async () => {
  server = await startPipelineServer({
    jobId: 'job-1',
    jobToken: 'secret-token',
    onForward: (step, mb, t) => { received.push({ dir: 'forward', step, mb, t }); },
    onBackward: (step, mb, t) => { received.push({ dir: 'backward', step, mb, t }); },
    receivedBytes: metrics.receivedBytes,
  });
});
after(async () => {
  for (const c of clients) c.close();
  await server.close();
});

async function rejected(p: Promise<unknown>, code: grpc.status, re: RegExp): Promise<PipelineSendError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof PipelineSendError, `expected PipelineSendError, got ${String(e)}`);
    assert.equal(grpc.status[e.code], grpc.status[code], e.message);
    assert.match(e.message, re);
    return e;
  }
  assert.fail(`expected a ${grpc.status[code]} rejection`);
}

test('a 10 MB activation tensor goes forward in chunks and arrives bit-identical; gradients go back', async () => {
  assert.ok(server.port > 0);
  const rng = new Philox(11);
  const shape = [2, 1280, 1024]; // [B, T, C] = 2.6M floats = 10 MiB
  const x = rng.floats(2 * 1280 * 1024);
  const c = client({ sentBytes: metrics.sentBytes });
  const ack = await c.sendForward(0, 3, x, shape);
  assert.deepEqual(ack, { jobId: 'job-1', step: 0, microBatch: 3, bytesReceived: x.byteLength });
  const r = received.at(-1)!;
  assert.deepEqual([r.dir, r.step, r.mb, r.t.dtype, r.t.shape], ['forward', 0, 3, 'f32', shape]);
  assert.ok(Buffer.from(r.t.data.buffer).equals(Buffer.from(x.buffer)), 'activations differ after the round trip');
  // More than 10 chunks of ≤ 1 MiB went over the wire.
  assert.ok(chunkTensor({ jobId: 'job-1', step: 0, microBatch: 3 }, f32ToTensor(x, shape)).length >= 10);

  const g = rng.floats(4 * 8 * 16);
  await c.sendBackward(0, 1, g, [4, 8, 16], { dtype: 'bf16' });
  const rb = received.at(-1)!;
  assert.deepEqual([rb.dir, rb.t.dtype, rb.t.shape], ['backward', 'bf16', [4, 8, 16]]);
  assert.equal(c.stats.bytesSent, x.byteLength + g.length * 2);
  const text = await metrics.registry.metrics();
  assert.match(text, new RegExp(`dqlora_sent_bytes_total\\{transport="grpc"\\} ${x.byteLength + g.length * 2}\\n`));
  assert.match(text, new RegExp(`dqlora_received_bytes_total\\{transport="grpc"\\} ${x.byteLength + g.length * 2}\\n`));
});

test('a stale step is rejected with FAILED_PRECONDITION once the stage has moved on', async () => {
  server.setMinStep(5);
  const n = received.length;
  await rejected(client().sendForward(4, 0, new Float32Array(8), [8]), grpc.status.FAILED_PRECONDITION, /stale step 4, this stage is at step 5/);
  assert.equal(received.length, n, 'a stale tensor reached the stage');
  await client().sendForward(5, 0, new Float32Array(8), [8]);
  assert.equal(received.length, n + 1);
});

test('the same (step, micro-batch) delivered twice is ALREADY_EXISTS, not a second tensor', async () => {
  const c = client();
  await c.sendForward(6, 2, new Float32Array([1, 2]), [2]);
  const n = received.length;
  await rejected(c.sendForward(6, 2, new Float32Array([1, 2]), [2]), grpc.status.ALREADY_EXISTS, /step 6 micro-batch 2: already delivered/);
  assert.equal(received.length, n);
});

test('a duplicated chunk inside a stream is rejected with INVALID_ARGUMENT naming the chunk', async () => {
  const c = client({ chunkBytes: 4096 });
  const x = new Philox(3).floats(5000);
  const chunks = chunkTensor({ jobId: 'job-1', step: 7, microBatch: 0 }, f32ToTensor(x, [5000]), 4096);
  assert.ok(chunks.length >= 4);
  const n = received.length;
  await rejected(c.sendChunks('forward', [chunks[0], chunks[1], chunks[1], ...chunks.slice(2)]), grpc.status.INVALID_ARGUMENT, /duplicate chunk 1/);
  await rejected(c.sendChunks('forward', [chunks[0], chunks[2]]), grpc.status.INVALID_ARGUMENT, /out-of-order chunk, expected index 1/);
  await rejected(c.sendChunks('forward', chunks.slice(0, 2)), grpc.status.INVALID_ARGUMENT, /stream ended after 2 of \d+ chunks/);
  const bad = Buffer.from(chunks[1].tensor!.data);
  bad[0] ^= 1;
  const e = await rejected(c.sendChunks('forward', [chunks[0], { ...chunks[1], tensor: { ...chunks[1].tensor!, data: bad } }, ...chunks.slice(2)]),
    grpc.status.INVALID_ARGUMENT, /checksum mismatch/);
  assert.equal(e.retryable, true);
  assert.equal(received.length, n);
  // The intact stream is still accepted afterwards.
  await c.sendChunks('forward', chunks);
  assert.deepEqual(received.at(-1)!.t.data, x);
});

test('a message above the receiver\'s limit is RESOURCE_EXHAUSTED; so is a tensor above its size bound', async () => {
  // A sender configured with 4 MiB chunks against a receiver that takes 1 MiB messages.
  const c = client({ chunkBytes: 4 << 20 });
  const e = await rejected(c.sendForward(8, 0, new Float32Array(600_000), [600_000]), grpc.status.RESOURCE_EXHAUSTED, /larger than max/);
  assert.equal(e.retryable, false);
  assert.match(e.message, /hint: the sender's chunk limit exceeds the receiver's message limit/);
  const small = await startPipelineServer({ jobId: 'job-1', jobToken: 'secret-token', maxNumel: 1000, onForward: () => {}, onBackward: () => {} });
  try {
    const c2 = new PipelineClient(small.address, { jobId: 'job-1', jobToken: 'secret-token' });
    await rejected(c2.sendForward(0, 0, new Float32Array(1001), [1001]), grpc.status.RESOURCE_EXHAUSTED, /more than 1000 elements/);
    c2.close();
  } finally {
    await small.close();
  }
});

test('a wrong or missing job token is UNAUTHENTICATED; a chunk of another job is FAILED_PRECONDITION', async () => {
  const n = received.length;
  const e = await rejected(client({ jobToken: 'guess' }).sendForward(9, 0, new Float32Array(4), [4]), grpc.status.UNAUTHENTICATED, /wrong job token for job "job-1"/);
  assert.equal(e.retryable, false);
  await rejected(client({ jobToken: '' }).sendBackward(9, 0, new Float32Array(4), [4]), grpc.status.UNAUTHENTICATED, /job token/);
  await rejected(client({ jobId: 'job-2' }).sendForward(9, 0, new Float32Array(4), [4]), grpc.status.FAILED_PRECONDITION, /belongs to job "job-2", this worker serves job "job-1"/);
  assert.equal(received.length, n);
});

test('nobody listening: UNAVAILABLE, retryable, with a hint', async () => {
  const gone = await startPipelineServer({ jobId: 'j', jobToken: 't', onForward: () => {}, onBackward: () => {} });
  const addr = gone.address;
  await gone.close();
  const c = new PipelineClient(addr, { jobId: 'j', jobToken: 't', deadlineMs: 3000 });
  try {
    const e = await rejected(c.sendForward(0, 0, new Float32Array(4), [4]), grpc.status.UNAVAILABLE, /UNAVAILABLE/);
    assert.equal(e.retryable, true);
  } finally {
    c.close();
  }
});

// ---- tensors in flight -------------------------------------------------------------------------------

/** A receiver whose stage holds every tensor until the test releases it (the ack waits for the handler). */
async function holdingServer(maxInFlight?: number) {
  const got: { dir: string; mb: number }[] = [];
  const held: (() => void)[] = [];
  const srv = await startPipelineServer({
    jobId: 'job-1', jobToken: 'secret-token', maxInFlight,
    onForward: (_s, mb) => { got.push({ dir: 'forward', mb }); return new Promise<void>((r) => held.push(r)); },
    onBackward: (_s, mb) => { got.push({ dir: 'backward', mb }); },
  });
  return { srv, got, held };
}
async function until(cond: () => boolean, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > 10_000) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('a sender keeps at most maxInFlight tensors per direction on the wire; later sends queue in call order, without awaiting acks', async () => {
  const { srv, got, held } = await holdingServer();
  const c = new PipelineClient(srv.address, { jobId: 'job-1', jobToken: 'secret-token', maxInFlight: 2, chunkBytes: 4096 });
  try {
    const x = new Philox(5).floats(3000); // 3 chunks each
    const acks = [0, 1, 2, 3, 4].map((mb) => c.sendForward(0, mb, x, [3000]));
    await until(() => got.length === 2, 'two tensors at the receiver');
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(got.map((g) => g.mb), [0, 1], 'a third tensor went out while two were unacknowledged');
    assert.equal(c.inFlight('forward'), 2);
    assert.equal(srv.stats.inFlight.forward, 2);
    // The other direction has its own slots.
    await c.sendBackward(0, 9, x, [3000]);
    assert.deepEqual(got.at(-1), { dir: 'backward', mb: 9 });
    // Each ack frees a slot for the next send, in call order.
    for (let k = 0; k < 5; k++) {
      await until(() => held.length > k, `tensor ${k} held`);
      held[k]();
      const ack = await acks[k];
      assert.equal(ack.microBatch, k);
    }
    await c.drain();
    assert.deepEqual(got.filter((g) => g.dir === 'forward').map((g) => g.mb), [0, 1, 2, 3, 4]);
    assert.equal(c.inFlight('forward'), 0);
    assert.equal(c.stats.maxInFlightSeen.forward, 2);
    assert.equal(srv.stats.maxInFlightSeen.forward, 2);
    assert.equal(srv.stats.inFlight.forward, 0);
  } finally {
    c.close();
    await srv.close();
  }
});

test('a receiver refuses more concurrent tensors than its maxInFlight with RESOURCE_EXHAUSTED, and takes the next once one is done', async () => {
  const { srv, got, held } = await holdingServer(1);
  const c = new PipelineClient(srv.address, { jobId: 'job-1', jobToken: 'secret-token', maxInFlight: 3 });
  try {
    const first = c.sendForward(1, 0, new Float32Array(16), [16]);
    await until(() => held.length === 1, 'the first tensor held');
    const e = await rejected(c.sendForward(1, 1, new Float32Array(16), [16]), grpc.status.RESOURCE_EXHAUSTED, /more than 1 tensors in flight to this stage/);
    assert.equal(e.retryable, false);
    held[0]();
    await first;
    const third = c.sendForward(1, 2, new Float32Array(16), [16]);
    await until(() => held.length === 2, 'the next tensor held');
    held[1]();
    await third;
    assert.deepEqual(got.map((g) => g.mb), [0, 2]);
    assert.equal(srv.stats.inFlight.forward, 0);
  } finally {
    c.close();
    await srv.close();
  }
});

test('invalid in-flight and window settings are refused before anything starts', async () => {
  await assert.rejects(startPipelineServer({ jobId: 'j', jobToken: 't', maxInFlight: 0, onForward: () => {}, onBackward: () => {} }), /maxInFlight 0 must be a positive integer/);
  await assert.rejects(startPipelineServer({ jobId: 'j', jobToken: 't', flowControlWindow: 1000, onForward: () => {}, onBackward: () => {} }), /flowControlWindow 1000 must be an integer in 65535/);
  assert.throws(() => new PipelineClient('127.0.0.1:1', { jobId: 'j', jobToken: 't', maxInFlight: 1.5 }), /maxInFlight 1.5 must be a positive integer/);
});

test('chunk codec: the generated encoder\'s bytes; decoding returns views of the message; anything unusual goes to the generated decoder', () => {
  const x = new Philox(8).floats(1000);
  const cases: TensorChunk[] = [
    ...chunkTensor({ jobId: 'job-1', step: 0, microBatch: 0 }, f32ToTensor(x, [10, 100]), 1500),
    ...chunkTensor({ jobId: 'jöb-ü', step: 2 ** 40 + 3, microBatch: 70_000 }, f32ToBf16Tensor(x, [1000]), 1 << 20),
    { jobId: '', step: 0, microBatch: 0, chunkIndex: 0, numChunks: 1, tensor: { dtype: 0, shape: [], data: Buffer.alloc(0) }, crc32: 0 },
    { jobId: 'j', step: 1, microBatch: 2, chunkIndex: 3, numChunks: 4, tensor: undefined, crc32: 0xffffffff },
  ];
  for (const c of cases) {
    const fast = encodeChunkFast(c);
    assert.ok(fast.equals(Buffer.from(ActivationChunk.encode(c).finish())), `encoding differs for chunk ${c.chunkIndex} of step ${c.step}`);
    const d = decodeChunkFast(fast);
    assert.deepEqual(d, decodeChunk(fast));
    if (d.tensor && d.tensor.data.length) assert.equal(d.tensor.data.buffer, fast.buffer, 'data was copied');
  }
  // Fields in another order (valid protobuf): decoded by the generated decoder, same result.
  const c = cases[0];
  const reordered = Buffer.concat([ActivationChunk.encode({ ...c, tensor: undefined }).finish(), ActivationChunk.encode({ jobId: '', step: 0, microBatch: 0, chunkIndex: 0, numChunks: 0, crc32: 0, tensor: c.tensor }).finish()]);
  assert.deepEqual(decodeChunkFast(reordered), decodeChunk(reordered));
  // Truncated: the same WireError as the generated decoder gives.
  const cut = encodeChunkFast(c).subarray(0, 40);
  assert.throws(() => decodeChunk(cut), WireError);
  assert.throws(() => decodeChunkFast(cut), (e: unknown) => e instanceof WireError && /malformed chunk message \(40 bytes\)/.test(e.message));
});
