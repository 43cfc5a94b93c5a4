// The coordinator's Prometheus series (common/metrics.ts), set from the job loop's events: the same numbers in
// every mode, one process or workers. The series and their names are defined once, in common/metrics.ts.
import type { CoordinatorMetrics, WorkerStateLabel } from '../../common/metrics.ts';
import { WORKER_STATES } from '../../common/metrics.ts';
import type { CheckpointEvent, EvalEvent, JobObserver, StepEvent } from '../events.ts';

export class MetricsObserver implements JobObserver {
  constructor(readonly metrics: CoordinatorMetrics) {}

  onStep(e: StepEvent): void {
    const m = this.metrics;
    m.loss.set(e.loss); m.learningRate.set(e.lr); m.gradNorm.set(e.gradNorm);
    m.tokensPerSecond.set(e.seconds > 0 ? e.tokens / e.seconds : 0);
    m.tokens.inc(e.tokens); m.steps.inc(); m.stepDuration.observe(e.seconds); m.pipelineBubble.set(e.bubble);
    const replicas = new Set(e.stageTimings.map((t) => t.replica)).size;
    for (const t of e.stageTimings) {
      m.stageDuration.observe({ stage: String(t.stage), phase: 'forward' }, t.forwardSeconds);
      m.stageDuration.observe({ stage: String(t.stage), phase: 'backward' }, t.backwardSeconds);
      if (replicas > 1) m.allReduceDuration.observe({ stage: String(t.stage) }, t.allreduceSeconds);
    }
  }

  onEval(e: EvalEvent): void { this.metrics.evalLoss.set(e.loss); }

  onCheckpoint(e: CheckpointEvent): void {
    this.metrics.checkpointDuration.observe(e.seconds);
    this.metrics.checkpointSize.set(e.bytes);
  }

  onWorkers(workers: readonly { state: string }[]): void {
    const counts: Partial<Record<WorkerStateLabel, number>> = {};
    for (const w of workers) {
      const s = w.state.toLowerCase() as WorkerStateLabel;
      if ((WORKER_STATES as readonly string[]).includes(s)) counts[s] = (counts[s] ?? 0) + 1;
    }
    this.metrics.setWorkerCounts(counts);
  }
}
