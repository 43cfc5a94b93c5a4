// The control plane and the worker's receiving side refuse what they must, with errors that say what and
// where: wrong job tokens (Register, a real `worker start` process), workers too old for the job's features,
// tensors for a stale / far-future pipeline sequence number or of an unassigned job, stalled workers (no
// heartbeats), malformed RunStep micro-batches, and corrupt, oversized or reordered state uploads (fuzzed: a clean
// WireError, never a crash or wrong data).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { ControlPlane, type WorkerHandle, type WorkerLostError } from '../../coordinator/distributed/control.ts';
import { ControlClient, type RegisterReply, type StateChunk } from '../../proto/gen/dqlora/v1/control.ts';
import { Inbox } from '../../worker/runtime/inbox.ts';
import { StateAssembler, chunkState, decodeStageState, encodeStageState } from '../../wire/state.ts';
import { STAGE_FEATURES_CAPABILITY, microBatchFromWire } from '../../wire/assignment.ts';
import { parseJob } from '../../coordinator/job.ts';
import { requiredWorkerCapabilities } from '../../coordinator/features.ts';
import { startPipelineServer, PipelineClient, PipelineSendError, type PipelineServerOptions } from '../../worker/transport/pipeline.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { LoraParams } from '../../core/engine/lora.ts';
import { i32ToTensor, u8ToTensor } from '../../wire/tensor.ts';
import { WireError } from '../../common/errors.ts';
import { Philox } from '../helpers/prng.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const TOKEN = 'right-token';
const plane = new ControlPlane({ jobId: 'ctl-test', jobToken: TOKEN, heartbeatIntervalMs: 100, heartbeatTimeoutMs: 600 });
const address = await plane.listen('127.0.0.1:0');
const client = new ControlClient(address, grpc.credentials.createInsecure());
after(async () => { client.close(); await plane.close(); });

function register(token: string): Promise<RegisterReply> {
  return new Promise((resolve, reject) => client.register({ jobToken: token, hostname: 'h', listenAddress: '127.0.0.1:1', capabilities: [] }, (e, r) => (e ? reject(e) : resolve(r))));
}

test('Register with a wrong job token is UNAUTHENTICATED and names the job and what to do', async () => {
  await assert.rejects(register('guess'), (e: grpc.ServiceError) => {
    assert.equal(e.code, grpc.status.UNAUTHENTICATED);
    assert.match(e.details, /Register: wrong or missing job token for job "ctl-test" \(start the worker with the coordinator's token: --job-token-file PATH or DQLORA_JOB_TOKEN\)/);
    return true;
  });
  assert.equal(plane.workers.size, 0);
  const ok = await register(TOKEN);
  assert.equal(ok.accepted, true);
  assert.match(ok.workerId, /^w\d+$/);
});

test('a job using the issue-13 features refuses a worker that does not report the stage-features capability (an older version would ignore them)', async () => {
  const job = parseJob({ model: 'm', output_dir: 'o', data: { train: 't', packing: true }, lora: { use_dora: true }, distributed: { workers: 2 } }, 'job.yaml', '/tmp');
  const p = new ControlPlane({ jobId: 'caps', jobToken: TOKEN, heartbeatIntervalMs: 100, heartbeatTimeoutMs: 600, requiredCapabilities: requiredWorkerCapabilities(job) });
  const c = new ControlClient(await p.listen('127.0.0.1:0'), grpc.credentials.createInsecure());
  const reg = (capabilities: string[]): Promise<RegisterReply> => new Promise((resolve, reject) => c.register({ jobToken: TOKEN, hostname: 'old-host', listenAddress: '127.0.0.1:1', capabilities }, (e, r) => (e ? reject(e) : resolve(r))));
  try {
    const old = await reg(['cpu', 'pid:1']);
    assert.equal(old.accepted, false);
    assert.match(old.reason, /this job needs data\.packing: true, lora\.use_dora: true, which this worker does not report \(capability "stage-features:1"\): it runs an older dqlora — upgrade the worker/);
    assert.equal(p.workers.size, 0, 'not taken');
    assert.equal((await reg(['cpu', STAGE_FEATURES_CAPABILITY])).accepted, true);
    // A plain QLoRA job takes any worker.
    assert.deepEqual(requiredWorkerCapabilities(parseJob({ model: 'm', output_dir: 'o', data: { train: 't' } }, 'job.yaml', '/tmp')), []);
  } finally {
    c.close();
    await p.close();
  }
});

test('`worker start` with a wrong token exits 1 with a clear error (a real process)', async () => {
  // Asynchronous spawn: the coordinator answering the worker lives in this process's event loop.
  const p = spawn(process.execPath, [join(ROOT, 'bin', 'worker.js'), 'start', '--coordinator', address, '--device', 'cpu', '--job-token', 'nope'], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DQLORA_LOG_LEVEL: 'error' } });
  let stderr = '';
  p.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  const status = await new Promise<number | null>((resolve) => p.on('exit', (code) => resolve(code)));
  const r = { status, stderr };
  assert.equal(r.status, 1, r.stderr);
  assert.match(r.stderr, /cannot register with the coordinator at 127\.0\.0\.1:\d+: Register: wrong or missing job token/);
  assert.match(r.stderr, /hint: the job token differs/);
});

test('a registered worker that stops sending heartbeats is declared lost with its id', async () => {
  const reg = await register(TOKEN);
  const md = new grpc.Metadata();
  const stream = client.commands({ workerId: reg.workerId, jobToken: TOKEN }, md);
  stream.on('error', () => {});
  const lost = await new Promise<{ w: WorkerHandle; err: WorkerLostError }>((resolve) => plane.onLost((w, err) => { if (w.id === reg.workerId) resolve({ w, err }); }));
  assert.equal(lost.w.alive, false);
  assert.match(lost.err.message, new RegExp(`worker ${reg.workerId} \\(stage -, replica -\\) lost: no heartbeat for \\d+\\.\\d s`));
  // Pending and later requests fail at once instead of waiting.
  await assert.rejects(plane.request(lost.w, { $case: 'abort', abort: { reason: 'x' } }, 1000), /lost: not connected/);
  stream.cancel();
});

test('the worker pipeline endpoint: unassigned job, stale and far-ahead sequence numbers are refused with the reason', async () => {
  const inbox = new Inbox();
  const popts: PipelineServerOptions = {
    jobId: '(unassigned)', jobToken: TOKEN,
    onForward: (seq, mb, t) => inbox.put('forward', seq, mb, t), onBackward: (seq, mb, t) => inbox.put('backward', seq, mb, t),
  };
  const server = await startPipelineServer(popts);
  const c = new PipelineClient(server.address, { jobId: 'job-g1', jobToken: TOKEN, deadlineMs: 5000 });
  const code = async (p: Promise<unknown>, re: RegExp): Promise<number> => {
    try { await p; } catch (e) { assert.ok(e instanceof PipelineSendError); assert.match(e.message, re); return e.code; }
    assert.fail('accepted');
  };
  try {
    assert.equal(await code(c.sendForward(1, 0, new Float32Array(4), [2, 2]), /belongs to job "job-g1", this worker serves job "\(unassigned\)"/), grpc.status.FAILED_PRECONDITION);
    popts.jobId = 'job-g1'; // what the worker does on AssignStage
    inbox.begin(10);
    assert.equal(await code(c.sendForward(9, 0, new Float32Array(4), [2, 2]), /seq 9 micro-batch 0: stale, this stage is at seq 10/), grpc.status.FAILED_PRECONDITION);
    assert.equal(await code(c.sendForward(12, 0, new Float32Array(4), [2, 2]), /seq 12 micro-batch 0: too far ahead of this stage \(seq 10\)/), grpc.status.FAILED_PRECONDITION);
    // The next seq may arrive before its RunStep; it waits in the inbox.
    await c.sendForward(11, 1, new Float32Array([1, 2, 3, 4]), [2, 2]);
    await c.sendForward(10, 0, new Float32Array([5, 6, 7, 8]), [2, 2]);
    assert.deepEqual(Array.from((await inbox.take('forward', 10, 0, 1000, 'peer')).data), [5, 6, 7, 8]);
    inbox.begin(11);
    assert.deepEqual(Array.from((await inbox.take('forward', 11, 1, 1000, 'peer')).data), [1, 2, 3, 4]);
    await assert.rejects(inbox.take('backward', 11, 0, 50, 'stage 2 (127.0.0.1:9)'), /no gradients for seq 11 micro-batch 0 from stage 2 \(127\.0\.0\.1:9\) within 0\.1 s/);
    const waiting = inbox.take('forward', 11, 5, 10_000, 'peer');
    inbox.abort('worker w3 lost');
    await assert.rejects(waiting, /step aborted: worker w3 lost/);
  } finally {
    c.close();
    await server.close();
  }
});

test('RunStep micro-batches with missing or mis-shaped tensors are WireErrors naming the field', () => {
  const spec = { firstLayer: 0, lastLayer: 1, hasEmbedding: true, hasHead: false };
  const good = { index: 0, inputIds: i32ToTensor(new Int32Array(6), [2, 3]), keyMask: u8ToTensor(new Uint8Array(6).fill(1), [2, 3]), positions: i32ToTensor(new Int32Array(6), [2, 3]), sampleIds: i32ToTensor(new Int32Array(2), [2]) };
  const b = microBatchFromWire(good, spec, 'seq 1 micro-batch 0');
  assert.deepEqual([b.B, b.T, b.ids!.length, Array.from(b.keyMask)], [2, 3, 6, [1, 1, 1, 1, 1, 1]]);
  assert.throws(() => microBatchFromWire({ ...good, inputIds: undefined }, spec, 'seq 1 micro-batch 0'), (e: Error) => e instanceof WireError && /seq 1 micro-batch 0 input_ids: missing tensor/.test(e.message));
  assert.throws(() => microBatchFromWire({ ...good, positions: i32ToTensor(new Int32Array(4), [2, 2]) }, spec, 'mb'), /mb positions: expected shape \[2, 3\], got \[2, 2\]/);
  assert.throws(() => microBatchFromWire({ ...good, sampleIds: u8ToTensor(new Uint8Array(2), [2]) }, spec, 'mb'), /mb sample_ids: expected dtype i32, got u8/);
  // The last stage needs targets; the first stage's ids are not required there.
  assert.throws(() => microBatchFromWire({ ...good, inputIds: undefined }, { ...spec, hasEmbedding: false, hasHead: true }, 'mb'), /mb targets: missing tensor/);
});

test('state uploads: round trip; reordered, oversized and corrupted streams are WireErrors; fuzzed bytes never crash', async () => {
  const be = await createCpuBackend();
  const params = [0, 1].map((i) => LoraParams.init(be, `model.layers.${i}.self_attn.q_proj`, 8, 6, { r: 2, alpha: 4, dropout: 0, useRslora: false }, 5));
  const bytes = encodeStageState(be, 1, params, true);
  const dec = decodeStageState(bytes, 'state');
  assert.equal(dec.stage, 1);
  assert.deepEqual(dec.modules.map((m) => [m.path, m.r, m.inFeatures, m.outFeatures]), params.map((p) => [p.name, 2, 8, 6]));
  assert.deepEqual(dec.modules[0].A, be.download(params[0].A));
  assert.equal(dec.moments!.length, 2);
  assert.equal(decodeStageState(encodeStageState(be, 1, params, false), 's').moments, undefined);

  const head = { jobToken: TOKEN, workerId: 'w1', commandId: 3, step: 2 };
  const chunks: StateChunk[] = chunkState(bytes, head, 100);
  assert.ok(chunks.length > 3);
  const assemble = (cs: StateChunk[], max = 1 << 20): Uint8Array => { const a = new StateAssembler(max, 'PutState'); for (const c of cs) a.push(c); return a.finish(); };
  assert.deepEqual(Buffer.from(assemble(chunks)), Buffer.from(bytes));
  assert.throws(() => assemble([chunks[0], chunks[2]]), /PutState chunk 2\/\d+: expected chunk 1/);
  assert.throws(() => assemble([chunks[1]]), /must start at chunk 0/);
  assert.throws(() => assemble(chunks.slice(0, 2)), /stream ended after 2 of \d+ chunks/);
  assert.throws(() => assemble(chunks, 150), /state larger than the 150-byte limit/);
  assert.throws(() => assemble([chunks[0], { ...chunks[1], workerId: 'w2' }]), /header fields changed mid-stream/);
  const bad = Buffer.from(chunks[1].data); bad[3] ^= 0x10;
  assert.throws(() => assemble([chunks[0], { ...chunks[1], data: bad }, ...chunks.slice(2)]), /checksum mismatch/);

  // Fuzz: random bytes and single-byte mutations decode to a valid state or fail with a WireError.
  const rng = new Philox(11);
  for (let i = 0; i < 400; i++) {
    const input = i % 2 ? rng.bytes(rng.int(300)) : (() => { const m = Buffer.from(bytes); for (let k = 0; k < 1 + rng.int(4); k++) m[rng.int(m.length)] = rng.int(256); return m; })();
    try {
      const d = decodeStageState(input, 'fuzz');
      for (const m of d.modules) { assert.equal(m.A.length, m.r * m.inFeatures); assert.equal(m.B.length, m.outFeatures * m.r); }
    } catch (e) {
      assert.ok(e instanceof WireError, `non-WireError: ${(e as Error).stack}`);
    }
  }
});
