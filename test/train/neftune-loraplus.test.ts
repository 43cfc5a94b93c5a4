// NEFTune (training.neftune_noise_alpha, as the HF Trainer) and LoRA+ (lora.loraplus_lr_ratio), and how the job
// file spells the issue-13 features: values, defaults, errors that name the field.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { neftuneNoise, neftuneMagnitude } from '../../core/model/neftune.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LlamaStage } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';
import { makeMicroBatch, type MicroBatch } from '../../core/train/batch.ts';
import { parseJob, configReference } from '../../coordinator/job.ts';
import { stageLoadOptions, packingOptions } from '../../coordinator/features.ts';
import { mixKey } from '../../common/rng.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'golden-noquant', 'llama-f32');

describe('NEFTune noise', () => {
  const key = { k0: mixKey(42, 0x44524f50), k1: mixKey(7) };
  it('m = alpha / sqrt(T·H): uniform in [−m, m) with mean 0 and variance m²/3', () => {
    const T = 64, H = 96, m = neftuneMagnitude(5, T, H);
    assert.equal(m, 5 / Math.sqrt(T * H));
    const n = neftuneNoise(new Int32Array(T).fill(3), Int32Array.from({ length: T }, (_, i) => i), H, m, key);
    let sum = 0, sq = 0, lo = Infinity, hi = -Infinity;
    for (const x of n) { sum += x; sq += x * x; lo = Math.min(lo, x); hi = Math.max(hi, x); }
    const mean = sum / n.length, variance = sq / n.length - mean * mean;
    assert.ok(lo >= -m && hi < m, `range [${lo}, ${hi}] vs ±${m}`);
    assert.ok(hi > 0.99 * m && lo < -0.99 * m, 'the whole range is used');
    assert.ok(Math.abs(mean) < 0.02 * m, `mean ${mean}`);
    assert.ok(Math.abs(variance / (m * m / 3) - 1) < 0.03, `variance ${variance} vs ${m * m / 3}`);
  });

  it('is a function of (step key, sample, position, column): the same token gets the same noise in any row', () => {
    const H = 8, m = 0.1;
    const a = neftuneNoise(Int32Array.from([5, 5, 9]), Int32Array.from([0, 1, 0]), H, m, key);
    const b = neftuneNoise(Int32Array.from([9, 5]), Int32Array.from([0, 1]), H, m, key);
    assert.deepEqual(b.subarray(0, H), a.subarray(2 * H, 3 * H));
    assert.deepEqual(b.subarray(H), a.subarray(H, 2 * H));
    const c = neftuneNoise(Int32Array.from([5]), Int32Array.from([0]), H, m, { ...key, k1: mixKey(8) });
    assert.notDeepEqual(c, a.subarray(0, H), 'another step draws other noise');
  });
});

describe('NEFTune in the model', () => {
  const be = createCpuBackend();
  const tok = loadTokenizer(join(FIX, 'model'));
  const { examples } = tokenizeRecords(readRecords(join(FIX, 'data.jsonl')).records, tok, { maxLength: 512 });
  const mb: MicroBatch = makeMicroBatch(examples.slice(0, 3), { padId: tok.padId!, sampleIds: [0, 1, 2] });
  const lora = { r: 4, alpha: 8, dropout: 0, useRslora: false, targetModules: 'all-linear' as const };
  const load = (neftuneAlpha?: number): LlamaStage => loadStage(be, join(FIX, 'model'), fullModelSpec(loadModelConfig(join(FIX, 'model'))), { lora, seed: 1, neftuneAlpha });
  const dropout = { k0: mixKey(42, 0x44524f50), k1: mixKey(0) };
  const trainLoss = (s: LlamaStage, d = dropout): number => {
    const r = s.forward(1, mb, undefined, { train: true, dropout: d, gradScale: 1 / mb.labelCount });
    s.backward(1);
    return r.lossSum! / r.count!;
  };
  const plain = load(), noisy = load(5), off = load(0);

  it('changes the training loss, reproducibly; alpha 0 is off', () => {
    const l0 = trainLoss(plain), l5 = trainLoss(noisy);
    assert.notEqual(l5, l0);
    assert.ok(Math.abs(l5 - l0) / l0 < 0.05, `noise is a perturbation: ${l0} → ${l5}`);
    assert.equal(trainLoss(noisy), l5, 'same key, same noise');
    assert.notEqual(trainLoss(noisy, { ...dropout, k1: mixKey(1) }), l5, 'next step, new noise');
    assert.equal(trainLoss(off), l0);
  });

  it('leaves evaluation alone', () => {
    const ev = (s: LlamaStage): number => s.forward(-1, mb, undefined, { train: false }).lossSum!;
    assert.equal(ev(noisy), ev(plain));
  });
});

describe('LoRA+', () => {
  it('every LoRA module carries lrScaleB = lora.loraplus_lr_ratio (1 without it)', () => {
    const be = createCpuBackend();
    const spec = fullModelSpec(loadModelConfig(join(FIX, 'model')));
    const lora = { r: 2, alpha: 4, dropout: 0, useRslora: false, targetModules: ['q_proj', 'v_proj'] };
    const a = loadStage(be, join(FIX, 'model'), spec, { lora, loraplusLrRatio: 16 }).loraParams();
    assert.equal(a.length, 4);
    assert.ok(a.every((p) => p.lrScaleB === 16));
    assert.ok(loadStage(be, join(FIX, 'model'), spec, { lora }).loraParams().every((p) => p.lrScaleB === 1));
  });
});

describe('job.yaml: the issue-13 fields', () => {
  const base = { model: 'm', output_dir: 'o', data: { train: 't' } };
  const parse = (o: Record<string, unknown>): ReturnType<typeof parseJob> => parseJob({ ...base, ...o }, 'job.yaml', '/tmp');
  const err = (o: Record<string, unknown>): string => { try { parse(o); } catch (e) { return (e as Error).message; } return 'no error'; };

  it('defaults: NF4, no packing, no NEFTune, no LoRA+', () => {
    const j = parse({});
    assert.equal(j.quantization.mode, 'nf4');
    assert.equal(j.data.packing, false);
    assert.equal(j.training.neftune_noise_alpha, 0);
    assert.equal(j.lora.loraplus_lr_ratio, undefined);
    assert.equal(packingOptions(j), undefined);
  });

  it('quantization: none, packing, NEFTune and LoRA+ become loader and micro-batch options', () => {
    const j = parse({ quantization: 'none', data: { train: 't', packing: true, max_length: 256 }, training: { neftune_noise_alpha: 5 }, lora: { loraplus_lr_ratio: 16 } });
    assert.deepEqual(packingOptions(j), { maxLength: 256 });
    const o = stageLoadOptions(j);
    assert.equal(o.quantization, 'none'); assert.equal(o.neftuneAlpha, 5); assert.equal(o.loraplusLrRatio, 16);
  });

  it('bad values name the field', () => {
    assert.match(err({ quantization: 'int8' }), /quantization\.mode: Invalid option: expected one of "nf4"\|"none"/);
    assert.match(err({ training: { neftune_noise_alpha: -1 } }), /training\.neftune_noise_alpha/);
    assert.match(err({ lora: { loraplus_lr_ratio: 0 } }), /lora\.loraplus_lr_ratio/);
    assert.match(err({ data: { train: 't', packing: 'yes' } }), /data\.packing/);
  });

  it('every feature is accepted with distributed workers (their stage assignment carries it)', () => {
    const j = parse({ quantization: 'none', data: { train: 't', packing: true }, lora: { use_dora: true, loraplus_lr_ratio: 16 }, training: { neftune_noise_alpha: 5 }, distributed: { workers: 'local', stages: 2 } });
    assert.equal(j.quantization.mode, 'none'); assert.equal(j.data.packing, true); assert.equal(j.lora.use_dora, true);
    assert.equal(j.lora.loraplus_lr_ratio, 16); assert.equal(j.training.neftune_noise_alpha, 5); assert.equal(j.distributed.workers, 'local');
  });

  it('config-doc documents every new field', () => {
    const doc = configReference();
    for (const f of ['quantization.mode', 'data.packing', 'training.neftune_noise_alpha', 'lora.loraplus_lr_ratio', 'lora.use_dora']) assert.match(doc, new RegExp(`\`${f.replace('.', '\\.')}\``));
  });
});
