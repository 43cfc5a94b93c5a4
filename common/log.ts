// Structured logging (pino). One root logger; modules take a child with their name.
// DQLORA_LOG_LEVEL sets the level (default info; tests default to warn so their output stays readable).
import { pino, type Logger } from 'pino';

const requested = process.env.DQLORA_LOG_LEVEL ?? (process.env.NODE_TEST_CONTEXT ? 'warn' : 'info');
// An unknown level would make pino throw while this module is imported, before any command can report it; the
// commands check DQLORA_LOG_LEVEL themselves (coordinator/cli-input.ts) and say what the valid levels are.
const level = requested === 'silent' || requested in pino.levels.values ? requested : 'info';

export const rootLogger: Logger = pino({
  level,
  base: { pid: process.pid },
  timestamp: pino.stdTimeFunctions.isoTime,
  // Never log secrets: redact the usual suspects wherever they appear in a log object.
  redact: { paths: ['*.token', '*.jobToken', '*.password', '*.credentials', 'token', 'jobToken'], censor: '[redacted]' },
}, pino.destination({ dest: 2, sync: true }));

export function logger(name: string): Logger {
  return rootLogger.child({ mod: name });
}
export type { Logger };
