// The issue-13 features at the one wire edge between coordinator and worker (wire/assignment.ts, wire/state.ts):
// the worker's loader gets from its assignment exactly the options the one-process loader gets from the job; a
// packed micro-batch reaches every stage with its per-token layout; a DoRA stage's state carries its magnitudes and
// their AdamW moments both ways; the planner sizes a quantization: none stage at full precision; and what does not fit (an unset quantization mode, half a packed layout, a segment
// on padding, magnitudes for some modules only) is refused with a WireError / ConfigError that names it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { parseJob, loraConfigOf } from '../../coordinator/job.ts';
import { linearBytesPerParam, stageLoadOptions, stageSettings } from '../../coordinator/features.ts';
import { assignWorkers } from '../../coordinator/distributed/assign.ts';
import { planStages } from '../../core/train/plan.ts';
import { assignmentFromWire, assignmentToWire, microBatchFromWire, microBatchToWire, stageLoadOptionsOf, type Assignment } from '../../wire/assignment.ts';
import { decodeStageState, encodeStageState } from '../../wire/state.ts';
import { AssignStage, MicroBatch as WireMicroBatch, QuantizationMode, StageState } from '../../proto/gen/dqlora/v1/control.ts';
import { makeMicroBatch, type Example } from '../../core/train/batch.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadStage } from '../../core/model/loader.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { applyUpdate, restoreLoraParams } from '../../core/train/step.ts';
import { i32ToTensor } from '../../wire/tensor.ts';
import { CheckpointError, ConfigError, WireError } from '../../common/errors.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'golden-noquant', 'llama-f32', 'model');
const cfg = loadModelConfig(FIX);

const jobWith = (o: Record<string, unknown>): ReturnType<typeof parseJob> => parseJob({ model: FIX, output_dir: '/tmp/o', data: { train: 't' }, distributed: { workers: 'local', stages: 2 }, ...o }, 'job.yaml', '/tmp');

function assignment(job: ReturnType<typeof parseJob>): Assignment {
  return {
    jobId: 'j', generation: 1, stage: 0, numStages: 2, replica: 0, numReplicas: 2, spec: { firstLayer: 0, lastLayer: 1, hasEmbedding: true, hasHead: false },
    modelDir: FIX, natsUrl: 'nats://127.0.0.1:1', prev: '', next: '127.0.0.1:2', resumeFrom: '', firstSeq: 1,
    ...stageSettings(job, loraConfigOf(job, cfg), { stepTimeoutMs: 1000, chunkBytes: 1 << 20 }),
  };
}
/** Through protobuf bytes, as the Commands stream carries it. */
const viaBytes = (a: AssignStage): AssignStage => AssignStage.decode(AssignStage.encode(a).finish());

test('the worker loads its stage with the options the one-process run gives its loader, for every feature', () => {
  for (const o of [
    {},
    { quantization: 'none', lora: { use_dora: true, loraplus_lr_ratio: 16 }, training: { neftune_noise_alpha: 5, seed: 9 } },
    { quantization: { mode: 'nf4', blocksize: 128, double_quant: false }, lora: { use_dora: true }, training: { gradient_checkpointing: false } },
  ]) {
    const job = jobWith(o);
    const got = stageLoadOptionsOf(assignmentFromWire(viaBytes(assignmentToWire(assignment(job)))));
    const want = { ...stageLoadOptions(job), lora: loraConfigOf(job, cfg), seed: job.training.seed };
    assert.deepEqual({ ...got, lora: { ...got.lora } }, { ...want, lora: { ...want.lora } }, JSON.stringify(o));
  }
});

test('an assignment without a quantization mode, or with a bad LoRA+ ratio or NEFTune alpha, is refused', () => {
  const w = assignmentToWire(assignment(jobWith({})));
  const refuse = (a: AssignStage, re: RegExp): void => assert.throws(() => assignmentFromWire(viaBytes(a)), (e: Error) => e instanceof ConfigError && re.test(e.message) && /versions differ/.test((e as ConfigError).hint ?? ''));
  refuse({ ...w, train: { ...w.train!, quantization: QuantizationMode.QUANTIZATION_MODE_UNSPECIFIED } }, /train\.quantization = 0/);
  refuse({ ...w, lora: { ...w.lora!, loraplusLrRatio: 0 } }, /lora\.loraplus_lr_ratio = 0/);
  refuse({ ...w, train: { ...w.train!, neftuneNoiseAlpha: -1 } }, /train\.neftune_noise_alpha = -1/);
  // Unset LoRA+ stays unset (plain LoRA), not 0.
  assert.equal(assignmentFromWire(viaBytes(w)).lora.loraplusLrRatio, undefined);
});

test('quantization: none: the planner counts full-precision linears, so a worker with room for the NF4 stage only is refused', () => {
  const nf4 = planStages(cfg, 2, linearBytesPerParam(jobWith({ backend: 'cpu' })));
  const f32 = planStages(cfg, 2, linearBytesPerParam(jobWith({ backend: 'cpu', quantization: 'none' })));
  const bf16 = planStages(cfg, 2, linearBytesPerParam(jobWith({ backend: 'cuda', quantization: 'none' })));
  for (let s = 0; s < 2; s++) assert.ok(nf4.bytes[s] < bf16.bytes[s] && bf16.bytes[s] < f32.bytes[s], `stage ${s}: ${nf4.bytes[s]} < ${bf16.bytes[s]} < ${f32.bytes[s]}`);
  const workers = [0, 1].map((i) => ({ id: `w${i}`, freeMemoryBytes: Math.max(...nf4.bytes) }));
  assert.equal(assignWorkers(workers, nf4.bytes, 1).length, 1);
  assert.throws(() => assignWorkers(workers, f32.bytes, 1), (e: Error) => e instanceof ConfigError && /stage \d needs about/.test(e.message));
});

const ex = (ids: number[], sourceIndex: number): Example => ({ inputIds: Int32Array.from(ids), labels: Int32Array.from(ids), sourceIndex });

test('a packed micro-batch reaches every stage with its segments and token sample ids; an unpacked one without', () => {
  const mb = makeMicroBatch([ex([1, 2, 3, 4, 5], 0), ex([6, 7, 8], 1), ex([9, 10, 11, 12], 2)], { padId: 0, sampleIds: [40, 41, 42], packing: { maxLength: 8 } });
  assert.ok(mb.B < 3, 'several examples share a row');
  const specs = [{ firstLayer: 0, lastLayer: 1, hasEmbedding: true, hasHead: false }, { firstLayer: 1, lastLayer: 2, hasEmbedding: false, hasHead: false }, { firstLayer: 2, lastLayer: 3, hasEmbedding: false, hasHead: true }];
  specs.forEach((spec, s) => {
    const w = WireMicroBatch.decode(WireMicroBatch.encode(microBatchToWire(mb, 0, { first: s === 0, last: s === 2 })).finish());
    const b = microBatchFromWire(w, spec, `stage ${s}`);
    assert.deepEqual(b.segments, mb.segments, `stage ${s} segments`);
    assert.deepEqual(b.tokenSampleIds, mb.tokenSampleIds, `stage ${s} token sample ids`);
    assert.deepEqual(b.positions, mb.positions, `stage ${s} positions restart per example`);
  });
  const plain = microBatchFromWire(microBatchToWire(makeMicroBatch([ex([1, 2], 0)], { padId: 0 }), 0, { first: true, last: true }), specs[0], 'plain');
  assert.equal(plain.segments, undefined);
  assert.equal(plain.tokenSampleIds, undefined);

  const w = microBatchToWire(mb, 0, { first: true, last: false });
  const refuse = (m: WireMicroBatch, re: RegExp): void => assert.throws(() => microBatchFromWire(m, specs[0], 'seq 3 micro-batch 0'), (e: Error) => e instanceof WireError && re.test(e.message) && /seq 3 micro-batch 0/.test(e.message));
  refuse({ ...w, tokenSampleIds: undefined }, /needs both segments and token_sample_ids/);
  refuse({ ...w, segments: undefined }, /needs both segments and token_sample_ids/);
  refuse({ ...w, segments: i32ToTensor(new Int32Array(mb.B * mb.T).fill(1), [mb.B, mb.T]) }, /segments\[\d+, \d+\] = 1 does not match key_mask 0/);
  refuse({ ...w, segments: i32ToTensor(new Int32Array(mb.B * (mb.T + 1)), [mb.B, mb.T + 1]) }, /segments: expected shape/);
});

test('a DoRA stage\'s state carries the magnitudes and their moments; restored into a fresh stage it is the same state', () => {
  const be = createCpuBackend();
  const lora = { r: 2, alpha: 4, dropout: 0, useRslora: false, targetModules: ['q_proj', 'v_proj'], useDora: true };
  const spec = fullModelSpec(cfg);
  const stage = loadStage(be, FIX, spec, { lora, useDora: true, seed: 3 });
  const params = stage.loraParams();
  // Non-trivial state: gradients everywhere, one AdamW step.
  for (const p of params) for (const t of p.trainable()) be.axpy(t.grad, be.upload(Float32Array.from({ length: t.grad.size }, (_, i) => Math.sin(i + t.grad.size)), t.grad.shape, 'f32'));
  applyUpdate(be, params, { step: 0, lr: 1e-2, clipCoef: 1 }, { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });

  const st = decodeStageState(encodeStageState(be, 0, params, true), 'state of stage 0');
  assert.equal(st.modules.length, params.length);
  params.forEach((p, i) => {
    const h = p.hostState(true);
    assert.deepEqual(st.modules[i].magnitude, h.magnitude, `${p.name} magnitude`);
    assert.deepEqual([st.moments![i].mMag, st.moments![i].vMag], [h.mMag, h.vMag], `${p.name} magnitude moments`);
    assert.ok(h.mMag!.some((x) => x !== 0));
  });
  // Without moments (the final adapter): magnitudes only.
  const light = decodeStageState(encodeStageState(be, 0, params, false), 'adapter of stage 0');
  assert.ok(light.modules.every((m) => m.magnitude) && light.moments === undefined);

  const fresh = loadStage(be, FIX, spec, { lora, useDora: true, seed: 4 }).loraParams();
  restoreLoraParams(fresh, { dir: 'ck', modules: st.modules, moments: st.moments! });
  fresh.forEach((p, i) => assert.deepEqual(p.hostState(true), params[i].hostState(true), `${p.name} restored`));
  // A checkpoint without the magnitude moments cannot resume a DoRA stage exactly: refused.
  const noMag = st.moments!.map(({ mMag: _m, vMag: _v, ...rest }) => rest);
  assert.throws(() => restoreLoraParams(fresh, { dir: 'ck', modules: st.modules, moments: noMag }), (e: Error) => e instanceof CheckpointError && /no DoRA magnitude/.test(e.message));

  // Magnitudes for some modules only, or magnitude moments without a magnitude, are WireErrors.
  const msg = StageState.decode(encodeStageState(be, 0, params, true));
  const partial = { ...msg, modules: msg.modules.map((m, i) => (i === 1 ? { ...m, magnitude: undefined, mMag: undefined, vMag: undefined } : m)) };
  assert.throws(() => decodeStageState(StageState.encode(partial).finish(), 'st'), (e: Error) => e instanceof WireError && /DoRA magnitudes for 3 of 4 modules/.test(e.message));
  const stray = { ...msg, modules: msg.modules.map((m, i) => (i === 1 ? { ...m, magnitude: undefined } : m)) };
  assert.throws(() => decodeStageState(StageState.encode(stray).finish(), 'st'), (e: Error) => e instanceof WireError && /magnitude moments without a magnitude/.test(e.message));
  const noMoments = { ...msg, modules: msg.modules.map((m) => ({ ...m, mMag: undefined })) };
  assert.throws(() => decodeStageState(StageState.encode(noMoments).finish(), 'st'), (e: Error) => e instanceof WireError && /exp_avg magnitude: missing tensor/.test(e.message));
});
