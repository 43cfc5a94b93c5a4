// Structured logging (pino). One root logger; modules take a child with their name.
// DQLORA_LOG_LEVEL sets the level (default info; tests default to warn so their output stays readable).
//
// Two formats on stderr: JSON lines (pino's own; the default when stderr is not a terminal, and with
// DQLORA_LOG_FORMAT=json or `--log-format json`) and readable lines for a person at a terminal
// ("12:03:04 WARN  data: skipped bad dataset lines  file=… skipped=3"), with warnings and errors marked and
// coloured. Either way lines go through the terminal's line owner (common/terminal.ts), so they print above
// the progress bar instead of through it.
import { pino, type Logger } from 'pino';
import { ConfigError } from './errors.ts';
import { stderrTerminal, type Terminal } from './terminal.ts';

export type LogFormat = 'json' | 'pretty';

/** Pino's levels: DQLORA_LOG_LEVEL must be one of them. */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const requested = process.env.DQLORA_LOG_LEVEL ?? (process.env.NODE_TEST_CONTEXT ? 'warn' : 'info');
// An unknown level would make pino throw while this module is imported, before any command can report it; the
// commands call checkLogLevelEnv() first, which says what the valid levels are.
const level = requested === 'silent' || requested in pino.levels.values ? requested : 'info';

function envFormat(): LogFormat | undefined {
  const f = process.env.DQLORA_LOG_FORMAT?.trim();
  return f === 'json' || f === 'pretty' ? f : undefined;
}

let format: LogFormat = envFormat() ?? (process.stderr.isTTY ? 'pretty' : 'json');
let sink: Terminal = stderrTerminal;

/** Chooses the format (the CLI's --log-format). */
export function setLogFormat(f: LogFormat): void { format = f; }
export function logFormat(): LogFormat { return format; }
/** Where log lines go (tests pass a Terminal over a buffer). Returns the previous one. */
export function setLogTerminal(t: Terminal): Terminal { const prev = sink; sink = t; return prev; }

const LEVELS: Record<number, [string, string]> = {
  10: ['TRACE', '\x1b[90m'], 20: ['DEBUG', '\x1b[90m'], 30: ['INFO ', ''], 40: ['WARN ', '\x1b[33m'], 50: ['ERROR', '\x1b[31m'], 60: ['FATAL', '\x1b[41;97m'],
};
const HIDDEN = new Set(['level', 'time', 'pid', 'mod', 'msg', 'hostname']);

function scalar(v: unknown): string {
  if (typeof v === 'string') return /[\s"=]/.test(v) || v === '' ? JSON.stringify(v) : v;
  if (typeof v === 'number' && !Number.isInteger(v)) return String(+v.toPrecision(6));
  return JSON.stringify(v);
}

/** One pino JSON line as a readable line: time, level, module, message, then key=value fields. */
export function prettyLine(json: string, color: boolean): string {
  let o: Record<string, unknown>;
  try { o = JSON.parse(json) as Record<string, unknown>; } catch { return json.replace(/\n$/, ''); }
  const [name, c] = LEVELS[o.level as number] ?? [String(o.level).padEnd(5), ''];
  const time = typeof o.time === 'string' ? new Date(o.time).toTimeString().slice(0, 8) : '';
  const err = o.err as { message?: string; stack?: string } | undefined;
  const fields = Object.entries(o).filter(([k]) => !HIDDEN.has(k) && k !== 'err').map(([k, v]) => `${k}=${scalar(v)}`);
  const head = `${time} ${color && c ? c + name + '\x1b[0m' : name} ${o.mod ? `${o.mod}: ` : ''}${o.msg ?? ''}`;
  let line = fields.length ? `${head}  ${color ? '\x1b[2m' : ''}${fields.join(' ')}${color ? '\x1b[0m' : ''}` : head;
  if (err?.message) line += `\n    ${err.message}`;
  return line;
}

/** pino writes each line here synchronously; the format is looked up per line so --log-format applies at once. */
const destination = {
  write(line: string): void {
    sink.writeLine(format === 'json' ? line.replace(/\n$/, '') : prettyLine(line, sink.isTTY));
  },
};

export const rootLogger: Logger = pino({
  level,
  base: { pid: process.pid },
  timestamp: pino.stdTimeFunctions.isoTime,
  // Never log secrets: redact the usual suspects wherever they appear in a log object.
  redact: { paths: ['*.token', '*.jobToken', '*.password', '*.credentials', 'token', 'jobToken'], censor: '[redacted]' },
}, destination);

export function logger(name: string): Logger {
  return rootLogger.child({ mod: name });
}

/**
 * Forwards a child process's stderr (its JSON log lines, or anything else) line by line through our log sink, so a
 * local worker's lines also print above the bar and in the chosen format.
 */
export function forwardChildLog(stream: NodeJS.ReadableStream): void {
  let buf = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
      if (line) destination.write(line);
    }
  });
  stream.on('end', () => { if (buf) destination.write(buf); buf = ''; });
}
export type { Logger };

/** DQLORA_LOG_LEVEL, checked: a typo ('verbose') is a usage error naming the variable, not a pino stack trace. */
export function checkLogLevelEnv(env: NodeJS.ProcessEnv = process.env): void {
  const v = env.DQLORA_LOG_LEVEL;
  if (v !== undefined && !(LOG_LEVELS as readonly string[]).includes(v)) {
    throw new ConfigError(`DQLORA_LOG_LEVEL=${v} is not a log level`, { hint: `use one of ${LOG_LEVELS.join(', ')} (or unset it: default info)` });
  }
}
