// The worker process (`worker start`): serves its Pipeline endpoint, registers with the coordinator, sends
// heartbeats, and executes the coordinator's commands one after the other (assign stage, run step, apply
// update, upload state, abort, shutdown), answering each with a Report. The worker decides nothing: the
// coordinator owns planning, retries and recovery.
//
// Lifetime: the worker exits when the coordinator says Shutdown, when its command stream ends or breaks
// (coordinator gone: nothing to wait for), or when heartbeats keep failing — it never hangs on a dead job.
// Exit codes: 0 the coordinator said Shutdown (the job is over: a Kubernetes Indexed Job counts the index done),
// 75 lost its coordinator (EXIT_COORDINATOR_LOST: the pod is replaced and rejoins the restarted coordinator),
// 1 this worker failed.
import { channelCredentials, tlsMismatchHint } from '../common/tls.ts';
import os from 'node:os';
import * as grpc from '@grpc/grpc-js';
import type { BackendName } from '../core/engine/index.ts';
import { StageRunner } from './runtime/stage-runner.ts';
import { STAGE_FEATURES_CAPABILITY, assignmentFromWire, generationId } from '../wire/assignment.ts';
import { chunkState } from '../wire/state.ts';
import { PipelineReceiver } from './transport/receive-thread.ts';
import { DqloraError, WireError } from '../common/errors.ts';
import { logger } from '../common/log.ts';
import { exitWithParent } from '../common/parent-watch.ts';
import { RejectionLog } from '../common/grpc-guard.ts';
import { createWorkerMetrics, serveMetrics, type MetricsServer, type WorkerMetrics } from '../common/metrics.ts';
import { DEFAULT_CHUNK_BYTES } from '../wire/tensor.ts';
import { freeMemoryBytes, totalMemoryBytes } from '../common/container.ts';
import { WorkerHealth } from './health.ts';
import {
  ControlClient, DeviceKind, StepStats, WorkerState, type Command, type RegisterReply, type StepReport, type ReportAck, type StateChunk,
} from '../proto/gen/dqlora/v1/control.ts';

const log = logger('worker');

export interface WorkerOptions {
  /** host:port of the coordinator's Control service. */
  readonly coordinator: string;
  readonly jobToken: string;
  /** Backend of the stage's compute thread: cpu, cuda or auto. */
  readonly device: BackendName;
  /** host:port for this worker's Pipeline server (port 0 = OS-assigned). */
  readonly listen: string;
  /** Address other stages dial (default: the listen host, or this host's name when listening on 0.0.0.0). */
  readonly advertise?: string;
  /** NATS URL to use instead of the coordinator's (e.g. a node-local address). */
  readonly natsUrl?: string;
  /** Serve /metrics here (0 = OS-assigned); undefined = no metrics endpoint. */
  readonly metricsPort?: number;
  /** How long to keep retrying the first registration while the coordinator is not up (default 60 s). */
  readonly registerTimeoutMs?: number;
}

/** Test hook: DQLORA_FAULT_KILL_AT_STEP=N makes the worker SIGKILL itself when RunStep N arrives. */
const faultStep = process.env.DQLORA_FAULT_KILL_AT_STEP !== undefined ? Number(process.env.DQLORA_FAULT_KILL_AT_STEP) : undefined;

/** Exit code when the coordinator went away without saying Shutdown: rejoin (EX_TEMPFAIL, as the coordinator's stop). */
export const EXIT_COORDINATOR_LOST = 75;

/** Deadline of unary control calls. */
const CONTROL_DEADLINE_MS = 10_000;

function unary<Req, Res>(fn: (req: Req, md: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r: Res) => void) => unknown, req: Req, deadlineMs = CONTROL_DEADLINE_MS): Promise<Res> {
  return new Promise((resolve, reject) => {
    fn(req, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (e, r) => (e ? reject(e) : resolve(r)));
  });
}

/** Runs a worker until the job ends; resolves with the exit code. */
export async function runWorker(o: WorkerOptions): Promise<number> {
  // A worker started by a local coordinator dies with it (stdin pipe / parent pid: common/parent-watch.ts).
  const parentWatch = exitWithParent();
  const metrics: WorkerMetrics = createWorkerMetrics({ defaultLabels: { role: 'worker' } });
  let metricsServer: MetricsServer | undefined;
  const health = new WorkerHealth(); // /healthz = alive, /readyz = a loaded stage (worker/health.ts)
  if (o.metricsPort !== undefined) {
    metricsServer = await serveMetrics(metrics.registry, o.metricsPort, undefined, health);
    log.info({ port: metricsServer.port }, 'metrics on /metrics');
  }
  const runner = await StageRunner.start(o.device, o.jobToken, metrics);
  const backendName = runner.backendName;
  log.info({ backend: backendName, activations: runner.device.actDtype }, 'compute thread ready');
  const rejections = new RejectionLog('pipeline', log, metrics.rejectedRequests);
  const [host, portStr] = splitHostPort(o.listen, '--listen');
  // The Pipeline server runs on the receive thread (worker/transport/receive-thread.ts): incoming tensors are parsed,
  // checked and reassembled there and arrive here whole. The job id is known only after the assignment: until then
  // every tensor is refused as foreign. Hygiene (keepalive, idle/age limits, per-peer connection limit) is set up on
  // that thread; refusals are counted and logged (rate-limited) here.
  const pipeline = await PipelineReceiver.start({
    host, port: Number(portStr), jobId: '(unassigned)', jobToken: o.jobToken, receivedBytes: metrics.receivedBytes,
    maxMessageBytes: 4 * DEFAULT_CHUNK_BYTES, rejections, recycle: runner.receiverPort(),
    onTensor: (dir, seq, mb, t) => runner.inbox.put(dir, seq, mb, t),
  });
  const advertise = o.advertise ?? `${host === '0.0.0.0' || host === '::' ? os.hostname() : host}:${pipeline.port}`;
  const client = new ControlClient(o.coordinator, channelCredentials(), { 'grpc.max_send_message_length': 8 << 20, 'grpc.max_receive_message_length': 64 << 20 });

  // 1. register (retrying while the coordinator is not up yet)
  const deadline = Date.now() + (o.registerTimeoutMs ?? 60_000);
  let reg: RegisterReply;
  let tlsChecked = false;
  for (let wait = 100; ; wait = Math.min(2000, wait * 2)) {
    try {
      reg = await unary(client.register.bind(client), {
        jobToken: o.jobToken, hostname: os.hostname(), listenAddress: advertise, capabilities: [backendName, `pid:${process.pid}`, STAGE_FEATURES_CAPABILITY],
        device: { kind: backendName === 'cuda' ? DeviceKind.DEVICE_KIND_CUDA : DeviceKind.DEVICE_KIND_CPU, name: backendName === 'cpu' ? os.cpus()[0]?.model ?? 'cpu' : 'cuda', totalMemoryBytes: totalMemoryBytes(), freeMemoryBytes: freeMemoryBytes(), cpuThreads: runner.device.threads },
      });
      break;
    } catch (e) {
      const err = e as grpc.ServiceError;
      // Plaintext meeting TLS (either way) looks like "unavailable" to grpc-js and would be retried for the
      // whole registration timeout: ask the server once which it speaks, and stop at once with what to set.
      if (!tlsChecked && (err.code === grpc.status.UNAVAILABLE || err.code === grpc.status.INTERNAL)) {
        tlsChecked = true;
        const hint = await tlsMismatchHint(o.coordinator);
        if (hint) { await cleanup(); throw new DqloraError(`cannot register with the coordinator at ${o.coordinator}: TLS and plaintext do not meet`, { hint, cause: e }); }
      }
      if (err.code === grpc.status.UNAUTHENTICATED || err.code === grpc.status.PERMISSION_DENIED || Date.now() > deadline) {
        await cleanup();
        throw new DqloraError(`cannot register with the coordinator at ${o.coordinator}: ${err.details || err.message}`, {
          hint: err.code === grpc.status.UNAUTHENTICATED ? 'the job token differs from the coordinator\'s (--job-token-file / DQLORA_JOB_TOKEN)' : 'is the coordinator running and reachable?', cause: e,
        });
      }
      await new Promise((r) => setTimeout(r, wait));
    }
  }
  if (!reg.accepted) { await cleanup(); throw new DqloraError(`the coordinator refused this worker: ${reg.reason}`); }
  const id = reg.workerId;
  log.info({ id, coordinator: o.coordinator, pipeline: advertise }, 'registered');

  let state = WorkerState.WORKER_STATE_REGISTERED;
  health.track(() => state);
  let lastStep = -1;
  let exitCode = 0;
  let finish!: () => void;
  const finished = new Promise<void>((r) => { finish = r; });
  let stopping = false;
  const stop = (code: number, why: string): void => {
    if (stopping) return;
    stopping = true;
    exitCode = code;
    (code === 0 ? log.info.bind(log) : log.error.bind(log))({ id }, why);
    finish();
  };

  // 2. heartbeats; a coordinator unreachable for 10 intervals (at least 30 s) ends the worker
  const hbMs = Math.max(50, reg.heartbeatIntervalMs || 1000);
  let lastOk = Date.now();
  const hb = setInterval(() => {
    unary(client.heartbeat.bind(client), { jobToken: o.jobToken, workerId: id, state, step: lastStep, memoryInUseBytes: runner.memoryInUse(), freeMemoryBytes: freeMemoryBytes() }, Math.max(1000, hbMs * 2))
      .then((r) => { lastOk = Date.now(); if (!r.ok) stop(EXIT_COORDINATOR_LOST, `the coordinator does not know this worker any more: ${r.reason}`); })
      .catch(() => { if (Date.now() - lastOk > Math.max(30_000, 10 * hbMs)) stop(EXIT_COORDINATOR_LOST, `no contact with the coordinator at ${o.coordinator} for ${Math.round((Date.now() - lastOk) / 1000)} s`); });
  }, hbMs);

  const report = (r: Omit<StepReport, 'jobToken' | 'workerId'>): Promise<ReportAck> =>
    unary(client.report.bind(client), { jobToken: o.jobToken, workerId: id, ...r });

  const putState = (commandId: number, step: number, bytes: Uint8Array): Promise<ReportAck> => new Promise((resolve, reject) => {
    const md = new grpc.Metadata();
    const call = client.putState(md, { deadline: Date.now() + 120_000 }, (e, ack) => (e ? reject(e) : resolve(ack)));
    const chunks: StateChunk[] = chunkState(bytes, { jobToken: o.jobToken, workerId: id, commandId, step }, 4 * DEFAULT_CHUNK_BYTES - 4096);
    (async () => {
      for (const c of chunks) if (!call.write(c)) await new Promise<void>((r) => call.once('drain', () => r()));
      call.end();
    })().catch(reject);
  });

  // 3. commands, executed strictly in order; Abort / AssignStage / Shutdown also cut the step in flight at once
  let queue = Promise.resolve();
  const execute = async (cmd: Command): Promise<void> => {
    const k = cmd.kind;
    if (!k) return;
    const base = { commandId: cmd.commandId, step: lastStep };
    try {
      switch (k.$case) {
        case 'assignStage': {
          state = WorkerState.WORKER_STATE_LOADING;
          const a = assignmentFromWire(k.assignStage, o.natsUrl);
          await runner.assign(a);
          pipeline.setJobId(generationId(a));
          pipeline.setMinStep(a.firstSeq);
          state = WorkerState.WORKER_STATE_READY;
          await report({ ...base, step: -1, error: '' });
          break;
        }
        case 'runStep': {
          // Fault injection for the recovery tests: die like `kill -9` when this step arrives (mid-step for
          // the job: the other workers are already running it and wait on this one).
          if (faultStep !== undefined && k.runStep.step === faultStep && !k.runStep.forwardOnly) process.kill(process.pid, 'SIGKILL');
          state = WorkerState.WORKER_STATE_TRAINING;
          pipeline.setMinStep(k.runStep.seq);
          const t0 = performance.now();
          const stats = await runner.runStep(k.runStep);
          if (!k.runStep.forwardOnly) metrics.stepDuration.observe((performance.now() - t0) / 1000);
          state = WorkerState.WORKER_STATE_READY;
          await report({ ...base, step: k.runStep.step, stats, error: '' });
          break;
        }
        case 'applyUpdate': {
          const sec = await runner.applyUpdate(k.applyUpdate);
          lastStep = k.applyUpdate.step;
          await report({ ...base, step: lastStep, stats: StepStats.fromPartial({ optimizerSeconds: sec }), error: '' });
          break;
        }
        case 'uploadState': {
          state = WorkerState.WORKER_STATE_CHECKPOINTING;
          const t0 = performance.now();
          const bytes = await runner.stateBytes(k.uploadState.includeMoments);
          await putState(cmd.commandId, k.uploadState.step, bytes);
          state = WorkerState.WORKER_STATE_READY;
          await report({ ...base, stats: StepStats.fromPartial({ checkpointBytes: bytes.byteLength, checkpointSeconds: (performance.now() - t0) / 1000 }), error: '' });
          break;
        }
        case 'abort':
          state = runner.assignment ? WorkerState.WORKER_STATE_READY : WorkerState.WORKER_STATE_REGISTERED;
          await report({ ...base, error: '' });
          break;
        case 'shutdown':
          stop(0, `shutdown: ${k.shutdown.reason}`);
          break;
      }
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      log.warn({ id, command: k.$case, err: msg }, 'command failed');
      if (k.$case === 'runStep' || k.$case === 'assignStage') runner.abort(msg);
      state = runner.assignment ? WorkerState.WORKER_STATE_READY : WorkerState.WORKER_STATE_FAILED;
      await report({ ...base, error: msg }).catch(() => { /* the coordinator is gone: the stream end stops us */ });
    }
  };
  const md = new grpc.Metadata();
  const stream = client.commands({ workerId: id, jobToken: o.jobToken }, md);
  let shutdownSeen = false; // the stream may end before the queued Shutdown runs: it still counts as "job over"
  stream.on('data', (cmd: Command) => {
    const k = cmd.kind?.$case;
    if (k === 'shutdown') shutdownSeen = true;
    if (cmd.kind?.$case === 'abort') runner.abort(cmd.kind.abort.reason);
    else if (k === 'assignStage' || k === 'shutdown') runner.abort(`${k} received`);
    queue = queue.then(() => execute(cmd));
  });
  stream.on('error', (e: grpc.ServiceError) => { if (e.code !== grpc.status.CANCELLED) stop(shutdownSeen ? 0 : EXIT_COORDINATOR_LOST, `command stream from ${o.coordinator} broke: ${e.details || e.message}`); });
  stream.on('end', () => stop(stopping ? exitCode : shutdownSeen ? 0 : EXIT_COORDINATOR_LOST, shutdownSeen ? 'shutdown: the coordinator closed the command stream' : 'the coordinator closed the command stream without a shutdown'));

  await finished;
  clearInterval(hb);
  stream.cancel();
  await cleanup();
  return exitCode;

  async function cleanup(): Promise<void> {
    parentWatch?.stop();
    await runner.close().catch(() => {});
    await pipeline.close();
    client.close();
    await metricsServer?.close();
  }
}

export function splitHostPort(s: string, what: string): [string, string] {
  const i = s.lastIndexOf(':');
  const host = i > 0 ? s.slice(0, i).replace(/^\[|\]$/g, '') : '', port = s.slice(i + 1);
  if (i <= 0 || !/^\d+$/.test(port) || Number(port) > 65535) throw new WireError(`${what} "${s}" is not HOST:PORT`, { hint: 'e.g. 127.0.0.1:0 (port 0 = any free port)' });
  return [host, port];
}
