// Structured logging (pino). One root logger; modules take a child with their name.
// DQLORA_LOG_LEVEL sets the level (default info; tests default to warn so their output stays readable).
import { pino, type Logger } from 'pino';
import { ConfigError } from './errors.ts';

/** Pino's levels: DQLORA_LOG_LEVEL must be one of them. */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const requested = process.env.DQLORA_LOG_LEVEL ?? (process.env.NODE_TEST_CONTEXT ? 'warn' : 'info');
// An unknown level would make pino throw while this module is imported, before any command can report it; the
// commands call checkLogLevelEnv() first, which says what the valid levels are.
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

/** DQLORA_LOG_LEVEL, checked: a typo ('verbose') is a usage error naming the variable, not a pino stack trace. */
export function checkLogLevelEnv(env: NodeJS.ProcessEnv = process.env): void {
  const v = env.DQLORA_LOG_LEVEL;
  if (v !== undefined && !(LOG_LEVELS as readonly string[]).includes(v)) {
    throw new ConfigError(`DQLORA_LOG_LEVEL=${v} is not a log level`, { hint: `use one of ${LOG_LEVELS.join(', ')} (or unset it: default info)` });
  }
}
