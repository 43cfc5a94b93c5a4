// The job config (job.yaml): one validated object, every field documented. Errors name the field path.
// The README's configuration reference is generated from these descriptions (`coordinator config-doc`).
import { readFileSync, existsSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import { z } from 'zod';
import { ConfigError } from '../common/errors.ts';
import type { LoraConfig } from '../common/peft.ts';
import { defaultTargetModules } from '../core/model/llama.ts';
import type { ModelConfig } from '../core/model/config.ts';

const positiveInt = z.number().int().positive();
const intOrAutoMessage = (iss: { input?: unknown }): string => `expected a positive integer or 'auto', got ${JSON.stringify(iss.input)}`;
/** A positive integer or 'auto', every bad value ("huge", 0, 2.5) reported the same way. */
const positiveIntOrAuto = z.union([z.number({ error: intOrAutoMessage }).int({ error: intOrAutoMessage }).positive({ error: intOrAutoMessage }), z.literal('auto')], { error: intOrAutoMessage });

export const JobSchema = z.object({
  name: z.string().min(1).default('job').describe('Job name: used in logs, metrics labels and the NATS subjects.'),
  model: z.string().min(1).describe('Base model: a Hugging Face model directory — config.json, weights as *.safetensors or pickled pytorch_model*.bin (read without executing code), tokenizer.json or a SentencePiece tokenizer.model. Llama, Mistral, Qwen2 and ChatGLM2; pre-quantized bitsandbytes NF4 checkpoints of the Llama family are accepted.'),
  output_dir: z.string().min(1).describe('Where the adapter, checkpoints and logs go.'),
  backend: z.enum(['cpu', 'cuda', 'auto']).default('auto').describe('Tensor backend: cpu (TypeScript + native kernels), cuda (the N-API addon), auto = cuda when available.'),
  http_port: z.number().int().min(-1).max(65535).default(0).describe('Serve the status page (/), /status (JSON) and Prometheus /metrics on this port, in every mode (0 = OS-assigned, printed at start and written to output_dir/status-url; -1 = off). Binds DQLORA_METRICS_HOST, else 127.0.0.1. `--http-port` overrides.'),
  report: z.array(z.enum(['tensorboard'])).default([]).describe('Extra reports in output_dir besides train_log.jsonl and loss.svg: tensorboard = event files under output_dir/tensorboard (tensorboard --logdir output_dir/tensorboard).'),
  data: z.object({
    train: z.string().min(1).describe('Training data: JSON or JSONL; records {instruction, input?, output, system?} (alpaca), {messages: [{role, content}]} (chat) or {text}.'),
    validation: z.string().min(1).optional().describe('Validation file (same formats). When absent, validation_split carves one out of the training data.'),
    validation_split: z.number().min(0).default(0).describe('Fraction (< 1) or number (≥ 1) of training records held out for validation when no validation file is given.'),
    dedup: z.boolean().default(true).describe('Drop exact duplicate records (same instruction, input, output, system / messages / text) before splitting.'),
    max_length: positiveInt.default(512).describe('Maximum tokens per example (prompt + answer); longer examples are truncated.'),
    on_error: z.enum(['throw', 'skip']).default('throw').describe('Malformed dataset lines: stop with file:line (throw) or skip them and report the count (skip).'),
    packing: z.boolean().default(false).describe('Sample packing: the examples of each micro-batch are packed several to a row (up to max_length tokens, first fit) instead of one per padded row. Attention never crosses an example (block-diagonal causal mask), positions restart per example, dropout masks are keyed per example: each example\'s loss and gradients are those it has unpacked, and the step\'s examples and loss normaliser do not change — only padding is saved (with NEFTune the noise scale follows the row length, as in the HF Trainer). Measured gain: 1.5–2.9× useful tokens/s on the cpu backend, 1.1–1.2× on cuda — whose attention masks but does not yet skip other examples\' keys, so large micro-batches of short examples can be slower packed (bench/RESULTS.md).'),
  }).strict(),
  // `quantization: none` is shorthand for {mode: none}; the parsed value is always the object.
  quantization: z.preprocess((v) => (typeof v === 'string' ? { mode: v } : v), z.object({
    mode: z.enum(['nf4', 'none']).default('nf4').describe("nf4: QLoRA, the decoder linears are NF4 (bitsandbytes layout). none: LoRA on the full-precision base (fp32 on cpu, bf16 on cuda), as PEFT without bitsandbytes; `quantization: none` is short for this. A pre-quantized checkpoint cannot be loaded with none."),
    blocksize: z.union([z.literal(32), z.literal(64), z.literal(128), z.literal(256), z.literal(512), z.literal(1024), z.literal(2048), z.literal(4096)]).default(64).describe('NF4 block size (elements per absmax).'),
    double_quant: z.boolean().default(true).describe('Quantize the per-block absmax again (8-bit, blocks of 256): 4.127 instead of 4.5 bits per parameter.'),
  }).strict()).prefault({}),
  lora: z.object({
    r: positiveInt.default(8).describe('LoRA rank.'),
    alpha: z.number().positive().default(16).describe('LoRA alpha; scale = alpha / r (alpha / sqrt(r) with use_rslora).'),
    dropout: z.number().min(0).lt(1).default(0.05).describe('Dropout on the LoRA branch input.'),
    target_modules: z.union([z.literal('all-linear'), z.array(z.string().min(1)).min(1)]).optional().describe("Modules to adapt: a list of names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; ChatGLM2: query_key_value, dense, dense_h_to_4h, dense_4h_to_h) or 'all-linear' (never the LM head). Default: PEFT's per-model default (q_proj, v_proj for Llama/Mistral/Qwen2; query_key_value for ChatGLM2)."),
    use_rslora: z.boolean().default(false).describe('Rank-stabilised LoRA scaling alpha / sqrt(r).'),
    rank_pattern: z.record(z.string(), positiveInt).default({}).describe('Per-module rank overrides, e.g. {"layers.0.self_attn.q_proj": 16}.'),
    alpha_pattern: z.record(z.string(), z.number().positive()).default({}).describe('Per-module alpha overrides.'),
    use_dora: z.boolean().default(false).describe('DoRA (Liu et al. 2024, PEFT use_dora): each adapted linear also learns a per-output magnitude (saved as lora_magnitude_vector, PEFT\'s key) and uses m · (W + s·B·A) / ‖W + s·B·A‖_row with the norm detached, as PEFT 0.21. Works on an NF4 base (norm of the dequantized weight) and with quantization: none. Not for ChatGLM2\'s packed modules.'),
    loraplus_lr_ratio: z.number().positive().optional().describe('LoRA+ (Hayou et al. 2024, PEFT create_loraplus_optimizer): lora_B (and 1-D tensors such as DoRA magnitudes) train with lr × this ratio, lora_A with lr. The paper suggests 16. Unset = plain LoRA.'),
  }).strict().prefault({}),
  training: z.object({
    epochs: z.number().positive().default(1).describe('Passes over the training data (ignored when max_steps is set).'),
    max_steps: positiveInt.optional().describe('Total optimizer steps; overrides epochs.'),
    micro_batch_size: positiveIntOrAuto.default(4).describe("Sequences per micro-batch (per replica). A micro-batch that does not fit in device memory is split in halves (the step runs again from scratch, with the gradient accumulation doubled: the same examples, loss normaliser and result; with distributed workers the stages are re-assigned and the run goes on from the last checkpoint) and the smaller size is kept for the rest of the run; a warning, summary.json's microBatch and the dqlora_micro_batch_* metrics say so. 'auto': before training, try the largest size that could fit — training.batch_size, then halving through its divisors — with a real forward + backward on sequences of the longest training example (max_length with packing) and take the first that fits; the gradient accumulation becomes batch_size / that size. Needs training.batch_size; one process only. On the cpu backend auto probes only under a DQLORA_MEM_LIMIT_BYTES budget; without one it takes batch_size (host memory is not probed)."),
    batch_size: positiveInt.optional().describe("With micro_batch_size: auto only: sequences per optimizer step (per replica), which auto cuts into micro-batches that fit. With a number for micro_batch_size the step's batch is micro_batch_size × grad_accum instead."),
    grad_accum: positiveInt.default(1).describe('Micro-batches per optimizer step (per replica). The loss is normalised by the label tokens of the whole step. Not with micro_batch_size: auto (which sets it).'),
    lr: z.number().positive().default(2e-4).describe('Peak learning rate.'),
    schedule: z.enum(['linear', 'cosine', 'constant', 'constant_with_warmup']).default('linear').describe('Learning-rate schedule (as in Hugging Face Trainer; constant ignores warmup).'),
    warmup_steps: z.number().min(0).default(0).describe('Warmup optimizer steps; a value < 1 is a fraction of the total steps.'),
    weight_decay: z.number().min(0).default(0).describe('AdamW decoupled weight decay.'),
    adam_beta1: z.number().min(0).lt(1).default(0.9).describe('AdamW beta1.'),
    adam_beta2: z.number().min(0).lt(1).default(0.999).describe('AdamW beta2.'),
    adam_eps: z.number().positive().default(1e-8).describe('AdamW epsilon.'),
    max_grad_norm: z.number().min(0).default(1).describe('Clip the global gradient L2 norm to this (0 disables).'),
    seed: z.number().int().min(0).default(42).describe('Seed for LoRA init, shuffling, dropout and the validation split: same seed, same adapter.'),
    neftune_noise_alpha: z.number().min(0).default(0).describe('NEFTune (as the Hugging Face Trainer\'s neftune_noise_alpha): in training, uniform noise in ±alpha/sqrt(T·H) is added to the embedding output (T = the micro-batch\'s padded length, H = hidden size), drawn from the counter RNG keyed by (seed, step, sample, position) so runs stay reproducible. The paper uses 5; 0 = off.'),
    gradient_checkpointing: z.boolean().default(true).describe('Recompute each layer forward in backward (saves activation memory).'),
    log_every: positiveInt.default(1).describe('Log a line every N optimizer steps.'),
    eval_every: z.number().int().min(0).default(0).describe('Evaluate the validation loss every N optimizer steps (0: only at the end).'),
    save_every: z.number().int().min(0).default(0).describe('Write a checkpoint every N optimizer steps (0: only at the end).'),
    keep_checkpoints: positiveInt.default(2).describe('How many recent checkpoints to keep.'),
    resume: z.union([z.boolean(), z.string()]).default(true).describe('Resume from the newest valid checkpoint in output_dir (true), from a given checkpoint directory, or start fresh (false).'),
  }).strict().prefault({}),
  compare: z.object({
    prompts: z.array(z.string()).default([]).describe('Prompts (instructions) answered by the base and the fine-tuned model after training.'),
    max_new_tokens: positiveInt.default(64).describe('Tokens generated per answer.'),
  }).strict().prefault({}),
  distributed: z.object({
    stages: z.union([positiveInt, z.literal('auto')]).default(1).describe("Pipeline stages (layers split across workers, balanced by bytes). 'auto' = 1 (one stage per replica; the planner still refuses a stage that does not fit a worker's reported free memory)."),
    replicas: z.union([positiveInt, z.literal('auto')]).default(1).describe("Data-parallel replicas per stage. 'auto' = workers / stages when workers is a number, else 1."),
    workers: z.union([z.number().int().min(0), z.literal('local')]).default(0).describe("0: train in this process; 'local': start stages × replicas worker processes on this machine; N: wait for N remote workers."),
    listen: z.string().regex(/^[^\s]+:\d+$/, 'expected HOST:PORT').default('127.0.0.1:0').describe('Distributed: address of the coordinator\'s gRPC control service (port 0 = OS-assigned, printed at start). Use 0.0.0.0:PORT for remote workers.'),
    nats_url: z.string().default('').describe("Distributed, replicas > 1: NATS server for the gradient all-reduce. Empty with workers: 'local' = start a private nats-server (must be on PATH)."),
    heartbeat_timeout_s: z.number().positive().default(10).describe('Distributed: a worker silent this long (no heartbeat) is declared lost; heartbeats go every timeout/5.'),
    step_timeout_s: z.number().positive().default(300).describe('Distributed: deadline for one command (a step, an update, a state upload) and for waiting on another stage\'s tensors.'),
    wait_timeout_s: z.number().positive().default(600).describe('Distributed: how long to wait for enough workers to (re)start, before failing the job.'),
    max_recoveries: z.number().int().min(0).default(3).describe('Distributed: worker failures the job recovers from within any 10 minutes (pause, wait with a growing back-off of 1 s … 30 s, wait for a replacement, resume from the last valid checkpoint) before giving up.'),
    outage_window_s: z.number().min(0).default(120).describe('Distributed: a connection outage (NATS or a peer refusing or resetting connections) shorter than this is ridden out: the job pauses and resumes with back-off without counting it against max_recoveries.'),
    metrics_port: z.number().int().min(-1).default(-1).describe('Distributed: serve the coordinator\'s Prometheus /metrics on this port (0 = OS-assigned, -1 = off).'),
  }).strict().prefault({}),
}).strict();

export type JobConfig = z.infer<typeof JobSchema>;

function formatIssues(err: z.ZodError, source: string): string {
  return err.issues.map((i) => `  ${source}: ${i.path.length ? i.path.join('.') : '(top level)'}: ${i.message}`).join('\n');
}

/** Validates a parsed job object; relative paths are resolved against `baseDir`. */
export function parseJob(obj: unknown, source: string, baseDir: string): JobConfig {
  const r = JobSchema.safeParse(obj ?? {});
  if (!r.success) throw new ConfigError(`invalid job config:\n${formatIssues(r.error, source)}`, { hint: 'see the configuration reference in README.md' });
  const job = r.data;
  const abs = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
  job.model = abs(job.model);
  job.output_dir = abs(job.output_dir);
  job.data.train = abs(job.data.train);
  if (job.data.validation) job.data.validation = abs(job.data.validation);
  if (typeof job.training.resume === 'string') job.training.resume = abs(job.training.resume);
  checkMicroBatchSettings(job, source);
  return job;
}

export function loadJob(path: string): JobConfig {
  if (!existsSync(path)) throw new ConfigError(`job config ${path} not found`);
  let obj: unknown;
  try {
    obj = parseYaml(readFileSync(path, 'utf8'), { prettyErrors: true, uniqueKeys: true });
  } catch (e) {
    const where = e instanceof YAMLParseError && e.linePos ? `${path}:${e.linePos[0].line}:${e.linePos[0].col}` : path;
    throw new ConfigError(`${where}: not valid YAML: ${(e as Error).message.split('\n')[0]}`);
  }
  return parseJob(obj, path, dirname(resolve(path)));
}

/** training.micro_batch_size: auto, training.batch_size and grad_accum: which go together (errors name the fields). */
function checkMicroBatchSettings(job: JobConfig, source: string): void {
  const t = job.training;
  if (t.micro_batch_size === 'auto') {
    if (t.batch_size === undefined) {
      throw new ConfigError(`${source}: training.micro_batch_size: auto needs training.batch_size (the sequences per optimizer step, per replica, that auto cuts into micro-batches that fit)`, { hint: 'e.g. training: { micro_batch_size: auto, batch_size: 16 }, or give micro_batch_size a number' });
    }
    if (t.grad_accum !== 1) {
      throw new ConfigError(`${source}: training.grad_accum: ${t.grad_accum} cannot be combined with training.micro_batch_size: auto (auto sets the gradient accumulation to batch_size / the micro-batch size it picks)`, { hint: `drop grad_accum; batch_size: ${t.batch_size * t.grad_accum} keeps ${t.batch_size} × ${t.grad_accum} sequences per step` });
    }
    if (job.distributed.workers !== 0) {
      throw new ConfigError(`${source}: training.micro_batch_size: auto is not supported with distributed.workers: ${JSON.stringify(job.distributed.workers)} yet (the probe runs in one process; workers get a fixed micro-batch size)`, { hint: 'give micro_batch_size a number for a distributed run (a worker that runs out of memory names itself and the size), or train in one process (distributed.workers: 0)' });
    }
  } else if (t.batch_size !== undefined) {
    throw new ConfigError(`${source}: training.batch_size is only read with training.micro_batch_size: auto (with micro_batch_size: ${t.micro_batch_size} the step's batch is micro_batch_size × grad_accum = ${t.micro_batch_size * t.grad_accum})`, { hint: `drop batch_size, or set micro_batch_size: auto to let the size that fits be found` });
  }
}

/**
 * The step's shape as the planner takes it: micro-batch size and gradient accumulation per replica. With
 * `micro_batch_size: auto` that is one micro-batch of batch_size until the probe has picked the size (the planner is
 * then re-planned with StepPlanner.withMicroBatchSize, which keeps every step's samples).
 */
export function microBatchPlan(job: JobConfig): { microBatchSize: number; gradAccum: number; auto: boolean } {
  const t = job.training;
  if (t.micro_batch_size === 'auto') return { microBatchSize: t.batch_size!, gradAccum: 1, auto: true };
  return { microBatchSize: t.micro_batch_size, gradAccum: t.grad_accum, auto: false };
}

/** Markdown table of every field (path, default, description) — the README's configuration reference. */
export function configReference(): string {
  const lines = ['| field | default | description |', '|---|---|---|'];
  const walk = (schema: z.ZodType, path: string): void => {
    let s: z.ZodType = schema;
    let dflt: unknown;
    for (;;) {
      if (s instanceof z.ZodDefault || s instanceof z.ZodPrefault) { dflt = (s.def as { defaultValue: unknown }).defaultValue; s = s.unwrap() as z.ZodType; continue; }
      if (s instanceof z.ZodOptional) { s = s.unwrap() as z.ZodType; continue; }
      if (s instanceof z.ZodPipe) { s = s.def.out as unknown as z.ZodType; continue; }
      break;
    }
    if (s instanceof z.ZodObject) {
      for (const [k, v] of Object.entries(s.shape)) walk(v as z.ZodType, path ? `${path}.${k}` : k);
      return;
    }
    const desc = schema.description ?? s.description ?? '';
    const d = dflt === undefined ? (schema instanceof z.ZodOptional ? '—' : '**required**') : `\`${JSON.stringify(dflt)}\``;
    lines.push(`| \`${path}\` | ${d} | ${desc} |`);
  };
  walk(JobSchema, '');
  return lines.join('\n');
}

/** The job's LoRA settings as the engine takes them (PEFT's per-model default target modules filled in). */
export function loraConfigOf(job: JobConfig, cfg: ModelConfig): LoraConfig {
  return {
    r: job.lora.r, alpha: job.lora.alpha, dropout: job.lora.dropout, useRslora: job.lora.use_rslora,
    targetModules: job.lora.target_modules ?? defaultTargetModules(cfg.modelType),
    rankPattern: job.lora.rank_pattern, alphaPattern: job.lora.alpha_pattern, useDora: job.lora.use_dora,
  };
}

/** Stages × replicas of a job, with 'auto' resolved (see the distributed.* descriptions). */
export function jobLayout(job: JobConfig): { stages: number; replicas: number } {
  const d = job.distributed;
  const stages = d.stages === 'auto' ? 1 : d.stages;
  const replicas = d.replicas === 'auto' ? (typeof d.workers === 'number' ? Math.max(1, Math.floor(d.workers / stages)) : 1) : d.replicas;
  return { stages, replicas };
}
