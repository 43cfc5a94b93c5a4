// `coordinator` command line: start (a job, or the built-in example), generate, eval, quantize, merge, config-doc.
import { Command, CommanderError, Option } from 'commander';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import cliProgress from 'cli-progress';
import { loadJob, configReference } from './job.ts';
import { runJob } from './run.ts';
import { ensureExampleAssets, exampleJob, exampleComparePrompts } from './example/assets.ts';
import type { BackendName } from '../core/engine/index.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { loadModelConfig, loadGenerationConfig } from '../core/model/config.ts';
import { loadStage } from '../core/model/loader.ts';
import { fullModelSpec } from '../core/model/llama.ts';
import { applyAdapter, loadAdapter } from '../core/model/adapter.ts';
import { readRecords } from './data/records.ts';
import { tokenizeRecords } from './data/tokenize.ts';
import { evaluateLoss } from '../core/train/local.ts';
import { quantizeCheckpoint } from '../core/model/quantize.ts';
import { mergeAdapter } from './merge.ts';
import { clearRunOutputs, installStopSignals, logFatal, startDecision, stoppedMessage } from './lifecycle.ts';
import { DataError, DqloraError, EXIT, exitCodeFor, isSystemError } from '../common/errors.ts';
import { answerEncoded, encodePromptsToFit } from './answer.ts';
import { checkAdapterDir, checkComparePrompts, checkInputFile, checkJobPaths, checkModelDir, checkOutputDir } from './preflight.ts';
import { backendFor, collect, intAtLeast, numberIn, readPrompts } from './cli-input.ts';
import { checkLogLevelEnv } from '../common/log.ts';
import { resolveJobToken } from '../common/job-token.ts';

const out = (s: string): void => { process.stdout.write(s + '\n'); };
/** Set once `start` begins running a job (its failures are logged as a structured fatal event too). */
let jobStarted = false;
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

/** A prompt as a one-line heading: long ones (a --prompt-file) are shown by their start and length. */
function shortPrompt(p: string): string {
  const line = p.replace(/\s+/g, ' ').trim();
  return line.length <= 160 ? line : `${line.slice(0, 120)}… (${p.length} characters)`;
}

/** Prints base vs fine-tuned answers side by side (stacked: terminals are narrow and answers long). */
function printComparison(rows: { prompt: string; base: string; tuned?: string; expected?: string }[]): void {
  for (const r of rows) {
    out(`\n━━ ${shortPrompt(r.prompt)}`);
    out(`  base model : ${r.base || '(empty)'}`);
    if (r.tuned !== undefined) out(`  fine-tuned : ${r.tuned || '(empty)'}`);
    if (r.expected !== undefined) out(`  training   : ${r.expected}`);
  }
}

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

const program = new Command();
program.name('coordinator').description('dqlora: QLoRA fine-tuning of Hugging Face LLMs (NF4 + double quantization base, LoRA adapters)').showHelpAfterError('(add --help for usage)')
  .version(VERSION, '-V, --version', 'print the dqlora version')
  // Usage errors are thrown (not process.exit(1)) so they get their own exit code; subcommands inherit this.
  .exitOverride();

program.command('start')
  .description('run a training job (-c job.yaml), or with no config the built-in example: a small model learns keyword → description answers')
  .option('-c, --config <file>', 'job config (YAML); see README "Configuration"')
  .addOption(backendOption())
  .option('--max-steps <n>', 'override training.max_steps (≥ 1)', intAtLeast('--max-steps', 1))
  .option('--stop-after <n>', 'stop (with a checkpoint) after n optimizer steps of this invocation', intAtLeast('--stop-after', 1))
  .option('--output <dir>', 'override output_dir')
  .option('--fresh', 'train from step 0 even when output_dir holds checkpoints or a finished run (they are replaced)')
  .option('--no-progress', 'log lines instead of a progress bar')
  .option('--listen <host:port>', 'distributed: control service address (overrides distributed.listen)')
  .option('--nats <url>', 'distributed: NATS server for the all-reduce (overrides distributed.nats_url)')
  .option('--job-token-file <path>', 'distributed: file holding the token workers must present (default: $DQLORA_JOB_TOKEN, else random in local mode)')
  .option('--job-token <token>', 'deprecated: visible to every user in ps; use --job-token-file or $DQLORA_JOB_TOKEN')
  .addHelpText('after', `
Exit codes: ${EXIT.ok} trained, or output_dir already holds the finished run (nothing is touched); ${EXIT.runtime} failed;
${EXIT.stopped} stopped by SIGTERM/SIGINT after a checkpoint (resumable, the resume command is printed); ${EXIT.interrupted} interrupted
without a checkpoint (a second signal, or none written within DQLORA_STOP_GRACE_S).`)
  .action(async (o: { config?: string; backend: BackendName; maxSteps?: number; stopAfter?: number; output?: string; progress: boolean; listen?: string; nats?: string; jobToken?: string; jobTokenFile?: string; fresh?: boolean }) => {
    const isExample = !o.config;
    let job;
    if (isExample) {
      const assets = ensureExampleAssets(undefined, out);
      job = exampleJob(assets, o.output);
      out(`dqlora example: QLoRA on a small random-init Llama (${assets.modelDir})`);
      out(`data: ${assets.trainPath} (keywords joined by '#' → description, with duplicates) + validation`);
    } else {
      checkInputFile(o.config!, '--config');
      job = loadJob(o.config!);
      if (o.output) job.output_dir = o.output;
    }
    if (o.backend !== 'auto') job.backend = o.backend;
    if (o.maxSteps !== undefined) job.training.max_steps = o.maxSteps;
    if (o.listen) job.distributed.listen = o.listen;
    if (o.nats) job.distributed.nats_url = o.nats;
    const jobToken = resolveJobToken({ file: o.jobTokenFile, arg: o.jobToken });
    if (jobToken) process.env.DQLORA_JOB_TOKEN = jobToken;
    const source = o.config ?? 'the example job';
    checkJobPaths(job, source, o.output ? { output_dir: '--output' } : {});
    checkComparePrompts(job, source);
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
    // In-process runs only: distributed workers pick their own device, and the coordinator must not take a GPU.
    const backend = job.distributed.workers !== 0 ? undefined
      : await backendFor(job.backend, o.backend === 'cuda' ? '--backend cuda' : `${source}: backend`, o.backend === 'cuda' ? 'use --backend cpu' : `set backend: cpu in ${source} (or pass --backend cpu)`);
    const stop = installStopSignals();
    jobStarted = true;
    const res = await runJob(job, { progress: o.progress && process.stderr.isTTY, stopAfter: o.stopAfter, print: out, backend, stop }).finally(() => stop.dispose());
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
  .requiredOption('--model <dir>', 'Hugging Face model directory (required)')
  .option('--adapter <dir>', 'PEFT LoRA adapter directory')
  .option('--prompt-file <file>', 'read a prompt from a file (the whole file is one prompt; repeatable)', collect)
  .addOption(new Option('--truncate <side>', "a prompt too long for the model's context: cut its text on the left (keep the end) or right (keep the start) instead of refusing").choices(['left', 'right']))
  .option('--max-new-tokens <n>', 'tokens to generate per answer (≥ 1)', intAtLeast('--max-new-tokens', 1), 128)
  .option('--temperature <t>', '0 = greedy; > 0 samples', numberIn('--temperature', 0, Infinity), 0)
  .option('--top-p <p>', 'nucleus sampling, in (0, 1]', numberIn('--top-p', 0, 1, { min: true }), 1)
  .option('--top-k <k>', 'top-k sampling (0 = off)', intAtLeast('--top-k', 0), 0)
  .option('--seed <n>', 'sampling seed', intAtLeast('--seed', 0), 0)
  .option('--raw', 'do not apply the chat template / prompt format (prompts are used as they are)')
  .option('--no-quantize', 'keep the base model in full precision (an adapter trained with quantization: none); default: NF4 as in training')
  .addOption(backendOption())
  .argument('[prompts...]', 'prompts, e.g. "拓数派#openpie#数据库"; "-" (or no prompt and a pipe) reads one from stdin')
  .action(async (args: string[], o: { model: string; adapter?: string; promptFile?: string[]; truncate?: 'left' | 'right'; maxNewTokens: number; temperature: number; topP: number; topK: number; seed: number; raw?: boolean; quantize: boolean; backend: BackendName }) => {
    // Everything the user gave is checked, and prompts are measured against the context, before the model loads.
    checkModelDir(o.model, '--model', { tokenizer: true });
    if (o.adapter) checkAdapterDir(o.adapter, '--adapter');
    const prompts = await readPrompts(args, o.promptFile);
    const cfg = loadModelConfig(o.model);
    const tok = loadTokenizer(o.model);
    const gen = loadGenerationConfig(o.model);
    const encoded = encodePromptsToFit(tok, prompts, o.maxNewTokens, {
      maxPositions: cfg.maxPositionEmbeddings, truncate: o.truncate,
      onTruncate: (i, from, to) => out(`prompt ${i + 1}: truncated on the ${o.truncate} from ${from} to ${to} tokens (context ${cfg.maxPositionEmbeddings} = prompt + --max-new-tokens ${o.maxNewTokens})`),
    }, { raw: o.raw });
    const adapter = o.adapter ? loadAdapter(o.adapter) : undefined;
    const be = await backendFor(o.backend, '--backend cuda', 'use --backend cpu');
    const bar = progressBar('loading');
    const stage = loadStage(be, o.model, fullModelSpec(cfg), { onProgress: bar.update, quantization: o.quantize ? 'nf4' : 'none' });
    bar.stop();
    const so = { maxNewTokens: o.maxNewTokens, temperature: o.temperature, topP: o.topP, topK: o.topK, seed: o.seed, eosIds: gen.eosTokenIds };
    const base = answerEncoded([stage], tok, encoded, { ...so, lora: false });
    let tuned: string[] | undefined;
    if (adapter && o.adapter) {
      const n = applyAdapter(be, stage, adapter, o.adapter);
      out(`adapter: ${n} LoRA modules from ${o.adapter}`);
      tuned = answerEncoded([stage], tok, encoded, { ...so, lora: true });
    }
    printComparison(prompts.map((p, i) => ({ prompt: p, base: base[i], tuned: tuned?.[i] })));
  });

program.command('eval')
  .description('loss and perplexity of the model (with --adapter: fine-tuned) on a dataset')
  .requiredOption('--model <dir>', 'Hugging Face model directory (required)')
  .requiredOption('--data <file>', 'JSON/JSONL dataset (alpaca, chat or text records) (required)')
  .option('--adapter <dir>', 'PEFT LoRA adapter directory')
  .option('--max-length <n>', 'truncate examples to n tokens (≥ 2)', intAtLeast('--max-length', 2), 512)
  .option('--batch-size <n>', 'sequences per batch (≥ 1)', intAtLeast('--batch-size', 1), 8)
  .addOption(new Option('--on-error <what>', 'malformed dataset lines: stop with file:line, or skip them').choices(['throw', 'skip']).default('throw'))
  .option('--no-quantize', 'evaluate the full-precision base (quantization: none); default: NF4 as in QLoRA training')
  .option('--json', 'print one JSON object (full-precision numbers) instead of text')
  .addOption(backendOption())
  .action(async (o: { model: string; data: string; adapter?: string; maxLength: number; batchSize: number; onError: 'throw' | 'skip'; quantize: boolean; json?: boolean; backend: BackendName }) => {
    checkModelDir(o.model, '--model', { tokenizer: true });
    checkInputFile(o.data, '--data');
    if (o.adapter) checkAdapterDir(o.adapter, '--adapter');
    const cfg = loadModelConfig(o.model);
    const tok = loadTokenizer(o.model);
    const { records, skipped } = readRecords(o.data, { onError: o.onError, skipHint: '--on-error skip' });
    if (skipped.length) out(`skipped ${skipped.length} malformed lines of ${o.data} (first: line ${skipped[0].line}: ${skipped[0].reason})`);
    const { examples } = tokenizeRecords(records, tok, { maxLength: o.maxLength });
    if (examples.length === 0) throw new DataError(`--data: no example with an answer token left in ${o.data} (${records.length} records)`, { hint: 'check the file, and that --max-length leaves room for the answers' });
    const be = await backendFor(o.backend, '--backend cuda', 'use --backend cpu');
    const quantization = o.quantize ? 'nf4' : 'none';
    const stage = loadStage(be, o.model, fullModelSpec(cfg), { quantization });
    const padId = tok.padId ?? tok.eosId ?? 0;
    const base = evaluateLoss([stage], examples, o.batchSize, padId);
    let ft: typeof base | undefined;
    if (o.adapter) {
      applyAdapter(be, stage, loadAdapter(o.adapter), o.adapter);
      ft = evaluateLoss([stage], examples, o.batchSize, padId);
    }
    if (o.json) {
      out(JSON.stringify({ quantization, examples: examples.length, base, ...(ft ? { adapted: ft } : {}) }));
      return;
    }
    out(`base model : loss ${base.loss.toFixed(4)}  perplexity ${base.perplexity.toFixed(3)}  (${base.tokens} label tokens, ${examples.length} examples${o.quantize ? '' : ', unquantized base'})`);
    if (ft) out(`fine-tuned : loss ${ft.loss.toFixed(4)}  perplexity ${ft.perplexity.toFixed(3)}`);
  });

program.command('quantize')
  .description('write a pre-quantized NF4 checkpoint in the bitsandbytes serialization (loadable here and by transformers + bitsandbytes)')
  .requiredOption('--model <dir>', 'Hugging Face model directory (required)')
  .requiredOption('--out <dir>', 'output directory (required; an earlier quantize output there is replaced only with --force)')
  .addOption(new Option('--blocksize <n>', 'NF4 block size').choices(['32', '64', '128', '256', '512', '1024', '2048', '4096']).default('64'))
  .option('--no-double-quant', 'keep float32 absmax (4.5 bits/param instead of 4.127)')
  .addOption(new Option('--compute-dtype <dtype>', 'bnb_4bit_compute_dtype recorded in config.json').choices(['bfloat16', 'float16', 'float32']).default('bfloat16'))
  .option('--force', 'replace an earlier quantize output in --out')
  .action(async (o: { model: string; out: string; blocksize: string; doubleQuant: boolean; computeDtype: 'bfloat16' | 'float16' | 'float32'; force?: boolean }) => {
    checkModelDir(o.model, '--model');
    checkOutputDir(o.out, '--out');
    const bar = progressBar('quantize');
    const r = await quantizeCheckpoint(o.model, o.out, { blocksize: Number(o.blocksize), doubleQuant: o.doubleQuant, computeDtype: o.computeDtype, force: o.force, onProgress: bar.update });
    bar.stop();
    out(`quantized ${r.quantized} linear weights, kept ${r.kept} tensors: ${(r.bytesIn / 2 ** 20).toFixed(1)} MiB → ${(r.bytesOut / 2 ** 20).toFixed(1)} MiB in ${o.out}`);
  });

program.command('merge')
  .description('fold a LoRA adapter into the base weights and write a plain Hugging Face checkpoint')
  .requiredOption('--model <dir>', 'base model directory (full precision or pre-quantized) (required)')
  .requiredOption('--adapter <dir>', 'PEFT LoRA adapter directory (required)')
  .requiredOption('--out <dir>', 'output directory, must not hold a model (required)')
  .addOption(new Option('--dtype <dtype>', 'output dtype').choices(['bfloat16', 'float16', 'float32']).default('bfloat16'))
  .addOption(new Option('--base <which>', 'merge into the NF4-dequantized weights training saw, or the original ones').choices(['dequantized', 'original']).default('dequantized'))
  .action((o: { model: string; adapter: string; out: string; dtype: 'bfloat16' | 'float16' | 'float32'; base: 'dequantized' | 'original' }) => {
    checkModelDir(o.model, '--model');
    checkAdapterDir(o.adapter, '--adapter');
    checkOutputDir(o.out, '--out', { refuseModel: 'choose an empty --out directory (merge never overwrites a model)' });
    const bar = progressBar('merge');
    const r = mergeAdapter(o.model, o.adapter, o.out, { dtype: o.dtype, base: o.base, onProgress: bar.update });
    bar.stop();
    out(`merged ${r.merged} LoRA modules into ${r.tensors} tensors (${o.dtype}) → ${join(o.out)}`);
  });

program.command('config-doc')
  .description('print the job.yaml field reference (markdown)')
  .action(() => out(configReference()));

(await import('./status/cli.ts')).registerStatusCli(program);

// Ctrl-C is left to the default action on purpose: the process ends at once, even inside a long synchronous
// computation (a JS handler would wait for the event loop), and the shell reports 128 + 2 = 130 (EXIT.interrupted;
// SIGTERM: 143). Checkpoints and adapters are written atomically, so an interrupted run leaves nothing torn.

// Exit codes (README "Exit codes"): 2 usage or config, 3 data, 1 runtime. A user's mistake is one line (and a
// hint), never a stack trace; only an error this program does not know — a bug — prints its stack.
try {
  checkLogLevelEnv();
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) process.exit(e.exitCode === 0 ? EXIT.ok : EXIT.usage); // commander printed it
  // A job that fails: one structured `event: "fatal"` line for log collectors (before the message for the person);
  // a command's usage error is the message alone.
  if (jobStarted) logFatal(e);
  if (e instanceof DqloraError) {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(exitCodeFor(e));
  }
  if (isSystemError(e)) {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(EXIT.runtime);
  }
  process.stderr.write(`internal error (a bug: please report it with this output):\n${(e as Error)?.stack ?? String(e)}\n`);
  process.exit(EXIT.runtime);
}
