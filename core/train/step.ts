// The math of one optimizer step, written once. The in-process executor (core/train/local.ts) and the worker's
// stage runner (worker/runtime/stage-runner.ts) both call these functions, so a one-process run and a distributed
// run agree by construction (qlora-spec §8–§9):
//
//   micro-batches of the step (all replicas) → loss scale 1 / (label tokens of the whole step)
//   → forward/backward with dropout keyed by (seed, step, sample, layer) → Σ over replicas of the LoRA gradients
//   → global norm ‖g‖ → clip coefficient min(1, max / (‖g‖ + 1e-6)) → scale, AdamW (update number step + 1), zero.
import type { AdamWHyper, Backend } from '../engine/backend.ts';
import type { LoraParams } from '../engine/lora.ts';
import { mixKey } from '../../common/rng.ts';
import { CheckpointError } from '../../common/errors.ts';
import type { LoraTensors } from '../../common/peft.ts';
import type { OptimizerMoments, TrainerState } from '../../common/checkpoint.ts';

/** The step's two key words of the dropout masks (engine DropoutKey.k0 / k1). */
export interface StepDropoutKey { readonly k0: number; readonly k1: number }

/** Stream id of the dropout masks in the counter RNG ("DROP"). */
const DROPOUT_STREAM = 0x44524f50;

/** Dropout key of optimizer step `step` (0-based); the layer, sample and position select the mask within it. */
export function dropoutKey(seed: number, step: number): StepDropoutKey {
  return { k0: mixKey(seed, DROPOUT_STREAM), k1: mixKey(step) };
}

/**
 * The factor every token's loss gradient is multiplied by: the loss of a step is the mean over the label tokens
 * of ALL its micro-batches on all replicas (gradient accumulation = one big batch). 0 for a step without labels.
 */
export function lossScale(labelTokens: number): number {
  return labelTokens > 0 ? 1 / labelTokens : 0;
}

/** torch.nn.utils.clip_grad_norm_: coef = max / (‖g‖ + 1e-6), clamped to 1; maxNorm ≤ 0 disables clipping. */
export function clipCoefficient(gradNorm: number, maxNorm: number): number {
  return maxNorm > 0 ? Math.min(1, maxNorm / (gradNorm + 1e-6)) : 1;
}

/** Σ of the squared LoRA gradients of `params` (one stage's share of ‖g‖²). */
export function gradNormSq(be: Backend, params: readonly LoraParams[]): number {
  let sq = 0;
  for (const p of params) for (const t of p.trainable()) sq += be.sumSquares(t.grad);   // A, B (+ DoRA magnitude)
  return sq;
}

/** AdamW settings that stay fixed for a run (torch.optim.AdamW semantics, decoupled weight decay). */
export interface OptimizerSettings {
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
}

/**
 * The end of a step on a set of LoRA params: scale the gradients by `clipCoef` (when < 1), AdamW with `lr`
 * (B's lr × `p.lrScaleB` when LoRA+ sets it) as update number `step + 1`, then clear the gradients.
 */
export function applyUpdate(be: Backend, params: readonly LoraParams[], u: { step: number; lr: number; clipCoef: number }, opt: OptimizerSettings): void {
  if (u.clipCoef < 1) for (const p of params) for (const t of p.trainable()) be.scale(t.grad, u.clipCoef);
  const h: AdamWHyper = { lr: u.lr, beta1: opt.beta1, beta2: opt.beta2, eps: opt.eps, weightDecay: opt.weightDecay, step: u.step + 1 };
  for (const p of params) {
    // A at lr; B (and a DoRA magnitude) at lr × lrScaleB (LoRA+; 1 without it)
    for (const t of p.trainable()) be.adamw(t.param, t.grad, t.m, t.v, t.lrScale === 1 ? h : { ...h, lr: u.lr * t.lrScale });
    p.zeroGrad();
  }
}

/**
 * Overwrites `params` with a checkpoint's adapter weights and AdamW moments (matched by module path). Every param
 * must be present with the job's rank; extra modules in the checkpoint (another stage's) are ignored.
 */
export function restoreLoraParams(params: readonly LoraParams[], ck: { dir: string; modules: readonly LoraTensors[]; moments: readonly OptimizerMoments[] }): void {
  const byPath = new Map(ck.modules.map((m) => [m.path, m]));
  const momentsByPath = new Map(ck.moments.map((m) => [m.path, m]));
  for (const p of params) {
    const m = byPath.get(p.name), mo = momentsByPath.get(p.name);
    if (!m || !mo) throw new CheckpointError(`checkpoint ${ck.dir} has no state for '${p.name}'`, { hint: 'was it written by a job with other LoRA target modules?' });
    if (m.r !== p.hyper.r) throw new CheckpointError(`checkpoint ${ck.dir}: '${p.name}' has rank ${m.r}, the job says ${p.hyper.r}`);
    // A DoRA module resumed without its magnitude (or the magnitude's moments) would silently restart them.
    if (p.magnitude && !(m.magnitude && mo.mMag && mo.vMag)) throw new CheckpointError(`checkpoint ${ck.dir} has no DoRA magnitude (or no magnitude moments) for '${p.name}'`, { hint: 'was it written by a job without lora.use_dora?' });
    p.setHostState({ A: m.A, B: m.B, mA: mo.mA, vA: mo.vA, mB: mo.mB, vB: mo.vB, magnitude: m.magnitude, mMag: mo.mMag, vMag: mo.vMag });
  }
}

/** Refuses a checkpoint written by another job configuration or for other data (the fingerprints differ). */
export function checkFingerprints(dir: string, ck: Pick<TrainerState, 'configHash' | 'dataHash'>, run: Pick<TrainerState, 'configHash' | 'dataHash'>): void {
  if (ck.configHash !== run.configHash) throw new CheckpointError(`checkpoint ${dir} was written by a job with other training settings`, { hint: 'start a fresh run (training.resume: false or another output_dir), or restore the original job.yaml' });
  if (ck.dataHash !== run.dataHash) throw new CheckpointError(`checkpoint ${dir} was written for other training data`, { hint: 'the dataset changed since the checkpoint; start a fresh run' });
}
