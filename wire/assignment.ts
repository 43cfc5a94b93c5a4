// Stage assignments and micro-batches between the coordinator and a worker: domain types ⇄ proto, converted and
// validated at this one edge. The coordinator builds an Assignment and sends assignmentToWire(it); the worker turns
// what arrives back into an Assignment with assignmentFromWire, which refuses anything out of range.
import type { StageSpec } from '../core/model/llama.ts';
import type { MicroBatch } from '../core/train/batch.ts';
import type { LoadOptions } from '../core/model/loader.ts';
import type { LoraConfig } from '../common/peft.ts';
import { ConfigError, WireError } from '../common/errors.ts';
import { decodeTensorAs, i32ToTensor, u8ToTensor } from './tensor.ts';
import { QuantizationMode, type AssignStage, type MicroBatch as WireMicroBatch } from '../proto/gen/dqlora/v1/control.ts';

/** A stage's LoRA settings: PEFT's (use_dora included) plus LoRA+'s learning-rate ratio, an optimizer setting. */
export interface StageLoraSettings extends LoraConfig {
  /** LoRA+: lora_B and DoRA magnitudes train with lr × this (core/train/step.ts applyUpdate); undefined = plain LoRA. */
  readonly loraplusLrRatio?: number;
}

/** Training settings a stage keeps for the whole assignment. */
export interface StageTrainSettings {
  readonly seed: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** How the decoder linears are loaded: NF4 (QLoRA) or full precision. */
  readonly quantization: 'nf4' | 'none';
  readonly blocksize: number;
  readonly doubleQuant: boolean;
  readonly gradientCheckpointing: boolean;
  /** NEFTune noise alpha (0 = off); only the stage holding the embedding uses it. */
  readonly neftuneAlpha: number;
  /** How long a stage waits for a neighbour's tensor, and for the all-reduce, before failing the step. */
  readonly stepTimeoutMs: number;
  /** Pipeline chunk limit (bytes per gRPC message). */
  readonly chunkBytes: number;
}

export interface Assignment {
  /** The job id; the pipeline / NATS namespace of this generation is `${jobId}-g${generation}`. */
  readonly jobId: string;
  readonly generation: number;
  readonly stage: number;
  readonly numStages: number;
  readonly replica: number;
  readonly numReplicas: number;
  readonly spec: StageSpec;
  readonly modelDir: string;
  readonly lora: StageLoraSettings;
  readonly train: StageTrainSettings;
  readonly natsUrl: string;
  readonly prev: string;
  readonly next: string;
  readonly resumeFrom: string;
  readonly firstSeq: number;
}

/**
 * The capability a worker reports at registration when it carries out every field of this assignment and micro-batch
 * format: quantization mode, NEFTune, DoRA, LoRA+, packed micro-batches. A worker of an older version would silently
 * ignore those fields (protobuf drops unknown ones) and train something else, so a job using any of them refuses a
 * worker without it (coordinator/distributed/control.ts).
 */
export const STAGE_FEATURES_CAPABILITY = 'stage-features:1';

/** The namespace of an assignment's pipeline tensors and all-reduce subjects. */
export function generationId(a: Pick<Assignment, 'jobId' | 'generation'>): string { return `${a.jobId}-g${a.generation}`; }

/**
 * What the worker's loader gets from its assignment: the same options the one-process run takes from the job
 * (coordinator/features.ts stageLoadOptions), so a stage loads the same way in either.
 */
export function stageLoadOptionsOf(a: Pick<Assignment, 'lora' | 'train'>): LoadOptions {
  const { loraplusLrRatio, ...lora } = a.lora, t = a.train;
  return {
    lora, seed: t.seed, quantization: t.quantization, blocksize: t.blocksize, doubleQuant: t.doubleQuant, gradientCheckpointing: t.gradientCheckpointing,
    neftuneAlpha: t.neftuneAlpha, useDora: lora.useDora === true, loraplusLrRatio,
  };
}

const QUANT_TO_WIRE = { nf4: QuantizationMode.QUANTIZATION_MODE_NF4, none: QuantizationMode.QUANTIZATION_MODE_NONE } as const;

export function assignmentToWire(a: Assignment): AssignStage {
  const t = a.train, l = a.lora;
  return {
    jobId: a.jobId, generation: a.generation, stageIndex: a.stage, numStages: a.numStages, replicaIndex: a.replica, numReplicas: a.numReplicas,
    firstLayer: a.spec.firstLayer, lastLayer: a.spec.lastLayer - 1, hasEmbedding: a.spec.hasEmbedding, hasHead: a.spec.hasHead,
    modelDir: a.modelDir, natsUrl: a.natsUrl, prevStageAddress: a.prev, nextStageAddress: a.next, resumeFromDir: a.resumeFrom, firstSeq: a.firstSeq,
    lora: {
      r: l.r, alpha: l.alpha, dropout: l.dropout, useRslora: l.useRslora, allLinear: l.targetModules === 'all-linear',
      targetModules: l.targetModules === 'all-linear' ? [] : [...l.targetModules], rankPattern: { ...l.rankPattern }, alphaPattern: { ...l.alphaPattern },
      useDora: l.useDora === true, ...(l.loraplusLrRatio !== undefined ? { loraplusLrRatio: l.loraplusLrRatio } : {}),
    },
    train: {
      seed: t.seed, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weightDecay: t.weightDecay, quantization: QUANT_TO_WIRE[t.quantization], blocksize: t.blocksize, doubleQuant: t.doubleQuant,
      gradientCheckpointing: t.gradientCheckpointing, stepTimeoutMs: t.stepTimeoutMs, chunkBytes: t.chunkBytes, neftuneNoiseAlpha: t.neftuneAlpha,
    },
  };
}

function check(ok: boolean, what: string): void {
  if (!ok) throw new ConfigError(`AssignStage: ${what}`, { hint: 'coordinator and worker versions differ?' });
}

const finite = (x: number): boolean => Number.isFinite(x);

/** Validates an AssignStage and returns it as an Assignment (`natsOverride`: the worker's --nats). */
export function assignmentFromWire(a: AssignStage, natsOverride?: string): Assignment {
  check(a.lastLayer >= a.firstLayer, `layers ${a.firstLayer}..${a.lastLayer} are empty`);
  check(a.numStages >= 1 && a.stageIndex < a.numStages, `stage ${a.stageIndex} of ${a.numStages}`);
  check(a.numReplicas >= 1 && a.replicaIndex < a.numReplicas, `replica ${a.replicaIndex} of ${a.numReplicas}`);
  check(!!a.modelDir, 'no model directory');
  const l = a.lora, t = a.train;
  check(!!l, 'no LoRA settings');
  check(!!t, 'no training settings');
  check(Number.isInteger(l!.r) && l!.r >= 1, `lora.r = ${l!.r}`);
  check(finite(l!.alpha) && l!.alpha > 0, `lora.alpha = ${l!.alpha}`);
  check(finite(l!.dropout) && l!.dropout >= 0 && l!.dropout < 1, `lora.dropout = ${l!.dropout}`);
  check(l!.allLinear !== l!.targetModules.length > 0, 'lora: exactly one of all_linear and target_modules');
  for (const [k, v] of Object.entries(l!.rankPattern)) check(Number.isInteger(v) && v >= 1, `lora.rank_pattern.${k} = ${v}`);
  for (const [k, v] of Object.entries(l!.alphaPattern)) check(finite(v) && v > 0, `lora.alpha_pattern.${k} = ${v}`);
  check(l!.loraplusLrRatio === undefined || (finite(l!.loraplusLrRatio) && l!.loraplusLrRatio > 0), `lora.loraplus_lr_ratio = ${l!.loraplusLrRatio}`);
  const quantization = t!.quantization === QuantizationMode.QUANTIZATION_MODE_NF4 ? 'nf4' : t!.quantization === QuantizationMode.QUANTIZATION_MODE_NONE ? 'none' : undefined;
  check(quantization !== undefined, `train.quantization = ${t!.quantization} (expected NF4 or NONE)`);
  check(finite(t!.neftuneNoiseAlpha) && t!.neftuneNoiseAlpha >= 0, `train.neftune_noise_alpha = ${t!.neftuneNoiseAlpha}`);
  check(Number.isInteger(t!.seed) && t!.seed >= 0, `train.seed = ${t!.seed}`);
  for (const k of ['beta1', 'beta2', 'eps'] as const) check(finite(t![k]), `train.${k} = ${t![k]}`);
  check(finite(t!.weightDecay) && t!.weightDecay >= 0, `train.weight_decay = ${t!.weightDecay}`);
  check(t!.blocksize > 0, `train.blocksize = ${t!.blocksize}`);
  check(t!.stepTimeoutMs > 0 && t!.chunkBytes > 0, 'train.step_timeout_ms and chunk_bytes must be positive');
  return {
    jobId: a.jobId, generation: a.generation, stage: a.stageIndex, numStages: a.numStages, replica: a.replicaIndex, numReplicas: a.numReplicas,
    spec: { firstLayer: a.firstLayer, lastLayer: a.lastLayer + 1, hasEmbedding: a.hasEmbedding, hasHead: a.hasHead },
    modelDir: a.modelDir,
    lora: {
      r: l!.r, alpha: l!.alpha, dropout: l!.dropout, useRslora: l!.useRslora, targetModules: l!.allLinear ? 'all-linear' : l!.targetModules, rankPattern: l!.rankPattern, alphaPattern: l!.alphaPattern,
      useDora: l!.useDora, ...(l!.loraplusLrRatio !== undefined ? { loraplusLrRatio: l!.loraplusLrRatio } : {}),
    },
    train: {
      seed: t!.seed, beta1: t!.beta1, beta2: t!.beta2, eps: t!.eps, weightDecay: t!.weightDecay, quantization: quantization!, blocksize: t!.blocksize, doubleQuant: t!.doubleQuant,
      gradientCheckpointing: t!.gradientCheckpointing, stepTimeoutMs: t!.stepTimeoutMs, chunkBytes: t!.chunkBytes, neftuneAlpha: t!.neftuneNoiseAlpha,
    },
    natsUrl: natsOverride || a.natsUrl, prev: a.prevStageAddress, next: a.nextStageAddress, resumeFrom: a.resumeFromDir, firstSeq: a.firstSeq,
  };
}

/**
 * One micro-batch for a stage: input ids only to the first stage, targets only to the last. A packed micro-batch's
 * per-token layout (segments, token sample ids) goes to every stage: each one's attention and dropout need it.
 */
export function microBatchToWire(mb: MicroBatch, index: number, stage: { first: boolean; last: boolean }): WireMicroBatch {
  const packed = mb.segments !== undefined || mb.tokenSampleIds !== undefined;
  if (packed && !(mb.segments && mb.tokenSampleIds)) throw new WireError(`micro-batch ${index}: a packed micro-batch needs both segments and token sample ids`);
  return {
    index,
    inputIds: stage.first ? i32ToTensor(mb.ids, [mb.B, mb.T]) : undefined,
    targets: stage.last ? i32ToTensor(mb.targets, [mb.B, mb.T]) : undefined,
    keyMask: u8ToTensor(Uint8Array.from(mb.keyMask), [mb.B, mb.T]),
    positions: i32ToTensor(mb.positions, [mb.B, mb.T]),
    sampleIds: i32ToTensor(mb.sampleIds, [mb.B]),
    segments: packed ? i32ToTensor(mb.segments!, [mb.B, mb.T]) : undefined,
    tokenSampleIds: packed ? i32ToTensor(mb.tokenSampleIds!, [mb.B, mb.T]) : undefined,
  };
}

/** A micro-batch's host inputs as a stage receives them (only the fields this stage needs are required). */
export type StageMicroBatch = Pick<MicroBatch, 'B' | 'T' | 'keyMask' | 'positions' | 'sampleIds' | 'segments' | 'tokenSampleIds'> & { ids?: Int32Array; targets?: Int32Array };

/** Host inputs of one micro-batch from the wire (only the fields this stage needs are required). */
export function microBatchFromWire(m: WireMicroBatch, spec: StageSpec, what: string): StageMicroBatch {
  const km = decodeTensorAs(m.keyMask, 'u8', [-1, -1], { what: `${what} key_mask` });
  const [B, T] = km.shape;
  if (B < 1 || T < 1) throw new WireError(`${what}: empty micro-batch [${B}, ${T}]`);
  const i32 = (t: typeof m.inputIds, name: string, shape: number[]): Int32Array => decodeTensorAs(t, 'i32', shape, { what: `${what} ${name}` }).data;
  if (!m.segments !== !m.tokenSampleIds) throw new WireError(`${what}: a packed micro-batch needs both segments and token_sample_ids`);
  const keyMask = Int32Array.from(km.data);
  let packed: Pick<MicroBatch, 'segments' | 'tokenSampleIds'> = {};
  if (m.segments) {
    const segments = i32(m.segments, 'segments', [B, T]), tokenSampleIds = i32(m.tokenSampleIds, 'token_sample_ids', [B, T]);
    // The attention kernels take the segments as the key mask: a real token must have a segment, padding none.
    for (let i = 0; i < B * T; i++) {
      if ((segments[i] > 0) !== (keyMask[i] !== 0) || segments[i] < 0) throw new WireError(`${what}: segments[${Math.floor(i / T)}, ${i % T}] = ${segments[i]} does not match key_mask ${keyMask[i]}`);
    }
    packed = { segments, tokenSampleIds };
  }
  return {
    B, T, keyMask, positions: i32(m.positions, 'positions', [B, T]), sampleIds: i32(m.sampleIds, 'sample_ids', [B]), ...packed,
    ids: spec.hasEmbedding ? i32(m.inputIds, 'input_ids', [B, T]) : undefined,
    targets: spec.hasHead ? i32(m.targets, 'targets', [B, T]) : undefined,
  };
}
