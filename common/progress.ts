// Progress for long tasks: a bar on an interactive terminal, otherwise a structured log line every 10 %.
import cliProgress from 'cli-progress';
import type { Logger } from './log.ts';

export interface Progress {
  update(done: number, total: number, detail?: string): void;
  stop(): void;
}

export function progress(label: string, log: Logger, opts: { tty?: boolean } = {}): Progress {
  const tty = opts.tty ?? process.stderr.isTTY === true;
  if (tty) {
    const bar = new cliProgress.SingleBar({ format: `${label} |{bar}| {value}/{total} {detail}`, stream: process.stderr, hideCursor: true, clearOnComplete: true }, cliProgress.Presets.shades_classic);
    let started = false;
    return {
      update: (d, t, detail = '') => { if (!started) { bar.start(t, 0, { detail }); started = true; } bar.update(d, { detail }); },
      stop: () => { if (started) bar.stop(); },
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
