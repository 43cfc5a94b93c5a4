// Progress for long tasks: a bar on the last line of an interactive terminal (log lines print above it, through
// common/terminal.ts, so it is never broken), otherwise a structured log line every 10 %.
import type { Logger } from './log.ts';
import { stderrTerminal, type Terminal } from './terminal.ts';

export interface Progress {
  update(done: number, total: number, detail?: string): void;
  stop(): void;
}

const BAR_WIDTH = 30;
/** Redraw at most this often (ms), except for the last update. */
const REDRAW_MS = 80;

/** `label |██████░░░░| 12/40 detail`. */
export function barLine(label: string, done: number, total: number, detail = ''): string {
  const f = total > 0 ? Math.min(1, Math.max(0, done / total)) : 0;
  const full = Math.round(f * BAR_WIDTH);
  return `${label} |${'█'.repeat(full)}${'░'.repeat(BAR_WIDTH - full)}| ${done}/${total}${detail ? ' ' + detail : ''}`;
}

export function progress(label: string, log: Logger, opts: { tty?: boolean; terminal?: Terminal; now?: () => number; minIntervalMs?: number } = {}): Progress {
  const term = opts.terminal ?? stderrTerminal;
  const tty = opts.tty ?? term.isTTY;
  if (tty) {
    const now = opts.now ?? (() => performance.now());
    const minInterval = opts.minIntervalMs ?? REDRAW_MS;
    let last = -Infinity, stopped = false;
    let trailing: NodeJS.Timeout | undefined, pending: string | null = null;
    const draw = (line: string): void => { last = now(); pending = null; term.setStatus(line); };
    return {
      update: (d, t, detail = '') => {
        if (stopped) return;
        const line = barLine(label, d, t, detail);
        if (d >= t || now() - last >= minInterval) { clearTimeout(trailing); trailing = undefined; draw(line); return; }
        // too soon: draw it when the interval is up, unless a newer update comes first
        pending = line;
        trailing ??= setTimeout(() => { trailing = undefined; if (pending !== null && !stopped) draw(pending); }, minInterval).unref();
      },
      stop: () => { stopped = true; clearTimeout(trailing); term.setStatus(null); },
    };
  }
  let lastDecile = -1;
  return {
    update: (d, t, detail) => {
      const decile = t > 0 ? Math.floor((10 * d) / t) : 10;
      if (decile !== lastDecile) { lastDecile = decile; log.info({ task: label, done: d, total: t, detail }, 'progress'); }
    },
    stop: () => {},
  };
}
