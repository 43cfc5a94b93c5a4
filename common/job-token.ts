// The job token (the shared secret a worker presents to the coordinator) comes from a file or the environment,
// never from a command line: arguments are visible to every user of the machine (`ps`, /proc/PID/cmdline).
//   --job-token-file PATH   e.g. a mounted Kubernetes Secret; surrounding whitespace (the trailing newline) is dropped
//   DQLORA_JOB_TOKEN        the environment (local workers get theirs this way from the coordinator)
//   --job-token TOKEN       still accepted, with a warning on stderr
import { readFileSync, statSync } from 'node:fs';
import { ConfigError } from './errors.ts';

export interface JobTokenSources {
  readonly file?: string;
  /** The deprecated --job-token argument. */
  readonly arg?: string;
  readonly env?: NodeJS.ProcessEnv;
  /** Where warnings go (default stderr). */
  readonly warn?: (line: string) => void;
}

/** The job token from --job-token-file, else $DQLORA_JOB_TOKEN, else --job-token; undefined when none is given. */
export function resolveJobToken(s: JobTokenSources): string | undefined {
  const warn = s.warn ?? ((l: string) => process.stderr.write(l + '\n'));
  const set = [s.file !== undefined && '--job-token-file', s.arg !== undefined && '--job-token'].filter(Boolean);
  if (set.length > 1) throw new ConfigError('both --job-token-file and --job-token are given', { hint: 'pass only --job-token-file (or set DQLORA_JOB_TOKEN)' });
  if (s.file !== undefined) {
    let text: string;
    try { text = readFileSync(s.file, 'utf8'); } catch (e) {
      throw new ConfigError(`--job-token-file ${s.file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, { hint: 'point it at a file holding the job token (e.g. a mounted Secret)' });
    }
    const token = text.trim();
    if (!token) throw new ConfigError(`--job-token-file ${s.file} is empty`, { hint: 'write the job token into it (one line)' });
    if (/\s/.test(token)) throw new ConfigError(`--job-token-file ${s.file}: the token contains whitespace (more than one line?)`, { hint: 'the file must hold the token alone' });
    try {
      if ((statSync(s.file).mode & 0o077) !== 0 && process.platform !== 'win32') warn(`warning: --job-token-file ${s.file} is readable by other users; chmod 600 it`);
    } catch { /* read above; a race is harmless */ }
    return token;
  }
  const env = (s.env ?? process.env).DQLORA_JOB_TOKEN;
  if (s.arg !== undefined) {
    warn('warning: --job-token puts the secret on the command line, where every user can read it (ps); use --job-token-file or DQLORA_JOB_TOKEN');
    if (!s.arg.trim()) throw new ConfigError('--job-token is empty');
    return s.arg;
  }
  return env?.trim() ? env.trim() : undefined;
}
