// worker/transport/send-thread.ts: the worker's send thread over real gRPC on 127.0.0.1 — tensors arrive bit for bit in
// every wire form, errors come back typed with the gRPC status and one hint, and the moved memory is detached here.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { startPipelineServer, PipelineSendError, type PipelineServerHandle } from '../../worker/transport/pipeline.ts';
import { PipelineSender } from '../../worker/transport/send-thread.ts';
import { crc32, type HostTensor } from '../../wire/tensor.ts';
import { f32ToBf16 } from '../../common/halfprec.ts';
import { DqloraError } from '../../common/errors.ts';
import { createWorkerMetrics } from '../../common/metrics.ts';
import { Philox } from '../helpers/prng.ts';

const received: { dir: string; step: number; mb: number; t: HostTensor }[] = [];
let server: PipelineServerHandle;
let sender: PipelineSender;
const metrics = createWorkerMetrics({ processMetrics: false });
const opts = { jobId: 'job-s', jobToken: 'tok-s', deadlineMs: 20_000, maxInFlight: 4 };

before(async () => {
  server = await startPipelineServer({
    jobId: 'job-s', jobToken: 'tok-s',
    onForward: (step, mb, t) => { received.push({ dir: 'forward', step, mb, t }); },
    onBackward: (step, mb, t) => { received.push({ dir: 'backward', step, mb, t }); },
  });
  sender = new PipelineSender(metrics.sentBytes);
});
after(async () => {
  await sender.close();
  await server.close();
});

const bytes = (a: ArrayBufferView): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

test('raw bf16 bits, float32, and float32 rounded to bf16 arrive bit for bit; the memory moves to the thread', async () => {
  await sender.open('next', server.address, opts);
  await sender.open('prev', server.address, opts);
  const rng = new Philox(5);
  const x = rng.floats(3 * 700_001); // 8.4 MB: nine 1 MiB chunks, the last one short
  const bits = f32ToBf16(x);
  const want = { bf16: Buffer.from(bytes(bits)), f32: Buffer.from(bytes(x)) };

  const b16 = bits.slice();
  const ack = await sender.send('next', 'forward', 7, 0, b16, [3, 700_001], 'bf16', crc32(bytes(b16)));
  assert.deepEqual(ack, { jobId: 'job-s', step: 7, microBatch: 0, bytesReceived: bits.byteLength });
  assert.equal(b16.length, 0, 'a whole-buffer array is transferred (detached here), not copied');
  let r = received.at(-1)!;
  assert.deepEqual([r.dir, r.step, r.mb, r.t.dtype, r.t.shape], ['forward', 7, 0, 'bf16', [3, 700_001]]);
  assert.ok(bytes(r.t.data).equals(want.bf16));

  const f = x.slice();
  await sender.send('prev', 'backward', 7, 1, f, [3, 700_001], 'f32', crc32(bytes(f)));
  r = received.at(-1)!;
  assert.deepEqual([r.dir, r.t.dtype], ['backward', 'f32']);
  assert.ok(bytes(r.t.data).equals(want.f32));

  // a view into a larger buffer is copied (its siblings stay usable) and rounded to bf16 on the thread
  const big = new Float32Array(x.length + 8);
  big.set(x, 8);
  const view = big.subarray(8);
  await sender.send('next', 'forward', 7, 2, view, [3, 700_001], 'f32-as-bf16');
  assert.equal(view.length, x.length);
  r = received.at(-1)!;
  assert.equal(r.t.dtype, 'bf16');
  assert.ok(bytes(r.t.data).equals(want.bf16));

  assert.equal(sender.bytesSent.next, 2 * bits.byteLength);
  assert.equal(sender.bytesSent.prev, x.byteLength);
  const counted = (await metrics.registry.getSingleMetric('dqlora_sent_bytes_total')!.get()).values.find((v) => v.labels.transport === 'grpc')?.value;
  assert.equal(counted, 2 * bits.byteLength + x.byteLength);
});

test('several sends in flight each get their own ack', async () => {
  await sender.open('next', server.address, opts);
  const acks = await Promise.all([0, 1, 2, 3, 4, 5].map((i) => {
    const d = new Float32Array(300_000).fill(i);
    return sender.send('next', 'forward', 8, i, d, [300_000], 'f32', crc32(bytes(d)));
  }));
  assert.deepEqual(acks.map((a) => a.microBatch), [0, 1, 2, 3, 4, 5]);
  for (let i = 0; i < 6; i++) assert.equal(received.find((r) => r.step === 8 && r.mb === i)!.t.data.byteLength, 1_200_000);
});

test('a refusal comes back as PipelineSendError with its gRPC status and the hint once', async () => {
  await sender.open('next', server.address, { ...opts, jobToken: 'wrong' });
  const d = new Float32Array(16);
  const e = await sender.send('next', 'forward', 9, 0, d, [16], 'f32', crc32(bytes(d))).then(() => assert.fail('accepted'), (x: unknown) => x);
  assert.ok(e instanceof PipelineSendError, String(e));
  assert.equal(e.code, grpc.status.UNAUTHENTICATED);
  assert.match(e.message, /job token/);
  assert.ok(e.hint && e.message.includes(e.hint));
  assert.equal(e.message.split('hint:').length, 2, 'the hint appears once');
});

test('a wrong checksum is refused by the receiver (the bytes are checked, not trusted)', async () => {
  await sender.open('next', server.address, opts);
  const d = new Float32Array(1000).fill(1.5);
  const e = await sender.send('next', 'forward', 10, 0, d, [1000], 'f32', 12345).then(() => assert.fail('accepted'), (x: unknown) => x);
  assert.ok(e instanceof PipelineSendError);
  assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
  assert.match(e.message, /checksum mismatch/);
});

test('after the peers are closed, a send says there is no stage to send to', async () => {
  await sender.closePeers();
  const d = new Float32Array(4);
  await assert.rejects(sender.send('prev', 'backward', 11, 0, d, [4], 'f32'), (e: unknown) => e instanceof DqloraError && /no previous stage to send to/.test((e as Error).message));
});
