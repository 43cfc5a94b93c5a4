// The training features of issue 13 (quantization: none, sample packing, NEFTune, LoRA+, DoRA, micro_batch_size: auto) as
// the job loop sees them: the options they turn into for the stage loader, the micro-batches and auto's probe (which
// combinations a job may ask for is checked when the job is parsed: checkFeatureCombinations and
// checkMicroBatchSettings in job.ts).
// The job loop (one process or distributed) calls these instead of reading the fields itself, so a feature's wiring
// is one place.
import type { JobConfig } from './job.ts';
import type { LoadOptions } from '../core/model/loader.ts';
import type { Example, PackingOptions } from '../core/train/batch.ts';

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
 * The sequence length `micro_batch_size: auto` probes with: the longest training example (a micro-batch is padded
 * to its longest), or data.max_length with packing (a packed row holds up to max_length tokens).
 */
export function probeLength(job: JobConfig, train: readonly Example[]): number {
  if (job.data.packing) return job.data.max_length;
  let T = 1;
  for (const e of train) T = Math.max(T, e.inputIds.length);
  return T;
}
