// How many recoveries a job may spend, and how long it waits before each: a budget per sliding time window
// with exponential back-off, instead of a count per job. A job that runs for days survives a failure a day
// forever; a fault that repeats every second (NATS down, a bad node crash-looping) spends the window's budget
// in growing pauses — 1 s, 2 s, 4 s … up to maxDelayMs — and then fails with a message that says how many
// failures came in how long, instead of burning every recovery in 1.6 s.
import { DqloraError } from '../../common/errors.ts';

export interface RecoveryBudgetOptions {
  /** Recoveries allowed within any window (distributed.max_recoveries). */
  readonly max: number;
  /** The sliding window (default 10 min). */
  readonly windowMs?: number;
  /** First back-off (default 1 s), doubled per recovery still inside the window, capped at maxDelayMs (default 30 s). */
  readonly baseDelayMs?: number;
  readonly maxDelayMs?: number;
  readonly now?: () => number;
}

export class RecoveryBudget {
  private readonly times: number[] = [];
  private readonly windowMs: number;
  private readonly base: number;
  private readonly cap: number;
  private readonly now: () => number;

  constructor(private readonly o: RecoveryBudgetOptions) {
    this.windowMs = o.windowMs ?? 600_000;
    this.base = o.baseDelayMs ?? 1000;
    this.cap = o.maxDelayMs ?? 30_000;
    this.now = o.now ?? Date.now;
  }

  /** Recoveries spent within the current window. */
  get recent(): number { this.expire(); return this.times.length; }

  /**
   * Spends one recovery for `failure` (its first line is quoted): returns the back-off to wait before
   * resuming, or throws a DqloraError when the window's budget is spent.
   */
  spend(failure: string): number {
    this.expire();
    if (this.times.length >= this.o.max) {
      const span = this.times.length ? (this.now() - this.times[0]) / 1000 : 0;
      throw new DqloraError(`giving up: ${this.times.length + 1} failure(s) within ${span.toFixed(1)} s (at most ${this.o.max} recoveries per ${(this.windowMs / 1000).toFixed(0)} s); last failure: ${failure}`, {
        hint: 'the fault keeps coming back: check the workers\' and the NATS server\'s logs; raise distributed.max_recoveries to keep trying',
      });
    }
    const delay = Math.min(this.cap, this.base * 2 ** this.times.length);
    this.times.push(this.now());
    return delay;
  }

  private expire(): void {
    const t = this.now();
    while (this.times.length && t - this.times[0] >= this.windowMs) this.times.shift();
  }
}
