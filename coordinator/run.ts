// Runs a job in this process: load → (resume) → train with progress → eval → save adapter → compare answers.
// The distributed path (workers over gRPC) drives the same Trainer logic from the coordinator.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import cliProgress from 'cli-progress';
import type { JobConfig } from './job.ts';
import { createBackend } from '../core/engine/index.ts';
import type { Backend } from '../core/engine/backend.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { loadModelConfig, type ModelConfig } from '../core/model/config.ts';
import { loadStage } from '../core/model/loader.ts';
import { defaultTargetModules, type LlamaStage, type LoraConfig } from '../core/model/llama.ts';
import { splitStages } from './plan.ts';
import { saveAdapter } from '../core/model/adapter.ts';
import { buildDataset } from './data/dataset.ts';
import { Trainer, type StepResult } from './train.ts';
import { fingerprint, listCheckpoints, loadCheckpoint, saveCheckpoint } from '../common/checkpoint.ts';
import { answerPrompts } from './answer.ts';
import { ConfigError } from '../common/errors.ts';
import { logger } from '../common/log.ts';
import { progress } from '../common/progress.ts';

const log = logger('job');

export function loraConfigOf(job: JobConfig, cfg: ModelConfig): LoraConfig {
  return {
    r: job.lora.r, alpha: job.lora.alpha, dropout: job.lora.dropout, useRslora: job.lora.use_rslora,
    targetModules: job.lora.target_modules ?? defaultTargetModules(cfg.modelType),
    rankPattern: job.lora.rank_pattern, alphaPattern: job.lora.alpha_pattern,
  };
}

export interface RunOutcome {
  readonly adapterDir: string;
  readonly steps: number;
  readonly firstLoss: number;
  readonly lastLoss: number;
  readonly evalLoss: number | null;
  readonly answers: { prompt: string; base: string; tuned: string }[];
  readonly tokensPerSecond: number;
}

export interface RunOptions {
  /** Show a progress bar on stderr (TTY) — otherwise a log line per `log_every` steps. */
  readonly progress?: boolean;
  /** Stop after this many optimizer steps in this invocation (tests of resume). */
  readonly stopAfter?: number;
  /** Print function for user-facing output (default: stdout). */
  readonly print?: (s: string) => void;
  readonly backend?: Backend;
}

export async function runJob(job: JobConfig, opts: RunOptions = {}): Promise<RunOutcome> {
  const print = opts.print ?? ((s: string) => process.stdout.write(s + '\n'));
  if (job.distributed.workers !== 0) return (await import('./distributed/run.ts')).runDistributed(job, opts);
  if (job.distributed.replicas !== 1 && job.distributed.replicas !== 'auto') {
    throw new ConfigError('distributed.replicas > 1 needs workers (distributed.workers: local or N)', { hint: 'use distributed.workers: local to start them on this machine' });
  }
  const be = opts.backend ?? await createBackend(job.backend);
  const cfg = loadModelConfig(job.model);
  const tok = loadTokenizer(job.model);
  const lora = loraConfigOf(job, cfg);
  log.info({ backend: be.name, model: job.model, type: cfg.modelType, layers: cfg.numLayers, hidden: cfg.hiddenSize }, 'loading');

  const ds = buildDataset({
    trainPath: job.data.train, validationPath: job.data.validation, validationSplit: job.data.validation_split || undefined,
    dedup: job.data.dedup, seed: job.training.seed, maxLength: job.data.max_length, onError: job.data.on_error,
  }, tok);
  log.info({ ...ds.stats, train: ds.train.length, validation: ds.validation.length }, 'dataset ready');

  const nStages = job.distributed.stages === 'auto' ? 1 : job.distributed.stages;
  const loading = progress('load + quantize', log, { tty: opts.progress });
  const stages: LlamaStage[] = splitStages(cfg.numLayers, nStages).map((spec, i) => loadStage(be, job.model, spec, {
    lora, seed: job.training.seed, blocksize: job.quantization.blocksize, doubleQuant: job.quantization.double_quant,
    gradientCheckpointing: job.training.gradient_checkpointing,
    onProgress: (d, t, name) => loading.update(d, t, `stage ${i}: ${name}`),
  }));
  loading.stop();
  log.info({ stages: stages.map((s) => s.spec), memoryBytes: be.memoryInUse() }, 'model loaded');
  const padId = tok.padId ?? tok.eosId ?? 0;
  const t = job.training;
  const trainer = new Trainer(be, stages, ds.train, {
    epochs: t.epochs, maxSteps: t.max_steps, microBatchSize: t.micro_batch_size, gradAccum: t.grad_accum, replicas: 1,
    lr: t.lr, schedule: t.schedule, warmupSteps: t.warmup_steps, weightDecay: t.weight_decay, beta1: t.adam_beta1,
    beta2: t.adam_beta2, eps: t.adam_eps, maxGradNorm: t.max_grad_norm, seed: t.seed, padId,
  }, {
    configHash: fingerprint({ lora: job.lora, training: { ...t, resume: undefined, log_every: undefined, eval_every: undefined, save_every: undefined, keep_checkpoints: undefined }, quant: job.quantization, model: cfg.raw }),
    dataHash: fingerprint(ds.train.map((e) => Array.from(e.inputIds).concat([-1], Array.from(e.labels)))),
  });

  // Resume
  mkdirSync(job.output_dir, { recursive: true });
  if (t.resume !== false) {
    const dir = typeof t.resume === 'string' ? t.resume : listCheckpoints(job.output_dir).at(-1)?.dir;
    if (dir) {
      trainer.restore(loadCheckpoint(dir));
      log.info({ checkpoint: dir, step: trainer.state.step }, 'resumed');
      print(`resumed from ${dir} at step ${trainer.state.step}/${trainer.totalSteps}`);
    } else if (typeof t.resume === 'string') throw new ConfigError(`training.resume: ${t.resume} does not exist`);
  }

  // Answers of the base model (LoRA branch off), for the before/after comparison.
  const prompts = job.compare.prompts;
  const genOpts = { maxNewTokens: job.compare.max_new_tokens };
  const baseAnswers = prompts.length ? answerPrompts(stages, tok, prompts, { ...genOpts, lora: false }) : [];

  const startStep = trainer.state.step;
  const firstLoss = trainer.state.history.at(-1)?.loss ?? NaN;
  let first = firstLoss, last = NaN;
  const bar = opts.progress ? new cliProgress.SingleBar({
    format: 'train |{bar}| step {value}/{total} | loss {loss} | lr {lr} | {tps} tok/s | eta {eta_formatted}',
    stream: process.stderr, hideCursor: true, etaBuffer: 20,
  }, cliProgress.Presets.shades_classic) : undefined;
  bar?.start(trainer.totalSteps, trainer.state.step, { loss: '-', lr: '-', tps: '-' });
  const t0 = performance.now();
  let tokens = 0;
  const stopAt = opts.stopAfter !== undefined ? Math.min(trainer.totalSteps, startStep + opts.stopAfter) : trainer.totalSteps;
  while (trainer.state.step < stopAt) {
    const r: StepResult = trainer.step();
    tokens += r.tokens;
    if (Number.isNaN(first)) first = r.loss;
    last = r.loss;
    const tps = tokens / ((performance.now() - t0) / 1000);
    bar?.update(r.step, { loss: r.loss.toFixed(4), lr: r.lr.toExponential(2), tps: tps.toFixed(0) });
    if (!bar && r.step % t.log_every === 0) log.info({ step: r.step, total: trainer.totalSteps, loss: +r.loss.toFixed(5), lr: r.lr, gradNorm: +r.gradNorm.toFixed(4), epoch: +r.epoch.toFixed(3), tokensPerSec: Math.round(tps) }, 'step');
    if (!Number.isFinite(r.loss)) throw new ConfigError(`loss became ${r.loss} at step ${r.step}`, { hint: 'lower training.lr or check the data' });
    if (t.eval_every > 0 && r.step % t.eval_every === 0 && ds.validation.length) {
      const ev = trainer.evaluate(ds.validation);
      trainer.state.evalHistory.push({ step: r.step, loss: ev.loss, perplexity: ev.perplexity });
      log.info({ step: r.step, evalLoss: +ev.loss.toFixed(5), perplexity: +ev.perplexity.toFixed(3) }, 'eval');
    }
    if (t.save_every > 0 && r.step % t.save_every === 0 && r.step < trainer.totalSteps) checkpoint(trainer, job, lora);
  }
  bar?.stop();
  const seconds = (performance.now() - t0) / 1000;
  const ckDir = checkpoint(trainer, job, lora);
  if (trainer.state.step < trainer.totalSteps) {
    print(`stopped at step ${trainer.state.step}/${trainer.totalSteps}; checkpoint ${ckDir}`);
    return { adapterDir: join(ckDir, 'adapter'), steps: trainer.state.step, firstLoss: first, lastLoss: last, evalLoss: null, answers: [], tokensPerSecond: tokens / seconds };
  }
  const adapterDir = join(job.output_dir, 'adapter');
  saveAdapter(adapterDir, trainer.snapshot().modules, lora, job.model);
  let evalLoss: number | null = null;
  if (ds.validation.length) {
    const ev = trainer.evaluate(ds.validation);
    evalLoss = ev.loss;
    trainer.state.evalHistory.push({ step: trainer.state.step, loss: ev.loss, perplexity: ev.perplexity });
  }
  const tunedAnswers = prompts.length ? answerPrompts(stages, tok, prompts, { ...genOpts, lora: true }) : [];
  const answers = prompts.map((p, i) => ({ prompt: p, base: baseAnswers[i], tuned: tunedAnswers[i] }));
  const summary = { steps: trainer.state.step, firstLoss: first, lastLoss: last, evalLoss, tokensPerSecond: tokens / seconds, seconds, adapterDir, answers, dataset: ds.stats };
  writeFileSync(join(job.output_dir, 'summary.json'), JSON.stringify(summary, null, 1) + '\n');
  print(`trained ${trainer.state.step - startStep} steps in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(0)} tokens/s): loss ${first.toFixed(4)} → ${last.toFixed(4)}${evalLoss !== null ? `, validation loss ${evalLoss.toFixed(4)} (perplexity ${Math.exp(evalLoss).toFixed(2)})` : ''}`);
  print(`adapter saved to ${adapterDir}`);
  return { adapterDir, steps: trainer.state.step, firstLoss: first, lastLoss: last, evalLoss, answers, tokensPerSecond: tokens / seconds };
}

function checkpoint(trainer: Trainer, job: JobConfig, lora: LoraConfig): string {
  const snap = trainer.snapshot();
  const dir = saveCheckpoint(job.output_dir, { state: trainer.state, modules: snap.modules, moments: snap.moments, loraConfig: lora }, job.model, job.training.keep_checkpoints);
  log.info({ dir, step: trainer.state.step }, 'checkpoint written');
  return dir;
}

