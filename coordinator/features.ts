// The training features of issue 13 (quantization: none, sample packing, NEFTune, LoRA+, DoRA, micro_batch_size: auto) as
// the job loop sees them: the options they turn into for the stage loader, the micro-batches and auto's probe length.
// The job loop (one process or distributed) calls these instead of reading the fields itself, so a feature's wiring
// is one place: in one process stageLoadOptions goes to the loader; with workers stageSettings goes into every
// stage's assignment, and the worker's loader gets the same options back from it (wire/assignment.ts
// stageLoadOptionsOf). Packed micro-batches travel with their per-token layout (wire/assignment.ts microBatchToWire).
// A job using any feature takes only workers that report they carry them out (requiredWorkerCapabilities), and the
// stage planner sizes a quantization: none stage at full precision (linearBytesPerParam).
import type { JobConfig } from './job.ts';
import type { LoadOptions } from '../core/model/loader.ts';
import type { Example, PackingOptions } from '../core/train/batch.ts';
import { NF4_BYTES_PER_PARAM } from '../core/train/plan.ts';
import type { LoraConfig } from '../common/peft.ts';
import { STAGE_FEATURES_CAPABILITY, type StageLoraSettings, type StageTrainSettings } from '../wire/assignment.ts';

/** What the stage loader needs from the job (the loop adds lora, seed, progress). */
export function stageLoadOptions(job: JobConfig): Pick<LoadOptions, 'blocksize' | 'doubleQuant' | 'quantization' | 'gradientCheckpointing' | 'neftuneAlpha' | 'loraplusLrRatio' | 'useDora'> {
  return {
    blocksize: job.quantization.blocksize,
    doubleQuant: job.quantization.double_quant,
    quantization: job.quantization.mode,
    gradientCheckpointing: job.training.gradient_checkpointing,
    neftuneAlpha: job.training.neftune_noise_alpha,
    loraplusLrRatio: job.lora.loraplus_lr_ratio,
    useDora: job.lora.use_dora,
  };
}

/** Sample packing for makeMicroBatch (undefined = one example per row). */
export function packingOptions(job: JobConfig): PackingOptions | undefined {
  return job.data.packing ? { maxLength: job.data.max_length } : undefined;
}

/**
 * The LoRA and training settings every worker's stage is assigned (`lora`: loraConfigOf(job, cfg)): what the
 * one-process run gives its loader and optimizer, plus the worker's timeouts.
 */
export function stageSettings(job: JobConfig, lora: LoraConfig, o: { stepTimeoutMs: number; chunkBytes: number }): { lora: StageLoraSettings; train: StageTrainSettings } {
  const t = job.training, load = stageLoadOptions(job);
  return {
    lora: { ...lora, useDora: load.useDora, ...(load.loraplusLrRatio !== undefined ? { loraplusLrRatio: load.loraplusLrRatio } : {}) },
    train: {
      seed: t.seed, beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weightDecay: t.weight_decay,
      quantization: load.quantization!, blocksize: load.blocksize!, doubleQuant: load.doubleQuant!, gradientCheckpointing: load.gradientCheckpointing!,
      neftuneAlpha: load.neftuneAlpha ?? 0, stepTimeoutMs: o.stepTimeoutMs, chunkBytes: o.chunkBytes,
    },
  };
}

/**
 * Device bytes per decoder-linear weight, for the stage planner's balance and its free-memory check: NF4, or with
 * quantization: none the full-precision base — float32 with backend: cpu, else bfloat16 (cuda; 'auto' is taken as
 * cuda, so cpu workers under 'auto' hold twice this). From the job alone, so that the one-process run and the
 * workers plan the same stage boundaries.
 */
export function linearBytesPerParam(job: JobConfig): number {
  if (job.quantization.mode === 'nf4') return NF4_BYTES_PER_PARAM;
  return job.backend === 'cpu' ? 4 : 2;
}

/** The issue-13 features a job turns on, as job.yaml spells them (empty: plain QLoRA). */
export function featuresUsed(job: JobConfig): string[] {
  const used: string[] = [];
  if (job.quantization.mode === 'none') used.push('quantization: none');
  if (job.data.packing) used.push('data.packing: true');
  if (job.training.neftune_noise_alpha > 0) used.push(`training.neftune_noise_alpha: ${job.training.neftune_noise_alpha}`);
  if (job.lora.loraplus_lr_ratio !== undefined) used.push(`lora.loraplus_lr_ratio: ${job.lora.loraplus_lr_ratio}`);
  if (job.lora.use_dora) used.push('lora.use_dora: true');
  return used;
}

/**
 * What a worker must report to train this job: with any of the features, the capability of a worker whose stage
 * carries them out (older workers would ignore them and train plain QLoRA); plain jobs take any worker.
 */
export function requiredWorkerCapabilities(job: JobConfig): { capability: string; why: string }[] {
  const used = featuresUsed(job);
  return used.length ? [{ capability: STAGE_FEATURES_CAPABILITY, why: used.join(', ') }] : [];
}

/**
 * The sequence length `micro_batch_size: auto` probes with: the longest training example (a micro-batch is padded
 * to its longest), or data.max_length with packing (a packed row holds up to max_length tokens).
 */
export function probeLength(job: JobConfig, train: readonly Example[]): number {
  if (job.data.packing) return job.data.max_length;
  let T = 1;
  for (const e of train) T = Math.max(T, e.inputIds.length);
  return T;
}
