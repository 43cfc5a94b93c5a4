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

/** A wire message (gRPC / NATS) is malformed, stale, duplicated, oversized or unauthenticated. */
export class WireError extends DqloraError {}

/** A backend (cpu / cuda) failed or is unavailable. */
export class BackendError extends DqloraError {}

/** Throws a ShapeError unless `cond` holds. */
export function check(cond: unknown, message: string | (() => string), hint?: string): asserts cond {
  if (!cond) throw new ShapeError(typeof message === 'function' ? message() : message, { hint });
}
