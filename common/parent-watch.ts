// Parent-death handling for processes a coordinator starts (local workers): such a child must not outlive
// it — an orphaned worker holds a GPU, a port and a registration for nothing. Linux's PR_SET_PDEATHSIG is
// not reachable from Node, so the child watches two signs instead: its stdin pipe (held only by the parent,
// closed by the kernel when the parent dies, however it dies) and its parent pid (re-parented to init or a
// subreaper when the parent dies). Either one makes it exit at once.
import net from 'node:net';
import { logger } from './log.ts';

/** The environment variable that names the pid of the parent a child must die with. */
export const PARENT_PID_ENV = 'DQLORA_PARENT_PID';

const log = logger('parent-watch');

export interface ParentWatch { stop(): void }

/**
 * When $DQLORA_PARENT_PID is set, calls `onParentGone(why)` (default: exit with status 1) as soon as the
 * parent is gone: stdin reaches end-of-file, or the parent pid changes (checked every `pollMs`). Returns
 * undefined when the variable is not set (a worker started by hand or by Kubernetes).
 */
export function exitWithParent(opts: { env?: NodeJS.ProcessEnv; pollMs?: number; onParentGone?: (why: string) => void } = {}): ParentWatch | undefined {
  const env = opts.env ?? process.env;
  const want = Number(env[PARENT_PID_ENV]);
  if (!Number.isInteger(want) || want <= 0) return undefined;
  let done = false;
  const gone = (why: string): void => {
    if (done) return;
    done = true;
    stop();
    if (opts.onParentGone) return opts.onParentGone(why);
    log.error({ parent: want }, `the coordinator that started this worker is gone (${why}); exiting`);
    process.exit(1);
  };
  if (process.ppid !== want) { gone(`parent pid is ${process.ppid}, expected ${want}`); return { stop() {} }; }
  const timer = setInterval(() => { if (process.ppid !== want) gone(`re-parented to pid ${process.ppid}`); }, opts.pollMs ?? 500);
  timer.unref();
  const stdin = process.stdin;
  const onEnd = (): void => gone('its stdin pipe closed');
  // Only a pipe is a lifeline: a terminal or /dev/null says nothing about the parent.
  const isPipe = stdin instanceof net.Socket && !stdin.isTTY;
  if (isPipe) {
    stdin.on('end', onEnd);
    stdin.on('error', onEnd);
    stdin.on('data', () => { /* nobody writes; reading is what notices the end */ });
    stdin.resume();
    // A paused-then-resumed stdin keeps the event loop alive; the worker's own handles decide its lifetime.
    (stdin as net.Socket).unref();
  }
  function stop(): void {
    clearInterval(timer);
    if (isPipe) { stdin.off('end', onEnd); stdin.off('error', onEnd); stdin.pause(); }
  }
  return { stop };
}
