// Where tensors from the neighbouring stages wait until the schedule asks for them, keyed by
// (direction, pipeline seq, micro-batch). A tensor may arrive before the RunStep command that needs it
// (the sender got its command first), so the inbox accepts the current seq and the next one; anything
// older is stale, anything further ahead is refused (a peer cannot legitimately be two steps ahead,
// and bounding it bounds memory).
import { DqloraError, WireError } from '../../common/errors.ts';
import type { HostTensor } from '../../wire/tensor.ts';
import type { Direction } from '../transport/pipeline.ts';

/** The stage waited too long for a neighbour's tensor. */
export class PipelineTimeoutError extends DqloraError {}
/** The step was aborted (a peer failed, or the coordinator re-assigned the stage). */
export class StepAbortedError extends DqloraError {}

interface Waiter { resolve(t: HostTensor): void; reject(e: Error): void; timer: NodeJS.Timeout }

export class Inbox {
  private minSeq = 0;
  private current = 0;
  private readonly items = new Map<string, HostTensor>();
  private readonly waiters = new Map<string, Waiter>();

  private static key(dir: Direction, seq: number, mb: number): string { return `${dir}:${seq}:${mb}`; }

  /** Starts sequence number `seq`: older tensors are dropped, older waiters rejected. */
  begin(seq: number): void {
    this.current = seq;
    this.minSeq = seq;
    for (const k of [...this.items.keys()]) if (Number(k.split(':')[1]) < seq) this.items.delete(k);
  }

  /** Called by the pipeline server with a complete, validated tensor. Throws (→ the sender sees an error) when it cannot be used. */
  put(dir: Direction, seq: number, mb: number, t: HostTensor): void {
    if (seq < this.minSeq) throw new WireError(`pipeline ${dir} seq ${seq} micro-batch ${mb}: stale, this stage is at seq ${this.minSeq}`);
    if (seq > this.current + 1) throw new WireError(`pipeline ${dir} seq ${seq} micro-batch ${mb}: too far ahead of this stage (seq ${this.current})`);
    const k = Inbox.key(dir, seq, mb);
    const w = this.waiters.get(k);
    if (w) { this.waiters.delete(k); clearTimeout(w.timer); w.resolve(t); return; }
    if (this.items.size > 4096) throw new WireError(`pipeline ${dir}: too many tensors waiting on this stage`);
    this.items.set(k, t);
  }

  /** The tensor for (dir, seq, mb), waiting up to `timeoutMs`. `from` names the sender in the timeout error. */
  take(dir: Direction, seq: number, mb: number, timeoutMs: number, from: string): Promise<HostTensor> {
    const k = Inbox.key(dir, seq, mb);
    const t = this.items.get(k);
    if (t) { this.items.delete(k); return Promise.resolve(t); }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(k);
        reject(new PipelineTimeoutError(`no ${dir === 'forward' ? 'activations' : 'gradients'} for seq ${seq} micro-batch ${mb} from ${from} within ${(timeoutMs / 1000).toFixed(1)} s`, { hint: 'that stage may have died or stalled; the coordinator reports which worker' }));
      }, timeoutMs);
      this.waiters.set(k, { resolve, reject, timer });
    });
  }

  /** Rejects every waiter (the step is abandoned) and drops buffered tensors. */
  abort(reason: string): void {
    for (const [k, w] of this.waiters) { clearTimeout(w.timer); w.reject(new StepAbortedError(`step aborted: ${reason}`)); this.waiters.delete(k); }
    this.items.clear();
  }
}
