// worker/transport/receive-thread.ts: the worker's Pipeline server on its own thread, over real gRPC on 127.0.0.1 —
// tensors arrive whole on the main thread (moved, bit for bit), the stage's refusal refuses the send, the job id and
// the minimum step set from here take effect there, refusals and bytes are counted here, and close() ends it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { PipelineClient, PipelineSendError } from '../../worker/transport/pipeline.ts';
import { PipelineReceiver } from '../../worker/transport/receive-thread.ts';
import { DqloraError } from '../../common/errors.ts';
import { createWorkerMetrics } from '../../common/metrics.ts';
import { Philox } from '../helpers/prng.ts';
import type { HostTensor } from '../../wire/tensor.ts';

const metrics = createWorkerMetrics({ processMetrics: false });
const rejections: { reason: string; message: string }[] = [];
const got: { dir: string; step: number; mb: number; t: HostTensor }[] = [];
let refuse = false;
let rx: PipelineReceiver;
const clients: PipelineClient[] = [];
const client = (jobId = 'job-r1', jobToken = 'tok-r'): PipelineClient => {
  const c = new PipelineClient(rx.address, { jobId, jobToken, deadlineMs: 20_000 });
  clients.push(c);
  return c;
};

before(async () => {
  rx = await PipelineReceiver.start({
    host: '127.0.0.1', port: 0, jobId: 'job-r1', jobToken: 'tok-r', receivedBytes: metrics.receivedBytes,
    rejections: { record: (reason, _peer, message) => { rejections.push({ reason, message }); } },
    onTensor: (dir, step, mb, t) => {
      if (refuse) throw new DqloraError(`stage busy with another step`);
      got.push({ dir, step, mb, t });
    },
  });
});
after(async () => {
  for (const c of clients) c.close();
  await rx.close();
});

test('a 12 MB tensor arrives whole on this thread, bit for bit, and is counted', async () => {
  assert.ok(rx.port > 0);
  const x = new Philox(3).floats(3_000_017);
  const ack = await client().sendForward(4, 2, x, [3_000_017]);
  assert.deepEqual(ack, { jobId: 'job-r1', step: 4, microBatch: 2, bytesReceived: x.byteLength });
  const r = got.at(-1)!;
  assert.deepEqual([r.dir, r.step, r.mb, r.t.dtype, r.t.shape], ['forward', 4, 2, 'f32', [3_000_017]]);
  assert.ok(Buffer.from(r.t.data.buffer, r.t.data.byteOffset, r.t.data.byteLength).equals(Buffer.from(x.buffer)));
  await client().sendBackward(4, 3, x.subarray(0, 1000), [1000]);
  assert.equal(got.at(-1)!.dir, 'backward');
  const counted = (await metrics.receivedBytes.get()).values.find((v) => v.labels.transport === 'grpc')?.value;
  assert.equal(counted, x.byteLength + 4000);
});

test('the stage refusing a tensor refuses the send (FAILED_PRECONDITION, with the stage\'s reason)', async () => {
  refuse = true;
  try {
    const e = await client().sendForward(5, 0, new Float32Array(8), [8]).then(() => assert.fail('accepted'), (x: unknown) => x);
    assert.ok(e instanceof PipelineSendError);
    assert.equal(e.code, grpc.status.FAILED_PRECONDITION);
    assert.match(e.message, /stage busy with another step/);
  } finally { refuse = false; }
  // not delivered, so a resend is accepted
  await client().sendForward(5, 0, new Float32Array(8), [8]);
});

test('job id and minimum step set from this thread take effect on the server; refusals are reported here', async () => {
  rx.setJobId('job-r2');
  rx.setMinStep(10);
  await new Promise((r) => setTimeout(r, 50));
  const foreign = await client('job-r1').sendForward(11, 0, new Float32Array(4), [4]).then(() => assert.fail('accepted'), (x: unknown) => x);
  assert.ok(foreign instanceof PipelineSendError && foreign.code === grpc.status.FAILED_PRECONDITION, String(foreign));
  const stale = await client('job-r2').sendForward(9, 0, new Float32Array(4), [4]).then(() => assert.fail('accepted'), (x: unknown) => x);
  assert.ok(stale instanceof PipelineSendError && stale.code === grpc.status.FAILED_PRECONDITION && /stale/.test(stale.message), String(stale));
  await client('job-r2').sendForward(10, 0, new Float32Array(4), [4]);
  const wrongToken = await client('job-r2', 'nope').sendForward(10, 1, new Float32Array(4), [4]).then(() => assert.fail('accepted'), (x: unknown) => x);
  assert.ok(wrongToken instanceof PipelineSendError && wrongToken.code === grpc.status.UNAUTHENTICATED);
  await new Promise((r) => setTimeout(r, 50));
  assert.ok(rejections.some((r) => r.reason === 'unauthenticated' && /job token/.test(r.message)), JSON.stringify(rejections));
  assert.ok(rejections.some((r) => r.reason === 'invalid' && /job-r1/.test(r.message)), JSON.stringify(rejections));
});

test('a port already in use fails the start, naming the address', async () => {
  await assert.rejects(PipelineReceiver.start({ host: '127.0.0.1', port: rx.port, jobId: 'x', jobToken: 'y', onTensor: () => {} }),
    (e: unknown) => e instanceof DqloraError && new RegExp(`cannot listen on 127\\.0\\.0\\.1:${rx.port}`).test((e as Error).message));
});
