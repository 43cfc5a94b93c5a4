// OOM-safe micro-batches (partial: the pieces, not yet the job loop): a micro-batch that does not fit is split in
// halves, recursively, and the pieces accumulate the same LoRA gradients and loss as the whole (float order only),
// because the step's loss scale is per token. The "device" here runs out of memory above a row count, as a GPU
// would for a micro-batch too large; the split keeps packing's per-example fields consistent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { createCpuBackend, cpuData } from '../../core/engine/cpu.ts';
import { isOutOfMemory } from '../../core/engine/oom.ts';
import { makeMicroBatch, splitMicroBatch, runSplittingOnOom, type MicroBatch } from '../../core/train/batch.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';
import { rand, relErr } from '../engine/helpers.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'golden-noquant', 'llama-f32');

test('the cuda allocator\'s failure is recognised as out of memory; other errors are not', () => {
  assert.ok(isOutOfMemory(new Error('cudaMalloc of 1073741824 bytes failed: out of memory (live 5 B in 1 blocks; device free 0 of 8 B) at runtime.cu:72')));
  assert.ok(!isOutOfMemory(new Error('matmul: inner dims differ')));
});

test('splitMicroBatch: rows, labels and packed fields go with their rows; label counts add up', () => {
  const tok = loadTokenizer(join(FIX, 'model'));
  const { examples } = tokenizeRecords(readRecords(join(FIX, 'data.jsonl')).records, tok, { maxLength: 512 });
  const mb = makeMicroBatch(examples, { padId: tok.padId!, packing: { maxLength: 64 } });
  const parts = splitMicroBatch(mb, 2);
  assert.equal(parts.reduce((a, p) => a + p.B, 0), mb.B);
  assert.equal(parts.reduce((a, p) => a + p.labelCount, 0), mb.labelCount);
  assert.deepEqual(Array.from(parts[1].segments!), Array.from(mb.segments!.subarray(parts[0].B * mb.T)));
  assert.equal(parts.reduce((a, p) => a + p.placement!.length, 0), examples.length);
});

test('a micro-batch that runs out of memory is split until it fits: same loss and LoRA gradients as the whole', () => {
  const be = createCpuBackend();
  const tok = loadTokenizer(join(FIX, 'model'));
  const { examples } = tokenizeRecords(readRecords(join(FIX, 'data.jsonl')).records, tok, { maxLength: 512 });
  const stage = loadStage(be, join(FIX, 'model'), fullModelSpec(loadModelConfig(join(FIX, 'model'))), { seed: 1, lora: { r: 4, alpha: 8, dropout: 0.1, useRslora: false, targetModules: 'all-linear' } });
  for (const [i, p] of stage.loraParams().entries()) { const h = p.hostState(false); p.setHostState({ A: h.A, B: rand(h.B.length, 9 + i, -0.1, 0.1) }); }
  const mb = makeMicroBatch(examples, { padId: tok.padId!, sampleIds: examples.map((_, i) => i) });
  const gradScale = 1 / mb.labelCount, dropout = { k0: 11, k1: 12 };
  const run = (part: MicroBatch): number => {
    const r = stage.forward(1, part, undefined, { train: true, gradScale, dropout });
    stage.backward(1);
    return r.lossSum!;
  };
  const grads = (): Float32Array => Float32Array.from(stage.loraParams().flatMap((p) => [...cpuData(p.dA), ...cpuData(p.dB)]));
  for (const p of stage.loraParams()) p.zeroGrad();
  const whole = run(mb), gWhole = grads();
  for (const p of stage.loraParams()) p.zeroGrad();
  const splits: string[] = [];
  const tooBig = (part: MicroBatch): number => {
    if (part.B > 2) { stage.forward(1, part, undefined, { train: true, gradScale, dropout }); throw new Error('cudaMalloc of 999 bytes failed: out of memory'); }
    return run(part);
  };
  const r = runSplittingOnOom(mb, tooBig, { isOom: isOutOfMemory, reset: () => stage.reset(), onSplit: (rows, into) => splits.push(`${rows}→${into}`) });
  assert.equal(stage.inFlight, 0, 'the failed attempts left nothing behind');
  assert.deepEqual(splits, ['6→2', '3→2', '3→2']);
  assert.equal(r.pieces, 4);
  assert.ok(Math.abs(r.lossSum - whole) / whole < 1e-6, `loss ${r.lossSum} vs ${whole}`);
  assert.ok(relErr(grads(), gWhole) < 1e-5, `gradients differ by ${relErr(grads(), gWhole)}`);
});
