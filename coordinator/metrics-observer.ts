// The coordinator's Prometheus metrics, set from the job loop's events (a JobObserver): what a step, an eval, a
// checkpoint, a recovery and the end mean for the series in common/metrics.ts, in one place, the same for the
// in-process and the worker executors. The job state: starting → running ⇄ recovering → succeeded | failed |
// stopped (stopping while a signal's checkpoint is written).
import type { CoordinatorMetrics, WorkerStateLabel } from '../common/metrics.ts';
import { WORKER_STATES } from '../common/metrics.ts';
import type { JobObserver } from './events.ts';

export interface MetricsObserverOptions {
  /** Data-parallel replicas (all-reduce durations are recorded when > 1). */
  readonly replicas: number;
  /** Micro-batches per step and replica (training.grad_accum): with the stage count, the theoretical bubble. */
  readonly microBatches: number;
  /** training.save_every (0 = only at the end). */
  readonly saveEvery: number;
  /** Unix time source (tests). */
  readonly now?: () => number;
}

/** (p−1)/(m+p−1): idle fraction of an ideal GPipe / 1F1B schedule of p stages and m micro-batches. */
export function theoreticalBubble(stages: number, microBatches: number): number {
  return stages <= 1 ? 0 : (stages - 1) / (microBatches + stages - 1);
}

export interface MetricsObserver extends JobObserver {
  /** The loop is writing the checkpoint a stop signal asked for. */
  stopping(): void;
}

export function jobMetricsObserver(m: CoordinatorMetrics, o: MetricsObserverOptions): MetricsObserver {
  const now = o.now ?? (() => Date.now() / 1000);
  return {
    onStart(e) {
      m.setJobState('running');
      m.pipelineBubbleTheoretical.set(theoreticalBubble(e.stages, o.microBatches));
      m.checkpointIntervalSteps.set(o.saveEvery);
    },
    onStep(e) {
      m.setJobState('running');
      m.loss.set(e.loss);
      m.learningRate.set(e.lr);
      m.gradNorm.set(e.gradNorm);
      m.tokensPerSecond.set(e.tokens / e.seconds);
      m.tokens.inc(e.tokens);
      m.steps.inc();
      m.stepDuration.observe(e.seconds);
      if (e.stageTimings.length) m.pipelineBubble.set(e.bubble);
      m.lastStepTimestamp.set(now());
      for (const t of e.stageTimings) {
        m.stageDuration.observe({ stage: String(t.stage), phase: 'forward' }, t.forwardSeconds);
        m.stageDuration.observe({ stage: String(t.stage), phase: 'backward' }, t.backwardSeconds);
        if (o.replicas > 1) m.allReduceDuration.observe({ stage: String(t.stage) }, t.allreduceSeconds);
      }
    },
    onEval(e) {
      m.evalLoss.set(e.loss);
    },
    onCheckpoint(e) {
      m.checkpointDuration.observe(e.seconds);
      m.checkpointSize.set(e.bytes);
    },
    onRecovery() {
      m.recoveries.inc();
      m.setJobState('recovering');
    },
    onMicroBatch(e) {
      m.microBatchSize.set(e.rows);
      if (e.reason === 'out-of-memory') m.microBatchSplits.inc();
    },
    onWorkers(ws) {
      const counts: Partial<Record<WorkerStateLabel, number>> = {};
      for (const w of ws) {
        const s = w.state.toLowerCase() as WorkerStateLabel;
        if ((WORKER_STATES as readonly string[]).includes(s)) counts[s] = (counts[s] ?? 0) + 1;
      }
      m.setWorkerCounts(counts);
    },
    onEnd(e) {
      if (e.evalLoss !== null) m.evalLoss.set(e.evalLoss);
      m.setJobState(e.status);
    },
    stopping() {
      m.setJobState('stopping');
    },
  };
}
