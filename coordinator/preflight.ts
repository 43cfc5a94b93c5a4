// Path checks that run before any model is loaded: a missing model directory, a dataset that is a directory, an
// output directory that is a file or not writable are reported in a second, naming the flag or job.yaml key the
// user wrote — not minutes later, after the model was loaded and quantized, as an EEXIST stack trace.
//
// `where` is how the user named the path: a flag (`--model`) for commands, `job.yaml: data.train` for job files.
import fs from 'node:fs';
import path from 'node:path';
import { ConfigError } from '../common/errors.ts';
import type { JobConfig } from './job.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { encodePromptsToFit } from './answer.ts';

function statOf(p: string): fs.Stats | undefined {
  try {
    return fs.statSync(p);
  } catch {
    return undefined;
  }
}

function canWrite(p: string): boolean {
  try {
    fs.accessSync(p, fs.constants.W_OK | fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * A Hugging Face model directory: exists, is a directory, has config.json and weights (*.safetensors or pickled
 * *.bin); with `tokenizer`, also tokenizer.json or tokenizer.model (what generate, eval and training read).
 */
export function checkModelDir(dir: string, where: string, opts: { tokenizer?: boolean } = {}): void {
  const st = statOf(dir);
  if (!st) throw new ConfigError(`${where}: ${dir} does not exist`, { hint: `point ${flagOrKey(where)} at a Hugging Face model directory (config.json, weights, tokenizer)` });
  if (!st.isDirectory()) throw new ConfigError(`${where}: ${dir} is a file, not a model directory`, { hint: `point ${flagOrKey(where)} at the directory that holds config.json` });
  if (!statOf(path.join(dir, 'config.json'))?.isFile()) {
    throw new ConfigError(`${where}: ${dir} has no config.json, so it is not a Hugging Face model directory`, { hint: `point ${flagOrKey(where)} at the directory that holds config.json and the weights` });
  }
  const files = fs.readdirSync(dir);
  if (!files.some((f) => /\.(safetensors|bin)$/.test(f))) {
    throw new ConfigError(`${where}: ${dir} has config.json but no weights (*.safetensors or pytorch_model*.bin)`, { hint: 'was the download interrupted? Hugging Face weights are often stored with git-lfs: run `git lfs pull` there' });
  }
  if (opts.tokenizer && !files.includes('tokenizer.json') && !files.includes('tokenizer.model')) {
    throw new ConfigError(`${where}: ${dir} has no tokenizer (tokenizer.json or tokenizer.model)`, { hint: `copy the tokenizer files of the base model into ${dir}` });
  }
}

/** A PEFT adapter directory: exists, is a directory, has adapter_config.json. */
export function checkAdapterDir(dir: string, where: string): void {
  const st = statOf(dir);
  if (!st) throw new ConfigError(`${where}: ${dir} does not exist`, { hint: `point ${flagOrKey(where)} at a PEFT adapter directory (e.g. OUTPUT_DIR/adapter of a training run)` });
  if (!st.isDirectory()) throw new ConfigError(`${where}: ${dir} is a file, not an adapter directory`, { hint: `point ${flagOrKey(where)} at the directory that holds adapter_config.json` });
  if (!statOf(path.join(dir, 'adapter_config.json'))?.isFile()) {
    throw new ConfigError(`${where}: ${dir} has no adapter_config.json, so it is not a PEFT adapter directory`, { hint: `point ${flagOrKey(where)} at OUTPUT_DIR/adapter of a training run, or a checkpoint's adapter directory` });
  }
}

/** A file to read (dataset, prompt file): exists, is a regular file, readable. */
export function checkInputFile(file: string, where: string): void {
  const st = statOf(file);
  if (!st) throw new ConfigError(`${where}: ${file} does not exist`, { hint: `check the path given to ${flagOrKey(where)}` });
  if (st.isDirectory()) throw new ConfigError(`${where}: ${file} is a directory, not a file`, { hint: `point ${flagOrKey(where)} at a file` });
  try {
    fs.accessSync(file, fs.constants.R_OK);
  } catch {
    throw new ConfigError(`${where}: ${file} is not readable`, { hint: 'check the file permissions' });
  }
}

/**
 * A directory that will be written: either an existing writable directory, or a path whose nearest existing parent
 * is a writable directory (so mkdir -p succeeds). `refuseModel`: an existing config.json inside is an error.
 */
export function checkOutputDir(dir: string, where: string, opts: { refuseModel?: string } = {}): void {
  const st = statOf(dir);
  if (st) {
    if (!st.isDirectory()) throw new ConfigError(`${where}: ${dir} is a file, not a directory`, { hint: `choose another ${flagOrKey(where)}, or move the file away` });
    if (!canWrite(dir)) throw new ConfigError(`${where}: ${dir} is not writable`, { hint: `choose a directory you can write to for ${flagOrKey(where)}` });
    if (opts.refuseModel !== undefined && statOf(path.join(dir, 'config.json'))) {
      throw new ConfigError(`${where}: ${dir} already holds a model (config.json)`, { hint: opts.refuseModel });
    }
    return;
  }
  // Walk up to the nearest existing ancestor: every missing level will be created, so it must be a writable directory.
  let parent = path.dirname(path.resolve(dir));
  for (;;) {
    const ps = statOf(parent);
    if (ps) {
      if (!ps.isDirectory()) throw new ConfigError(`${where}: cannot create ${dir}: ${parent} is a file`, { hint: `choose another ${flagOrKey(where)}` });
      if (!canWrite(parent)) throw new ConfigError(`${where}: cannot create ${dir}: ${parent} is not writable`, { hint: `choose a directory you can write to for ${flagOrKey(where)}` });
      return;
    }
    const up = path.dirname(parent);
    if (up === parent) return;
    parent = up;
  }
}

/** Which name the user should edit: `--model` stays a flag; `job.yaml: data.train` becomes `data.train in job.yaml`. */
function flagOrKey(where: string): string {
  const m = /^(.*): ([\w.]+)$/.exec(where);
  return m ? `${m[2]} in ${m[1]}` : where;
}

/**
 * Every path of a job, checked before runJob loads anything. `source` names the job file (`job.yaml`); `flags`
 * maps a field that a command-line flag overrode to that flag (e.g. { output_dir: '--output' }).
 */
export function checkJobPaths(job: JobConfig, source: string, flags: Partial<Record<'model' | 'output_dir', string>> = {}): void {
  const at = (key: string): string => flags[key as keyof typeof flags] ?? `${source}: ${key}`;
  checkModelDir(job.model, at('model'), { tokenizer: true });
  checkInputFile(job.data.train, at('data.train'));
  if (job.data.validation) checkInputFile(job.data.validation, at('data.validation'));
  checkOutputDir(job.output_dir, at('output_dir'));
  if (typeof job.training.resume === 'string') {
    const st = statOf(job.training.resume);
    if (!st?.isDirectory()) {
      throw new ConfigError(`${at('training.resume')}: ${job.training.resume} ${st ? 'is a file, not a checkpoint directory' : 'does not exist'}`, {
        hint: 'give a checkpoint directory (OUTPUT_DIR/checkpoints/step-N), or true to resume from the newest one',
      });
    }
  }
}

/**
 * The job's compare.prompts fit the model's context with compare.max_new_tokens (tokenizer and config.json only):
 * found now, not after training when the answers are generated.
 */
export function checkComparePrompts(job: JobConfig, source: string): void {
  if (job.compare.prompts.length === 0) return;
  const cfg = loadModelConfig(job.model);
  const tok = loadTokenizer(job.model);
  encodePromptsToFit(tok, job.compare.prompts, job.compare.max_new_tokens, {
    maxPositions: cfg.maxPositionEmbeddings,
    names: { maxNewTokens: `compare.max_new_tokens (${source})` },
  });
}
