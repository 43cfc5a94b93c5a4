// What the `coordinator` commands read from the user besides paths: option values (checked when parsed, so a bad
// value stops the command before anything is loaded), prompts (arguments, files, stdin), the backend.
import fs from 'node:fs';
import { InvalidArgumentError } from 'commander';
import { createBackend, type BackendName } from '../core/engine/index.ts';
import type { Backend } from '../core/engine/backend.ts';
import { BackendError, ConfigError } from '../common/errors.ts';
import { checkInputFile } from './preflight.ts';

/** Option parser: an integer ≥ min. */
export const intAtLeast = (name: string, min: number) => (v: string): number => {
  const n = Number(v);
  if (v.trim() === '' || !Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer ≥ ${min}, got ${JSON.stringify(v)}`);
  return n;
};

/** Option parser: a finite number in [min, max] (an open bound when `open` says so). */
export const numberIn = (name: string, min: number, max: number, open: { min?: boolean; max?: boolean } = {}) => (v: string): number => {
  const n = Number(v);
  const ok = v.trim() !== '' && Number.isFinite(n) && (open.min ? n > min : n >= min) && (open.max ? n < max : n <= max);
  if (!ok) {
    const range = `${open.min ? '(' : '['}${min}, ${max === Infinity ? '∞' : max}${open.max || max === Infinity ? ')' : ']'}`;
    throw new InvalidArgumentError(`${name} must be a number in ${range}, got ${JSON.stringify(v)}`);
  }
  return n;
};

/** Appends each use of a repeatable option. */
export const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

/**
 * The prompts of `generate`: each argument (`-` = all of stdin), then each --prompt-file (the whole file is one
 * prompt: long or multi-line prompts, and text a shell cannot pass — "Argument list too long"). With neither and a
 * piped stdin, stdin is the prompt. A trailing newline of a file or stdin is not part of the prompt.
 */
export async function readPrompts(args: string[], files: string[] = [], stdin: NodeJS.ReadableStream & { isTTY?: boolean } = process.stdin): Promise<string[]> {
  let stdinText: string | undefined;
  // Streamed, not readFileSync(0): a pipe whose writer is still busy gives EAGAIN to a synchronous read.
  const readStdin = async (): Promise<string> => {
    if (stdinText !== undefined) return stdinText;
    const chunks: Buffer[] = [];
    try {
      for await (const c of stdin) chunks.push(typeof c === 'string' ? Buffer.from(c) : c as Buffer);
    } catch (e) {
      throw new ConfigError(`cannot read the prompt from stdin: ${(e as Error).message}`, { hint: 'pass the prompt as an argument or with --prompt-file FILE' });
    }
    stdinText = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
    return stdinText;
  };
  const prompts: string[] = [];
  for (const a of args) prompts.push(a === '-' ? await readStdin() : a);
  for (const f of files) {
    checkInputFile(f, '--prompt-file');
    const text = fs.readFileSync(f, 'utf8');
    if (text.includes('\uFFFD')) throw new ConfigError(`--prompt-file: ${f} is not valid UTF-8`, { hint: 're-save the file as UTF-8' });
    prompts.push(text.replace(/\r?\n$/, ''));
  }
  if (prompts.length === 0) {
    if (stdin.isTTY) throw new ConfigError('generate: no prompt given', { hint: 'pass prompts as arguments, with --prompt-file FILE, or on stdin (echo "..." | coordinator generate --model DIR -)' });
    prompts.push(await readStdin());
  }
  const empty = prompts.findIndex((p) => p.trim() === '');
  if (empty >= 0) throw new ConfigError(`generate: prompt ${empty + 1} is empty`, { hint: 'give a non-empty prompt' });
  return prompts;
}

/**
 * createBackend with errors that name how the user chose the backend (`--backend cuda` on a command, `backend:
 * cuda` in a job file) and the way out in the same terms: asking for cuda where there is none is a usage error.
 */
export async function backendFor(name: BackendName, where: string, cpuHint: string): Promise<Backend> {
  try {
    return await createBackend(name);
  } catch (e) {
    if (e instanceof BackendError && name === 'cuda') {
      // The first line only: the backend's own hint names the worker's flag.
      throw new ConfigError(`${where}: ${((e.cause as Error | undefined)?.message ?? e.message).split('\n')[0]}`, { hint: `${cpuHint} (the cuda backend needs an NVIDIA GPU and nvcc when \`npm ci\` runs)`, cause: e });
    }
    throw e;
  }
}
