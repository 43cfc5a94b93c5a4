// Named error classes for the whole project. Every error says what went wrong, where (file:line, tensor
// name, config path) and what to do next; the original error is kept as `cause`.

export class DqloraError extends Error {
  /** A short hint telling the user what to do next (also included in `message`). */
  readonly hint?: string;
  constructor(message: string, opts: { hint?: string; cause?: unknown } = {}) {
    super(opts.hint ? `${message}\n  hint: ${opts.hint}` : message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.hint = opts.hint;
  }
}

/** A job config / CLI option is invalid. `path` is the config path, e.g. `lora.r`. */
export class ConfigError extends DqloraError {}

/** A file on disk is malformed: safetensors, config.json, tokenizer.json, checkpoints, adapters. */
export class FormatError extends DqloraError {}

/** A dataset record is malformed; the message names file:line. */
export class DataError extends DqloraError {}

/** Tensor shapes or dtypes do not fit together (model vs adapter vs config). */
export class ShapeError extends DqloraError {}

/** The model architecture or a feature of it is not supported. */
export class UnsupportedError extends DqloraError {}

/** A checkpoint is missing, torn or fails its checksum. */
export class CheckpointError extends DqloraError {}

/** A checkpoint could not be written (a full disk, a read-only volume): a runtime failure, not bad input. */
export class CheckpointWriteError extends CheckpointError {}

/** A wire message (gRPC / NATS) is malformed, stale, duplicated, oversized or unauthenticated. */
export class WireError extends DqloraError {}

/** A backend (cpu / cuda) failed or is unavailable. */
export class BackendError extends DqloraError {}

/** `code` of every out-of-memory failure: OutOfMemoryError, and the cuda addon's errors from any native call. */
export const OUT_OF_MEMORY_CODE = 'DQLORA_OOM';

/**
 * A device allocation failed for lack of memory (cudaMalloc, or the DQLORA_MEM_LIMIT_BYTES budget on either backend).
 * The message starts with "out of device memory" so that it is recognised after crossing a thread or a process as
 * text (core/engine/oom.ts isOutOfMemory). What was allocated before it is still live: see Backend.trackAllocations.
 */
export class OutOfMemoryError extends BackendError {
  readonly code = OUT_OF_MEMORY_CODE;
  constructor(
    readonly device: string,
    /** Bytes the failed allocation asked for. */
    readonly requestedBytes: number,
    /** Bytes in live tensors when it failed. */
    readonly inUseBytes: number,
    /** The configured budget (DQLORA_MEM_LIMIT_BYTES), when that is what refused it. */
    readonly limitBytes: number | undefined,
    opts: { detail?: string; hint?: string; cause?: unknown } = {},
  ) {
    super(`out of device memory on ${device}: ${requestedBytes} bytes requested with ${inUseBytes} in use${limitBytes !== undefined ? ` (memory limit ${limitBytes} bytes, DQLORA_MEM_LIMIT_BYTES)` : ''}${opts.detail ? `: ${opts.detail}` : ''}`, opts);
  }
}

/** Throws a ShapeError unless `cond` holds. */
export function check(cond: unknown, message: string | (() => string), hint?: string): asserts cond {
  if (!cond) throw new ShapeError(typeof message === 'function' ? message() : message, { hint });
}

/**
 * Process exit codes of the `coordinator` and `worker` commands (documented in README "Exit codes"), so a script
 * or a Kubernetes Job can tell a mistake to fix from a failure to retry.
 */
export const EXIT = {
  ok: 0,
  /** Something failed while running (a backend, a worker lost beyond recovery, disk full, a bug). Retrying may help. */
  runtime: 1,
  /** A command-line flag, a job.yaml field, a path or an environment variable is wrong: fix the command. */
  usage: 2,
  /** An input file is wrong: a dataset record, a model / tokenizer / adapter / checkpoint file, shapes that do not fit. */
  data: 3,
  /**
   * Stopped by SIGTERM/SIGINT after writing a checkpoint at a step boundary: run the same command again to resume
   * (EX_TEMPFAIL; Kubernetes restarts the pod without counting a failure, see deploy/).
   */
  stopped: 75,
  /** Stopped by a signal before a checkpoint could be written (the grace period ran out; Ctrl-C twice). */
  interrupted: 130,
} as const;

/** The exit code for an error that ended a command (see EXIT). */
export function exitCodeFor(e: unknown): number {
  if (e instanceof ConfigError) return EXIT.usage;
  if (e instanceof CheckpointWriteError) return EXIT.runtime;
  if (e instanceof DataError || e instanceof FormatError || e instanceof ShapeError || e instanceof CheckpointError || e instanceof UnsupportedError) return EXIT.data;
  return EXIT.runtime;
}

/**
 * An operating-system error a user can act on (a path that is missing, not writable, a file where a directory is
 * expected, a full disk): worth one line, not a stack trace.
 */
export function isSystemError(e: unknown): e is NodeJS.ErrnoException {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  return e instanceof Error && typeof code === 'string' && /^E[A-Z]+$/.test(code) && typeof (e as NodeJS.ErrnoException).syscall === 'string';
}
