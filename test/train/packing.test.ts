// Sample packing (data.packing): several examples share a row, and nothing about any one example changes — its
// positions restart at 0, its attention never reaches another example (block-diagonal causal mask, TS and native
// kernels, forward and backward), its targets never cross into the next example, its dropout masks are the ones it
// draws unpacked, and the loss normaliser (label tokens) is the same. Golden: a packed micro-batch gives the same
// per-example losses and the same LoRA gradients as the same examples unpacked, within 1e-5 (CPU float32; the two
// differ only in summation order: other row lengths, other GEMM blockings).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { createCpuBackend, cpuData, type CpuBackend } from '../../core/engine/cpu.ts';
import { loadCpuNative } from '../../core/engine/cpu/native.ts';
import { makeMicroBatch, type MicroBatch, type Example } from '../../core/train/batch.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LlamaStage } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';
import { mixKey } from '../../common/rng.ts';
import { rand, relErr } from '../engine/helpers.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const FIX = join(ROOT, 'test', 'fixtures', 'golden-noquant', 'llama-f32');
const backends: [string, () => CpuBackend][] = [['TypeScript kernels', () => createCpuBackend({ native: false })]];
if (loadCpuNative()) backends.push(['native kernels', () => createCpuBackend({ native: true, threads: 2 })]);

const ex = (ids: number[], promptLen: number, sourceIndex: number): Example => ({
  inputIds: Int32Array.from(ids), labels: Int32Array.from(ids, (v, i) => (i < promptLen ? -100 : v)), sourceIndex,
});

describe('packMicroBatch: the layout of a packed micro-batch', () => {
  const exs = [ex([1, 2, 3, 4, 5], 2, 10), ex([6, 7, 8], 1, 11), ex([9, 10, 11, 12], 0, 12), ex([13, 14], 1, 13)];
  const mb = makeMicroBatch(exs, { padId: 0, sampleIds: [100, 101, 102, 103], packing: { maxLength: 8 } });
  const row = (a: Int32Array, r: number): number[] => Array.from(a.subarray(r * mb.T, (r + 1) * mb.T));

  it('balanced rows: ⌈14 / 8⌉ = 2 rows, longest first into the least-filled row; input order inside a row', () => {
    assert.equal(mb.B, 2); assert.equal(mb.T, 7);
    assert.deepEqual(mb.placement, [{ row: 0, offset: 0, length: 5 }, { row: 1, offset: 0, length: 3 }, { row: 1, offset: 3, length: 4 }, { row: 0, offset: 5, length: 2 }]);
    assert.deepEqual(row(mb.ids, 0), [1, 2, 3, 4, 5, 13, 14]);
    assert.deepEqual(row(mb.ids, 1), [6, 7, 8, 9, 10, 11, 12]);
  });

  it('positions restart per example; segments label the examples; per-token sample ids', () => {
    assert.deepEqual(row(mb.positions, 0), [0, 1, 2, 3, 4, 0, 1]);
    assert.deepEqual(row(mb.positions, 1), [0, 1, 2, 0, 1, 2, 3]);
    assert.deepEqual(row(mb.segments!, 0), [1, 1, 1, 1, 1, 2, 2]);
    assert.deepEqual(row(mb.segments!, 1), [1, 1, 1, 2, 2, 2, 2]);
    assert.deepEqual(row(mb.tokenSampleIds!, 1), [101, 101, 101, 102, 102, 102, 102]);
    assert.deepEqual(Array.from(mb.sampleIds), [100, 101]);
  });

  it('targets stay inside their example (the last token of each predicts nothing); label count as unpacked', () => {
    assert.deepEqual(row(mb.targets, 0), [-100, 3, 4, 5, -100, 14, -100]);
    assert.deepEqual(row(mb.targets, 1), [7, 8, -100, 10, 11, 12, -100]);
    assert.equal(mb.labelCount, makeMicroBatch(exs, { padId: 0 }).labelCount);
  });

  it('an example longer than max_length gets a row of its own', () => {
    const m = makeMicroBatch([ex([1, 2], 0, 0), ex([1, 2, 3, 4, 5, 6], 0, 1)], { padId: 0, packing: { maxLength: 4 } });
    assert.equal(m.B, 2); assert.equal(m.T, 6);
    assert.deepEqual(Array.from(m.segments!.subarray(0, 6)), [1, 1, 0, 0, 0, 0], 'padding is segment 0');
    assert.deepEqual(Array.from(m.keyMask.subarray(0, 6)), [1, 1, 0, 0, 0, 0]);
  });
});

for (const [name, make] of backends) {
  describe(`block-diagonal causal attention (${name})`, () => {
    it('a packed row gives, for each example, the output and the q/k/v gradients it has alone', () => {
      const be = make();
      const lens = [5, 3, 4], T = 14, Hq = 4, Hk = 2, D = 8, scale = 1 / Math.sqrt(D);   // 12 real tokens + 2 padding
      const segs = new Int32Array(T), keyMask = new Int32Array(T);
      let off = 0;
      lens.forEach((l, i) => { segs.fill(i + 1, off, off + l); keyMask.fill(1, off, off + l); off += l; });
      const q = rand(T * Hq * D, 1), k = rand(T * Hk * D, 2), v = rand(T * Hk * D, 3), dout = rand(T * Hq * D, 4);
      dout.fill(0, 12 * Hq * D);   // padding queries carry no loss gradient (their targets are ignored)
      const up = (d: Float32Array | Int32Array, shape: number[]): ReturnType<CpuBackend['upload']> => be.upload(d, shape);
      const att = be.attention(up(q, [1, T, Hq, D]), up(k, [1, T, Hk, D]), up(v, [1, T, Hk, D]), up(segs, [1, T]), scale);
      const g = be.attentionBackward(up(dout, [1, T, Hq, D]), up(q, [1, T, Hq, D]), up(k, [1, T, Hk, D]), up(v, [1, T, Hk, D]), up(segs, [1, T]), att, scale);
      off = 0;
      for (const l of lens) {
        const sl = (a: Float32Array, w: number): Float32Array => a.slice(off * w, (off + l) * w);
        const ones = new Int32Array(l).fill(1);
        const a1 = be.attention(up(sl(q, Hq * D), [1, l, Hq, D]), up(sl(k, Hk * D), [1, l, Hk, D]), up(sl(v, Hk * D), [1, l, Hk, D]), up(ones, [1, l]), scale);
        const g1 = be.attentionBackward(up(sl(dout, Hq * D), [1, l, Hq, D]), up(sl(q, Hq * D), [1, l, Hq, D]), up(sl(k, Hk * D), [1, l, Hk, D]), up(sl(v, Hk * D), [1, l, Hk, D]), up(ones, [1, l]), a1, scale);
        assert.ok(relErr(sl(cpuData(att.out), Hq * D), cpuData(a1.out)) < 1e-6, `out of the example at ${off}`);
        assert.ok(relErr(sl(cpuData(g.dq), Hq * D), cpuData(g1.dq)) < 1e-6, `dq at ${off}`);
        assert.ok(relErr(sl(cpuData(g.dk), Hk * D), cpuData(g1.dk)) < 1e-6, `dk at ${off}`);
        assert.ok(relErr(sl(cpuData(g.dv), Hk * D), cpuData(g1.dv)) < 1e-6, `dv at ${off}`);
        off += l;
      }
      // Keys of another example, and padding keys, get exactly no gradient from a query that cannot see them.
      assert.ok(cpuData(g.dk).subarray(12 * Hk * D).every((x) => x === 0), 'padding keys get no gradient');
    });
  });
}

/** Per-example mean token loss: forward with only that example's targets kept. */
function perExampleLosses(stage: LlamaStage, mb: MicroBatch, spans: { row: number; offset: number; length: number }[]): number[] {
  return spans.map((p, i) => {
    const targets = new Int32Array(mb.targets.length).fill(-100);
    const from = p.row * mb.T + p.offset;
    targets.set(mb.targets.subarray(from, from + p.length), from);
    const r = stage.forward(-1000 - i, { ...mb, targets }, undefined, { train: false });
    return r.lossSum! / r.count!;
  });
}

/** LoRA gradients (all modules, A then B) of one micro-batch with the step's normaliser. */
function loraGrads(stage: LlamaStage, mb: MicroBatch, gradScale: number, dropout: { k0: number; k1: number } | undefined): Float32Array {
  for (const p of stage.loraParams()) p.zeroGrad();
  stage.forward(1, mb, undefined, { train: true, gradScale, dropout });
  stage.backward(1);
  const parts = stage.loraParams().flatMap((p) => [cpuData(p.dA), cpuData(p.dB)]);
  const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

for (const [name, make] of backends) {
  for (const quantization of ['nf4', 'none'] as const) {
    describe(`packed vs unpacked through the model (${name}, quantization ${quantization})`, () => {
      const be = make();
      const tok = loadTokenizer(join(FIX, 'model'));
      const { examples } = tokenizeRecords(readRecords(join(FIX, 'data.jsonl')).records, tok, { maxLength: 512 });
      const cfg = loadModelConfig(join(FIX, 'model'));
      const stage = loadStage(be, join(FIX, 'model'), fullModelSpec(cfg), {
        quantization, seed: 3, lora: { r: 4, alpha: 8, dropout: 0.1, useRslora: false, targetModules: 'all-linear' },
      });
      for (const [i, p] of stage.loraParams().entries()) {   // B ≠ 0 so that dA and the LoRA branch are not trivial
        const h = p.hostState(false);
        p.setHostState({ A: h.A, B: rand(h.B.length, 50 + i, -0.1, 0.1) });
      }
      const sampleIds = examples.map((_, i) => 7 * i + 1);
      const unpacked = makeMicroBatch(examples, { padId: tok.padId!, sampleIds });
      const packed = makeMicroBatch(examples, { padId: tok.padId!, sampleIds, packing: { maxLength: 128 } });

      it(`packs ${examples.length} examples into ${packed.B} rows of ${packed.T} (unpacked: ${unpacked.B} × ${unpacked.T})`, () => {
        assert.ok(packed.B < unpacked.B);
        assert.ok(packed.B * packed.T < unpacked.B * unpacked.T);
        assert.equal(packed.labelCount, unpacked.labelCount);
      });

      it('every example has the same loss packed and unpacked (1e-5)', () => {
        const lp = perExampleLosses(stage, packed, packed.placement!);
        const lu = perExampleLosses(stage, unpacked, examples.map((e, b) => ({ row: b, offset: 0, length: e.inputIds.length })));
        for (let i = 0; i < lp.length; i++) assert.ok(Math.abs(lp[i] - lu[i]) / lu[i] < 1e-5, `example ${i}: packed ${lp[i]} vs unpacked ${lu[i]}`);
      });

      for (const withDropout of [false, true]) {
        it(`LoRA gradients of the whole micro-batch agree (1e-5)${withDropout ? ', with LoRA dropout 0.1 (same masks)' : ''}`, () => {
          const dropout = withDropout ? { k0: mixKey(42, 0x44524f50), k1: mixKey(3) } : undefined;
          const gs = 1 / unpacked.labelCount;
          const gp = loraGrads(stage, packed, gs, dropout), gu = loraGrads(stage, unpacked, gs, dropout);
          assert.ok(gu.some((x) => x !== 0));
          const e = relErr(gp, gu);
          assert.ok(e < 1e-5, `LoRA gradients differ by ${e}`);
        });
      }
    });
  }
}
