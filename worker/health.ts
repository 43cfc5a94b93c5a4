// Liveness vs readiness of a worker, for the Kubernetes probes on its metrics port (common/metrics.ts serves them).
//
//   /healthz (liveness)   the process answers HTTP: its event loop turns. A worker busy loading or training is
//                         alive; restarting it would only lose its stage. (A worker that lost its coordinator
//                         exits by itself; the kubelet's job is only the wedged process that answers nothing.)
//   /readyz  (readiness)  the worker can take a step now: a stage is assigned and loaded (ready, training or
//                         checkpointing). Registering, loading a stage, failed or stopped: not ready, and the
//                         body says which, so `kubectl describe pod` tells a loading worker from a broken one.
//
// The worker's state lives in worker/server.ts; it hands this module a getter once the state exists (`track`).
import { WorkerState } from '../proto/gen/dqlora/v1/control.ts';
import type { HealthChecks, HealthStatus } from '../common/metrics.ts';

const READY_STATES = new Set([WorkerState.WORKER_STATE_READY, WorkerState.WORKER_STATE_TRAINING, WorkerState.WORKER_STATE_CHECKPOINTING]);

const DESCRIBE: Record<number, string> = {
  [WorkerState.WORKER_STATE_UNSPECIFIED]: 'registering with the coordinator',
  [WorkerState.WORKER_STATE_REGISTERED]: 'registered, waiting for a stage assignment',
  [WorkerState.WORKER_STATE_LOADING]: 'loading and quantizing its stage',
  [WorkerState.WORKER_STATE_READY]: 'stage loaded, idle',
  [WorkerState.WORKER_STATE_TRAINING]: 'running a step',
  [WorkerState.WORKER_STATE_CHECKPOINTING]: 'uploading its state for a checkpoint',
  [WorkerState.WORKER_STATE_FAILED]: 'failed: its last command failed without a stage to fall back to',
  [WorkerState.WORKER_STATE_STOPPED]: 'stopped',
};

export class WorkerHealth implements HealthChecks {
  private getState: () => WorkerState = () => WorkerState.WORKER_STATE_UNSPECIFIED;
  private readonly since = Date.now();

  /** Reads the worker's state from now on (call once the state variable exists). */
  track(getState: () => WorkerState): void {
    this.getState = getState;
  }

  live(): HealthStatus {
    return { ok: true, detail: `alive for ${Math.round((Date.now() - this.since) / 1000)} s: ${this.describe()}` };
  }

  ready(): HealthStatus {
    const s = this.getState();
    return { ok: READY_STATES.has(s), detail: `${READY_STATES.has(s) ? 'ready' : 'not ready'}: ${this.describe()}` };
  }

  private describe(): string {
    return DESCRIBE[this.getState()] ?? `state ${this.getState()}`;
  }
}
