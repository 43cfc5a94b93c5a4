// `coordinator` command line: start (a job, or the built-in example), generate, eval, quantize, merge, config-doc.
import { Command, InvalidArgumentError, Option } from 'commander';
import { join } from 'node:path';
import cliProgress from 'cli-progress';
import { loadJob, configReference } from './job.ts';
import { runJob } from './run.ts';
import { ensureExampleAssets, exampleJob, exampleComparePrompts } from './example/assets.ts';
import { createBackend, type BackendName } from '../core/engine/index.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { loadModelConfig, loadGenerationConfig } from '../core/model/config.ts';
import { loadStage } from '../core/model/loader.ts';
import { fullModelSpec } from '../core/model/llama.ts';
import { applyAdapter, loadAdapter } from '../core/model/adapter.ts';
import { answerPrompts } from './answer.ts';
import { readRecords } from './data/records.ts';
import { tokenizeRecords } from './data/tokenize.ts';
import { evaluateLoss } from '../core/train/local.ts';
import { quantizeCheckpoint } from '../core/model/quantize.ts';
import { mergeAdapter } from './merge.ts';
import { DqloraError } from '../common/errors.ts';
import { EXIT, clearRunOutputs, installStopSignals, logFatal, startDecision, stoppedMessage } from './lifecycle.ts';

const int = (name: string) => (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${name} must be a non-negative integer`);
  return n;
};
const float = (name: string) => (v: string): number => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
  return n;
};
const out = (s: string): void => { process.stdout.write(s + '\n'); };
const backendOption = (): Option => new Option('--backend <name>', 'tensor backend').choices(['cpu', 'cuda', 'auto']).default('auto');

function progressBar(label: string): { update: (done: number, total: number) => void; stop: () => void } {
  if (!process.stderr.isTTY) return { update: () => {}, stop: () => {} };
  const bar = new cliProgress.SingleBar({ format: `${label} |{bar}| {value}/{total}`, stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic);
  let started = false;
  return {
    update: (d, t) => { if (!started) { bar.start(t, 0); started = true; } bar.update(d); },
    stop: () => { if (started) bar.stop(); },
  };
}

/** Prints base vs fine-tuned answers side by side (stacked: terminals are narrow and answers long). */
function printComparison(rows: { prompt: string; base: string; tuned?: string; expected?: string }[]): void {
  for (const r of rows) {
    out(`\n━━ ${r.prompt}`);
    out(`  base model : ${r.base || '(empty)'}`);
    if (r.tuned !== undefined) out(`  fine-tuned : ${r.tuned || '(empty)'}`);
    if (r.expected !== undefined) out(`  training   : ${r.expected}`);
  }
}

const program = new Command();
program.name('coordinator').description('dqlora: QLoRA fine-tuning of Hugging Face LLMs (NF4 + double quantization base, LoRA adapters)').showHelpAfterError();

program.command('start')
  .description('run a training job (-c job.yaml), or with no config the built-in example: a small model learns keyword → description answers')
  .option('-c, --config <file>', 'job config (YAML); see README "Configuration"')
  .addOption(backendOption())
  .option('--max-steps <n>', 'override training.max_steps', int('--max-steps'))
  .option('--stop-after <n>', 'stop (with a checkpoint) after n optimizer steps of this invocation', int('--stop-after'))
  .option('--output <dir>', 'override output_dir')
  .option('--fresh', 'train from step 0 even when output_dir holds checkpoints or a finished run (they are replaced)')
  .option('--no-progress', 'log lines instead of a progress bar')
  .option('--listen <host:port>', 'distributed: control service address (overrides distributed.listen)')
  .option('--nats <url>', 'distributed: NATS server for the all-reduce (overrides distributed.nats_url)')
  .option('--job-token <token>', 'distributed: token workers must present (default: $DQLORA_JOB_TOKEN, else random)')
  .addHelpText('after', `
Exit codes: ${EXIT.succeeded} trained, or output_dir already holds the finished run (nothing is touched); ${EXIT.failed} failed;
${EXIT.stopped} stopped by SIGTERM/SIGINT after a checkpoint (resumable, the resume command is printed); ${EXIT.interrupted} interrupted
without a checkpoint (a second signal, or none written within DQLORA_STOP_GRACE_S).`)
  .action(async (o: { config?: string; backend: BackendName; maxSteps?: number; stopAfter?: number; output?: string; progress: boolean; listen?: string; nats?: string; jobToken?: string; fresh?: boolean }) => {
    const isExample = !o.config;
    let job;
    if (isExample) {
      const assets = ensureExampleAssets(undefined, out);
      job = exampleJob(assets, o.output);
      out(`dqlora example: QLoRA on a small random-init Llama (${assets.modelDir})`);
      out(`data: ${assets.trainPath} (keywords joined by '#' → description, with duplicates) + validation`);
    } else {
      job = loadJob(o.config!);
      if (o.output) job.output_dir = o.output;
    }
    if (o.backend !== 'auto') job.backend = o.backend;
    if (o.maxSteps !== undefined) job.training.max_steps = o.maxSteps;
    if (o.listen) job.distributed.listen = o.listen;
    if (o.nats) job.distributed.nats_url = o.nats;
    if (o.jobToken) process.env.DQLORA_JOB_TOKEN = o.jobToken;
    // A finished output_dir is left alone (a Kubernetes Job restarted after success, a second `start`), before any
    // slow work; --fresh starts over, --max-steps above the finished count trains on. training.resume: false (the
    // built-in example) always starts over.
    if (job.training.resume !== false || o.fresh) {
      const decision = startDecision(job.output_dir, { fresh: o.fresh, maxSteps: o.maxSteps });
      if (decision.action !== 'run') out(decision.message);
      if (decision.action === 'done') return;
    }
    if (o.fresh) {
      job.training.resume = false;
      for (const p of clearRunOutputs(job.output_dir)) out(`--fresh: removed ${p}`);
    }
    const stop = installStopSignals();
    const res = await runJob(job, { progress: o.progress && process.stderr.isTTY, stopAfter: o.stopAfter, print: out, stop }).finally(() => stop.dispose());
    if (res.stopped) {
      out(stoppedMessage({ ...res.stopped, checkpointDir: res.stopped.checkpointDir || '(none yet: the resume starts from step 0)' }));
      process.exit(EXIT.stopped);
    }
    if (res.answers.length) {
      const expected = isExample ? new Map(exampleComparePrompts(res.answers.length).map((p) => [p.prompt, p.expected])) : new Map<string, string>();
      out('\nbefore / after fine-tuning (greedy decoding):');
      printComparison(res.answers.map((a) => ({ ...a, expected: expected.get(a.prompt) })));
    }
  });

program.command('generate')
  .description("answer prompts with the base model and, with --adapter, the fine-tuned one, side by side (the seed's before/after check)")
  .requiredOption('--model <dir>', 'Hugging Face model directory')
  .option('--adapter <dir>', 'PEFT LoRA adapter directory')
  .option('--max-new-tokens <n>', 'tokens to generate per answer', int('--max-new-tokens'), 128)
  .option('--temperature <t>', '0 = greedy', float('--temperature'), 0)
  .option('--top-p <p>', 'nucleus sampling', float('--top-p'), 1)
  .option('--top-k <k>', 'top-k sampling (0 = off)', int('--top-k'), 0)
  .option('--seed <n>', 'sampling seed', int('--seed'), 0)
  .option('--raw', 'do not apply the chat template / prompt format (prompts are used as they are)')
  .addOption(backendOption())
  .argument('<prompts...>', 'prompts, e.g. "拓数派#openpie#数据库"')
  .action(async (prompts: string[], o: { model: string; adapter?: string; maxNewTokens: number; temperature: number; topP: number; topK: number; seed: number; backend: BackendName }) => {
    const be = await createBackend(o.backend);
    const cfg = loadModelConfig(o.model);
    const tok = loadTokenizer(o.model);
    const gen = loadGenerationConfig(o.model);
    const bar = progressBar('loading');
    const stage = loadStage(be, o.model, fullModelSpec(cfg), { onProgress: bar.update });
    bar.stop();
    const so = { maxNewTokens: o.maxNewTokens, temperature: o.temperature, topP: o.topP, topK: o.topK, seed: o.seed, eosIds: gen.eosTokenIds };
    const base = answerPrompts([stage], tok, prompts, { ...so, lora: false });
    let tuned: string[] | undefined;
    if (o.adapter) {
      const n = applyAdapter(be, stage, loadAdapter(o.adapter), o.adapter);
      out(`adapter: ${n} LoRA modules from ${o.adapter}`);
      tuned = answerPrompts([stage], tok, prompts, { ...so, lora: true });
    }
    printComparison(prompts.map((p, i) => ({ prompt: p, base: base[i], tuned: tuned?.[i] })));
  });

program.command('eval')
  .description('loss and perplexity of the model (with --adapter: fine-tuned) on a dataset')
  .requiredOption('--model <dir>', 'Hugging Face model directory')
  .requiredOption('--data <file>', 'JSON/JSONL dataset (alpaca, chat or text records)')
  .option('--adapter <dir>', 'PEFT LoRA adapter directory')
  .option('--max-length <n>', 'truncate examples to n tokens', int('--max-length'), 512)
  .option('--batch-size <n>', 'sequences per batch', int('--batch-size'), 8)
  .addOption(backendOption())
  .action(async (o: { model: string; data: string; adapter?: string; maxLength: number; batchSize: number; backend: BackendName }) => {
    const be = await createBackend(o.backend);
    const cfg = loadModelConfig(o.model);
    const tok = loadTokenizer(o.model);
    const { records } = readRecords(o.data);
    const { examples } = tokenizeRecords(records, tok, { maxLength: o.maxLength });
    const stage = loadStage(be, o.model, fullModelSpec(cfg));
    const padId = tok.padId ?? tok.eosId ?? 0;
    const base = evaluateLoss([stage], examples, o.batchSize, padId);
    out(`base model : loss ${base.loss.toFixed(4)}  perplexity ${base.perplexity.toFixed(3)}  (${base.tokens} label tokens, ${examples.length} examples)`);
    if (o.adapter) {
      applyAdapter(be, stage, loadAdapter(o.adapter), o.adapter);
      const ft = evaluateLoss([stage], examples, o.batchSize, padId);
      out(`fine-tuned : loss ${ft.loss.toFixed(4)}  perplexity ${ft.perplexity.toFixed(3)}`);
    }
  });

program.command('quantize')
  .description('write a pre-quantized NF4 checkpoint in the bitsandbytes serialization (loadable here and by transformers + bitsandbytes)')
  .requiredOption('--model <dir>', 'Hugging Face model directory')
  .requiredOption('--out <dir>', 'output directory')
  .option('--blocksize <n>', 'NF4 block size', int('--blocksize'), 64)
  .option('--no-double-quant', 'keep float32 absmax (4.5 bits/param instead of 4.127)')
  .addOption(new Option('--compute-dtype <dtype>', 'bnb_4bit_compute_dtype recorded in config.json').choices(['bfloat16', 'float16', 'float32']).default('bfloat16'))
  .action(async (o: { model: string; out: string; blocksize: number; doubleQuant: boolean; computeDtype: 'bfloat16' | 'float16' | 'float32' }) => {
    const bar = progressBar('quantize');
    const r = await quantizeCheckpoint(o.model, o.out, { blocksize: o.blocksize, doubleQuant: o.doubleQuant, computeDtype: o.computeDtype, onProgress: bar.update });
    bar.stop();
    out(`quantized ${r.quantized} linear weights, kept ${r.kept} tensors: ${(r.bytesIn / 2 ** 20).toFixed(1)} MiB → ${(r.bytesOut / 2 ** 20).toFixed(1)} MiB in ${o.out}`);
  });

program.command('merge')
  .description('fold a LoRA adapter into the base weights and write a plain Hugging Face checkpoint')
  .requiredOption('--model <dir>', 'base model directory (full precision or pre-quantized)')
  .requiredOption('--adapter <dir>', 'PEFT LoRA adapter directory')
  .requiredOption('--out <dir>', 'output directory (must not hold a model)')
  .addOption(new Option('--dtype <dtype>', 'output dtype').choices(['bfloat16', 'float16', 'float32']).default('bfloat16'))
  .addOption(new Option('--base <which>', 'merge into the NF4-dequantized weights training saw, or the original ones').choices(['dequantized', 'original']).default('dequantized'))
  .action((o: { model: string; adapter: string; out: string; dtype: 'bfloat16' | 'float16' | 'float32'; base: 'dequantized' | 'original' }) => {
    const bar = progressBar('merge');
    const r = mergeAdapter(o.model, o.adapter, o.out, { dtype: o.dtype, base: o.base, onProgress: bar.update });
    bar.stop();
    out(`merged ${r.merged} LoRA modules into ${r.tensors} tensors (${o.dtype}) → ${join(o.out)}`);
  });

program.command('config-doc')
  .description('print the job.yaml field reference (markdown)')
  .action(() => out(configReference()));

try {
  await program.parseAsync(process.argv);
} catch (e) {
  // One structured `event: "fatal"` line for log collectors, and the message for the person at the terminal.
  logFatal(e);
  if (e instanceof DqloraError) {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(EXIT.failed);
  }
  throw e;
}
