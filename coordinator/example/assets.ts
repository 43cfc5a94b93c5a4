// The built-in example: makes (once) a small random Llama in real HF format with the project's BPE tokenizer and
// a keywords → description dataset in the seed's form, and the job that QLoRA-trains it.
import { accessSync, constants, existsSync, readFileSync, writeFileSync, mkdirSync, rmSync, renameSync } from 'node:fs';
import { ConfigError } from '../../common/errors.ts';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeExampleData, generateExampleData } from './data.ts';
import { writeExampleTokenizer } from './tokenizer.ts';
import { EXAMPLE_SHAPE, writeRandomLlama } from './model.ts';
import { parseJob, type JobConfig } from '../job.ts';

/** Bump when the generated assets change, so stale caches are rebuilt. */
export const EXAMPLE_VERSION = 1;
export const EXAMPLE_SEED = 1234;
export const PACKAGE_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface ExampleAssets { root: string; modelDir: string; trainPath: string; validationPath: string }

/**
 * Where the example's files go: $DQLORA_CACHE_DIR when set (container images set it to a writable path: their
 * application directory is read-only), else examples-cache/ and runs/ beside the package.
 */
export function exampleCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.DQLORA_CACHE_DIR?.trim() || join(PACKAGE_ROOT, 'examples-cache');
}
export function exampleOutputDir(env: NodeJS.ProcessEnv = process.env): string {
  const c = env.DQLORA_CACHE_DIR?.trim();
  return c ? join(c, 'runs', 'example') : join(PACKAGE_ROOT, 'runs', 'example');
}

/** Fails early, with what to do, when `dir` cannot be created or written (a read-only image, a full disk). */
export function assertWritableDir(dir: string, what: string): void {
  try {
    mkdirSync(dir, { recursive: true });
    accessSync(dir, constants.W_OK);
  } catch (e) {
    throw new ConfigError(`cannot write the ${what} under ${dir}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, {
      hint: 'set DQLORA_CACHE_DIR to a writable directory (the example model and runs/ go there), or pass --output DIR', cause: e,
    });
  }
}

/** Creates the example's model and data under `cacheDir` unless a complete copy is there already. */
export function ensureExampleAssets(cacheDir = exampleCacheDir(), log: (s: string) => void = () => {}): ExampleAssets {
  const root = join(cacheDir, `example-v${EXAMPLE_VERSION}`);
  const assets = { root, modelDir: join(root, 'model'), trainPath: join(root, 'data', 'train.jsonl'), validationPath: join(root, 'data', 'validation.jsonl') };
  if (existsSync(join(root, 'READY'))) return assets;
  assertWritableDir(cacheDir, 'example model and data');
  log(`creating the example model and dataset in ${root} (once)`);
  const tmp = `${root}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  writeExampleData(join(tmp, 'data'), EXAMPLE_SEED);
  const { train } = generateExampleData(EXAMPLE_SEED);
  const texts = train.flatMap((p) => [p.instruction, p.output]);
  const { vocabSize } = writeExampleTokenizer(join(tmp, 'model'), texts);
  const tj = JSON.parse(readFileSync(join(tmp, 'model', 'tokenizer.json'), 'utf8')) as { added_tokens: { id: number; content: string }[] };
  const id = (c: string): number => { const t = tj.added_tokens.find((x) => x.content === c); if (!t) throw new Error(`example tokenizer lacks ${c}`); return t.id; };
  writeRandomLlama(join(tmp, 'model'), {
    ...EXAMPLE_SHAPE, vocabSize: Math.ceil(vocabSize / 64) * 64,
    bosTokenId: id('<|begin_of_text|>'), eosTokenId: id('<|im_end|>'), padTokenId: id('<|pad|>'),
  }, EXAMPLE_SEED);
  writeFileSync(join(tmp, 'READY'), new Date().toISOString() + '\n');
  mkdirSync(cacheDir, { recursive: true });
  rmSync(root, { recursive: true, force: true });
  renameSync(tmp, root);
  return assets;
}

/** A few training keywords to compare the base and the fine-tuned answers on. */
export function exampleComparePrompts(n = 3): { prompt: string; expected: string }[] {
  const { train } = generateExampleData(EXAMPLE_SEED);
  const seen = new Set<string>(), out: { prompt: string; expected: string }[] = [];
  for (const p of train) { if (!seen.has(p.instruction)) { seen.add(p.instruction); out.push({ prompt: p.instruction, expected: p.output }); } if (out.length >= n) break; }
  return out;
}

/** The example job: QLoRA on all linear layers, sized to finish in a few minutes on 2 CPU cores. */
export function exampleJob(a: ExampleAssets, outputDir = exampleOutputDir(), overrides: Record<string, unknown> = {}): JobConfig {
  return parseJob({
    name: 'example',
    model: a.modelDir,
    output_dir: outputDir,
    backend: 'auto',
    data: { train: a.trainPath, validation: a.validationPath, dedup: true, max_length: 160 },
    lora: { r: 16, alpha: 32, dropout: 0.0, target_modules: 'all-linear' },
    training: { epochs: 20, micro_batch_size: 8, grad_accum: 1, lr: 3e-3, schedule: 'cosine', warmup_steps: 10, seed: 42, max_grad_norm: 1.0, resume: false, log_every: 10 },
    compare: { prompts: exampleComparePrompts().map((p) => p.prompt), max_new_tokens: 80 },
    ...overrides,
  }, 'built-in example', PACKAGE_ROOT);
}
