// The coordinator's side of the Control service: who is registered, who is alive, and request/response on
// top of the per-worker command stream (send a command, wait for the worker's Report with its id).
//
// A worker is lost when its command stream closes (process died, connection cut: noticed at once) or when
// no heartbeat arrived within the heartbeat timeout (stalled or partitioned). Everything waiting on a lost
// worker fails with WorkerLostError naming the worker, its stage and replica; nothing waits forever —
// every request also has a deadline.
import { serverCredentials } from '../../common/tls.ts';
import { RejectionLog, SERVER_HYGIENE, listenGuarded, type GuardedListener } from '../../common/grpc-guard.ts';
import crypto from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { DqloraError, WireError } from '../../common/errors.ts';
import { logger } from '../../common/log.ts';
import type { CoordinatorMetrics, WorkerStateLabel } from '../../common/metrics.ts';
import { StateAssembler } from '../../wire/state.ts';
import {
  ControlService, WorkerState, type Command, type DeviceInfo, type StepReport, type StatusReply, type StateChunk,
} from '../../proto/gen/dqlora/v1/control.ts';

const log = logger('control');

/** A worker died, stalled or was cut off; `workerId`, `stage`, `replica` say which. */
export class WorkerLostError extends DqloraError {
  constructor(readonly workerId: string, readonly stage: number, readonly replica: number, why: string) {
    super(`worker ${workerId} (stage ${stage < 0 ? '-' : stage}, replica ${replica < 0 ? '-' : replica}) lost: ${why}`, { hint: 'the job pauses and resumes from the last checkpoint when a replacement worker registers (worker start --coordinator ...)' });
  }
}

/** A worker answered a command with an error. */
export class WorkerCommandError extends DqloraError {
  constructor(readonly workerId: string, readonly stage: number, readonly replica: number, command: string, error: string) {
    super(`worker ${workerId} (stage ${stage}, replica ${replica}) failed ${command}: ${error}`);
  }
}

export interface WorkerHandle {
  readonly id: string;
  readonly hostname: string;
  readonly device: DeviceInfo | undefined;
  readonly address: string;
  /** The worker's process id, as it reported it (capability "pid:N"); the local launcher kills stalled ones by it. */
  readonly pid?: number;
  registeredAt: number;
  lastSeen: number;
  state: WorkerState;
  step: number;
  stage: number;    // -1 unassigned
  replica: number;  // -1 unassigned
  alive: boolean;
  stream?: grpc.ServerWritableStream<unknown, Command>;
  nextCommandId: number;
  pending: Map<number, { resolve(r: StepReport): void; reject(e: Error): void; timer: NodeJS.Timeout; what: string }>;
  states: Map<number, Uint8Array>;
}

export interface ControlPlaneOptions {
  readonly jobId: string;
  readonly jobToken: string;
  readonly heartbeatIntervalMs: number;
  readonly heartbeatTimeoutMs: number;
  /** Largest state upload accepted (bytes). */
  readonly maxStateBytes?: number;
  readonly metrics?: CoordinatorMetrics;
  /** Told the worker table whenever a worker registers, changes state or is lost (the job's onWorkers observers). */
  readonly onWorkers?: (workers: { id: string; stage: number; replica: number; state: string; address: string }[]) => void;
  /** Open connections allowed per remote address (default $DQLORA_MAX_CONNECTIONS_PER_PEER, else 64). */
  readonly maxConnectionsPerPeer?: number;
  /**
   * Capabilities a worker must report to be accepted, each with why the job needs it (e.g. wire/assignment.ts
   * STAGE_FEATURES_CAPABILITY for a job that packs micro-batches): a worker without one is told so and not taken.
   */
  readonly requiredCapabilities?: readonly { readonly capability: string; readonly why: string }[];
}

function tokenMatches(given: unknown, expected: string): boolean {
  if (typeof given !== 'string') return false;
  const a = crypto.createHash('sha256').update(given).digest(), b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

const STATE_LABEL: Record<number, WorkerStateLabel> = {
  [WorkerState.WORKER_STATE_REGISTERED]: 'registered', [WorkerState.WORKER_STATE_LOADING]: 'loading', [WorkerState.WORKER_STATE_READY]: 'ready',
  [WorkerState.WORKER_STATE_TRAINING]: 'training', [WorkerState.WORKER_STATE_CHECKPOINTING]: 'checkpointing', [WorkerState.WORKER_STATE_FAILED]: 'failed',
  [WorkerState.WORKER_STATE_STOPPED]: 'stopped',
};

export class ControlPlane {
  readonly workers = new Map<string, WorkerHandle>();
  private readonly server = new grpc.Server({ ...SERVER_HYGIENE, 'grpc.max_receive_message_length': 8 << 20, 'grpc.max_send_message_length': 64 << 20 });
  private listener?: GuardedListener;
  /** Refusals (wrong token, connection limits, TLS mismatch): counted and logged rate-limited. */
  readonly rejections: RejectionLog;
  private seq = 0;
  private watchdog?: NodeJS.Timeout;
  private changed: (() => void)[] = [];
  private lostListeners: ((w: WorkerHandle, err: WorkerLostError) => void)[] = [];
  jobState = 'waiting-for-workers';
  /** Set while the job shuts its workers down: their streams closing is expected, not a failure. */
  closing = false;
  progress = { step: 0, totalSteps: 0, lastLoss: 0 };

  constructor(private readonly o: ControlPlaneOptions) {
    this.rejections = new RejectionLog('control', log, o.metrics?.rejectedRequests);
    const refuse = (what: string, peer: string): void => this.rejections.record('unauthenticated', peer, `${what} with a wrong or missing job token refused`);
    const unauth = (what: string): grpc.ServiceError => Object.assign(new Error(`${what}: wrong or missing job token for job "${o.jobId}"`), {
      code: grpc.status.UNAUTHENTICATED, details: `${what}: wrong or missing job token for job "${o.jobId}" (start the worker with the coordinator's token: --job-token-file PATH or DQLORA_JOB_TOKEN)`, metadata: new grpc.Metadata(),
    });
    const unknown = (id: string): grpc.ServiceError => Object.assign(new Error(`unknown worker ${id}`), { code: grpc.status.NOT_FOUND, details: `unknown worker "${id}": register first`, metadata: new grpc.Metadata() });
    this.server.addService(ControlService, {
      register: (call: grpc.ServerUnaryCall<import('../../proto/gen/dqlora/v1/control.ts').RegisterRequest, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const r = call.request;
        if (!tokenMatches(r.jobToken, o.jobToken)) { refuse('Register', call.getPeer()); return cb(unauth('Register')); }
        if (!/^[^\s]+:\d+$/.test(r.listenAddress)) return cb(Object.assign(new Error('bad listen address'), { code: grpc.status.INVALID_ARGUMENT, details: `listen_address "${r.listenAddress}" is not HOST:PORT`, metadata: new grpc.Metadata() }));
        const missing = (o.requiredCapabilities ?? []).filter((c) => !r.capabilities.includes(c.capability));
        if (missing.length) {
          const reason = `${missing.map((c) => `this job needs ${c.why}, which this worker does not report (capability "${c.capability}")`).join('; ')}: it runs an older dqlora — upgrade the worker to the coordinator's version`;
          log.warn({ host: r.hostname, address: r.listenAddress, missing: missing.map((c) => c.capability) }, 'worker refused: it lacks a capability the job needs');
          return cb(null, { workerId: '', accepted: false, reason, heartbeatIntervalMs: 0 });
        }
        const id = `w${++this.seq}`;
        const now = Date.now();
        const pidCap = r.capabilities.map((c) => /^pid:(\d+)$/.exec(c)?.[1]).find((x) => x !== undefined);
        this.workers.set(id, {
          id, hostname: r.hostname, device: r.device, address: r.listenAddress, pid: pidCap === undefined ? undefined : Number(pidCap), registeredAt: now, lastSeen: now, state: WorkerState.WORKER_STATE_REGISTERED,
          step: -1, stage: -1, replica: -1, alive: true, nextCommandId: 1, pending: new Map(), states: new Map(),
        });
        log.info({ id, host: r.hostname, address: r.listenAddress, device: r.device?.name, freeMemoryBytes: r.device?.freeMemoryBytes, cpuThreads: r.device?.cpuThreads || undefined }, 'worker registered');
        this.updateCounts();
        cb(null, { workerId: id, accepted: true, reason: '', heartbeatIntervalMs: o.heartbeatIntervalMs });
      },
      heartbeat: (call: grpc.ServerUnaryCall<import('../../proto/gen/dqlora/v1/control.ts').HeartbeatRequest, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const r = call.request;
        if (!tokenMatches(r.jobToken, o.jobToken)) { refuse('Heartbeat', call.getPeer()); return cb(unauth('Heartbeat')); }
        const w = this.workers.get(r.workerId);
        if (!w || !w.alive) return cb(null, { ok: false, reason: w ? 'this worker was declared lost (heartbeat timeout); restart it to rejoin' : `unknown worker "${r.workerId}"` });
        w.lastSeen = Date.now(); w.step = r.step;
        if (w.state !== r.state) { w.state = r.state; this.updateCounts(); }
        cb(null, { ok: true, reason: '' });
      },
      commands: (call: grpc.ServerWritableStream<import('../../proto/gen/dqlora/v1/control.ts').CommandsRequest, Command>) => {
        const r = call.request;
        // emit('error') ends the stream with that status at once (destroy() would leave it open, unanswered)
        if (!tokenMatches(r.jobToken, o.jobToken)) { refuse('Commands', call.getPeer()); call.emit('error', unauth('Commands')); return; }
        const w = this.workers.get(r.workerId);
        if (!w || !w.alive) { call.emit('error', unknown(r.workerId)); return; }
        w.stream = call as grpc.ServerWritableStream<unknown, Command>;
        call.on('cancelled', () => this.lose(w, 'its command stream closed (process exited or connection lost)'));
        call.on('error', () => this.lose(w, 'its command stream failed'));
        this.notify();
      },
      report: (call: grpc.ServerUnaryCall<StepReport, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const r = call.request;
        if (!tokenMatches(r.jobToken, o.jobToken)) { refuse('Report', call.getPeer()); return cb(unauth('Report')); }
        const w = this.workers.get(r.workerId);
        if (!w) return cb(unknown(r.workerId));
        w.lastSeen = Date.now();
        const p = w.pending.get(r.commandId);
        if (p) { w.pending.delete(r.commandId); clearTimeout(p.timer); if (r.error) p.reject(new WorkerCommandError(w.id, w.stage, w.replica, p.what, r.error)); else p.resolve(r); }
        cb(null, { ok: true });
      },
      status: (call: grpc.ServerUnaryCall<import('../../proto/gen/dqlora/v1/control.ts').StatusRequest, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        if (!tokenMatches(call.request.jobToken, o.jobToken)) { refuse('Status', call.getPeer()); return cb(unauth('Status')); }
        cb(null, this.status());
      },
      putState: (call: grpc.ServerReadableStream<StateChunk, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const asm = new StateAssembler(o.maxStateBytes ?? 1 << 30, 'PutState');
        let failed = false;
        const fail = (code: grpc.status, msg: string): void => {
          if (failed) return;
          failed = true;
          this.rejections.record(code === grpc.status.UNAUTHENTICATED ? 'unauthenticated' : 'invalid', call.getPeer(), msg);
          cb({ code, details: msg });
        };
        call.on('data', (c: StateChunk) => {
          if (failed) return;
          if (!tokenMatches(c.jobToken, o.jobToken)) return fail(grpc.status.UNAUTHENTICATED, 'PutState: wrong or missing job token');
          try { asm.push(c); } catch (e) { fail(grpc.status.INVALID_ARGUMENT, (e as Error).message); }
        });
        call.on('end', () => {
          if (failed) return;
          try {
            const bytes = asm.finish();
            const ids = asm.ids!;
            const w = this.workers.get(ids.workerId);
            if (!w) return fail(grpc.status.NOT_FOUND, `PutState: unknown worker "${ids.workerId}"`);
            w.states.set(ids.commandId, bytes);
            o.metrics?.receivedBytes.inc({ transport: 'grpc' }, bytes.byteLength);
            cb(null, { ok: true });
          } catch (e) { fail(grpc.status.INVALID_ARGUMENT, (e as Error).message); }
        });
      },
    } as unknown as grpc.UntypedServiceImplementation);
  }

  /** Binds host:port (port 0 = OS-assigned); returns the bound address. */
  async listen(address: string): Promise<string> {
    const i = address.lastIndexOf(':');
    const host = address.slice(0, i);
    this.listener = await listenGuarded(this.server, address, serverCredentials(), { service: 'control', rejections: this.rejections, maxConnectionsPerPeer: this.o.maxConnectionsPerPeer });
    const port = this.listener.port;
    this.watchdog = setInterval(() => {
      const now = Date.now();
      for (const w of this.workers.values()) {
        if (w.alive && now - w.lastSeen > this.o.heartbeatTimeoutMs) this.lose(w, `no heartbeat for ${((now - w.lastSeen) / 1000).toFixed(1)} s (stalled or cut off)`);
      }
    }, Math.max(50, Math.min(1000, this.o.heartbeatIntervalMs)));
    return `${host}:${port}`;
  }

  onLost(f: (w: WorkerHandle, err: WorkerLostError) => void): void { this.lostListeners.push(f); }

  /** Open connections per remote address. */
  connections(): Map<string, number> { return this.listener?.connections() ?? new Map(); }

  /** Marks a worker lost: pending requests fail with WorkerLostError; its stream is closed. */
  lose(w: WorkerHandle, why: string): void {
    if (!w.alive) return;
    w.alive = false;
    w.state = this.closing ? WorkerState.WORKER_STATE_STOPPED : WorkerState.WORKER_STATE_FAILED;
    const err = new WorkerLostError(w.id, w.stage, w.replica, why);
    (this.closing ? log.debug.bind(log) : log.error.bind(log))({ id: w.id, stage: w.stage, replica: w.replica, host: w.hostname }, err.message.split('\n')[0]);
    for (const p of w.pending.values()) { clearTimeout(p.timer); p.reject(err); }
    w.pending.clear();
    try { w.stream?.end(); } catch { /* already gone */ }
    w.stream = undefined;
    this.updateCounts();
    for (const f of this.lostListeners) f(w, err);
    this.notify();
  }

  /** Live workers whose command stream is open. */
  ready(): WorkerHandle[] { return [...this.workers.values()].filter((w) => w.alive && w.stream); }

  /** Resolves when `pred` holds (checked at every registration/loss), or fails after timeoutMs. */
  async waitUntil(pred: () => boolean, timeoutMs: number, what: () => string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new DqloraError(`timed out after ${(timeoutMs / 1000).toFixed(0)} s ${what()}`, { hint: 'start more workers (worker start --coordinator HOST:PORT), or raise distributed.wait_timeout_s' });
      await new Promise<void>((r) => { const t = setTimeout(r, Math.min(left, 1000)); this.changed.push(() => { clearTimeout(t); r(); }); });
    }
  }

  private notify(): void { const c = this.changed; this.changed = []; for (const f of c) f(); }

  /** Sends a command; resolves with the worker's report (rejects on error report, loss or timeout). */
  request(w: WorkerHandle, kind: NonNullable<Command['kind']>, timeoutMs: number): Promise<StepReport> {
    if (!w.alive || !w.stream) return Promise.reject(new WorkerLostError(w.id, w.stage, w.replica, 'not connected'));
    const commandId = w.nextCommandId++;
    const what = `${kind.$case} (command ${commandId})`;
    const p = new Promise<StepReport>((resolve, reject) => {
      const timer = setTimeout(() => {
        w.pending.delete(commandId);
        reject(new WorkerLostError(w.id, w.stage, w.replica, `no answer to ${what} within ${(timeoutMs / 1000).toFixed(1)} s (stalled?)`));
      }, timeoutMs);
      w.pending.set(commandId, { resolve, reject, timer, what });
    });
    const msg: Command = { commandId, kind };
    w.stream.write(msg);
    return p;
  }

  /** Sends a command without waiting for its report (Abort, Shutdown). */
  tell(w: WorkerHandle, kind: NonNullable<Command['kind']>): void {
    if (!w.alive || !w.stream) return;
    w.stream.write({ commandId: w.nextCommandId++, kind });
  }

  /** The state uploaded for command `commandId` (after its report arrived). */
  takeState(w: WorkerHandle, commandId: number): Uint8Array {
    const b = w.states.get(commandId);
    if (!b) throw new WireError(`worker ${w.id} reported its state upload for command ${commandId} but no state arrived`);
    w.states.delete(commandId);
    return b;
  }

  updateCounts(): void {
    const counts: Partial<Record<WorkerStateLabel, number>> = {};
    for (const w of this.workers.values()) { const l = STATE_LABEL[w.state] ?? 'registered'; counts[l] = (counts[l] ?? 0) + 1; }
    this.o.metrics?.setWorkerCounts(counts);
    this.o.onWorkers?.([...this.workers.values()].map((w) => ({ id: w.id, stage: w.stage, replica: w.replica, state: STATE_LABEL[w.state] ?? 'registered', address: w.address })));
  }

  status(): StatusReply {
    return {
      jobId: this.o.jobId, state: this.jobState, step: this.progress.step, totalSteps: this.progress.totalSteps, lastLoss: this.progress.lastLoss,
      workers: [...this.workers.values()].map((w) => ({ workerId: w.id, hostname: w.hostname, state: w.state, stageIndex: w.stage, replicaIndex: w.replica, step: w.step, lastHeartbeatUnixMs: w.lastSeen, device: w.device })),
    };
  }

  async close(): Promise<void> {
    clearInterval(this.watchdog);
    this.listener?.close();
    for (const w of this.workers.values()) { for (const p of w.pending.values()) clearTimeout(p.timer); try { w.stream?.end(); } catch { /* gone */ } }
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => { this.server.forceShutdown(); resolve(); }, 2000);
      this.server.tryShutdown(() => { clearTimeout(t); resolve(); });
    });
  }
}
