// Issue-13 features on the cuda backend, against the cpu backend (the reference) within bf16 tolerances (forward
// ≤ 1e-2, gradients ≤ 3e-2, norm-relative): the dense base linear (quantization: none), DoRA's column ops, the
// block-diagonal attention of packed batches (a packed row = its examples run alone, forward and backward), a packed
// micro-batch through the model (per-example losses and LoRA gradients = unpacked), `quantization: none` eval against
// transformers' loss, and a DoRA model step. Skipped where the cuda addon is not built or no GPU is visible (CI).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Backend, Tensor } from '../../core/engine/backend.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { bf16ToF32, f32ToBf16 } from '../../common/halfprec.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, type LlamaStage } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';
import { makeMicroBatch, type MicroBatch } from '../../core/train/batch.ts';
import { evaluateLoss } from '../../core/train/local.ts';
import { applyAdapter, loadAdapter } from '../../core/model/adapter.ts';
import { rand, relErr } from './helpers.ts';

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try { cuda = createCudaBackend(); } catch (e) { skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`; }
const cpu = createCpuBackend();
const ROOT = process.env.DQLORA_ROOT ?? join(import.meta.dirname, '..', '..');
const FIX = join(ROOT, 'test', 'fixtures', 'golden-noquant');

const bf = (x: Float32Array): Float32Array => bf16ToF32(f32ToBf16(x));
const dl = (b: Backend, t: Tensor): Float32Array => b.download(t) as Float32Array;
function close(name: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number): void {
  const e = relErr(got, want);
  assert.ok(e <= tol, `${name}: relative error ${e.toExponential(3)} > ${tol}`);
}

describe('issue-13 features: cuda vs cpu', { skip }, () => {
  const g = (): CudaBackend => cuda!;

  it('denseLinear (+ bias) and its backward', () => {
    const [N, O, I] = [37, 96, 80];
    const x = bf(rand(N * I, 1)), w = bf(rand(O * I, 2, -0.2, 0.2)), b = bf(rand(O, 3)), dy = bf(rand(N * O, 4));
    const yc = g().denseLinear(g().upload(x, [N, I], 'act'), g().upload(w, [O, I], 'act'), g().upload(b, [O], 'act'));
    const yr = cpu.denseLinear(cpu.upload(x, [N, I]), cpu.upload(w, [O, I]), cpu.upload(b, [O]));
    close('y', dl(g(), yc), dl(cpu, yr), 1e-2);
    const dc = g().denseLinearBackward(g().upload(dy, [N, O], 'act'), g().upload(w, [O, I], 'act'));
    const dr = cpu.denseLinearBackward(cpu.upload(dy, [N, O]), cpu.upload(w, [O, I]));
    close('dx', dl(g(), dc), dl(cpu, dr), 1e-2);
  });

  it('scaleColumns and columnDot', () => {
    const [N, C] = [300, 70];
    const x = bf(rand(N * C, 5)), v = rand(C, 6), y = bf(rand(N * C, 7));
    close('scaleColumns', dl(g(), g().scaleColumns(g().upload(x, [N, C], 'act'), g().upload(v, [C], 'f32'))), dl(cpu, cpu.scaleColumns(cpu.upload(x, [N, C]), cpu.upload(v, [C]))), 1e-2);
    close('columnDot', dl(g(), g().columnDot(g().upload(x, [N, C], 'act'), g().upload(y, [N, C], 'act'))), dl(cpu, cpu.columnDot(cpu.upload(x, [N, C]), cpu.upload(y, [N, C]))), 1e-2);
  });

  for (const D of [16, 64, 128]) {
    it(`packed attention (D ${D}): each example of a row as if alone, forward and backward; equals the cpu kernel`, () => {
      const lens = [70, 3, 50, 1, 9], pad = 11, T = lens.reduce((a, b) => a + b, 0) + pad, Hq = 4, Hk = 2, scale = 1 / Math.sqrt(D);
      const segs = new Int32Array(T);
      let off = 0;
      lens.forEach((l, i) => { segs.fill(i + 1, off, off + l); off += l; });
      const real = off;
      const q = bf(rand(T * Hq * D, 1)), k = bf(rand(T * Hk * D, 2)), v = bf(rand(T * Hk * D, 3)), dout = bf(rand(T * Hq * D, 4));
      dout.fill(0, real * Hq * D);
      const run = (be: Backend, qq: Float32Array, kk: Float32Array, vv: Float32Array, dd: Float32Array, m: Int32Array, t: number) => {
        const up = (a: Float32Array, s: number[]): Tensor => be.upload(a, s, 'act');
        const att = be.attention(up(qq, [1, t, Hq, D]), up(kk, [1, t, Hk, D]), up(vv, [1, t, Hk, D]), be.upload(m, [1, t], 'i32'), scale);
        const gr = be.attentionBackward(up(dd, [1, t, Hq, D]), up(qq, [1, t, Hq, D]), up(kk, [1, t, Hk, D]), up(vv, [1, t, Hk, D]), be.upload(m, [1, t], 'i32'), att, scale);
        return { out: dl(be, att.out), dq: dl(be, gr.dq), dk: dl(be, gr.dk), dv: dl(be, gr.dv) };
      };
      const pc = run(g(), q, k, v, dout, segs, T), pr = run(cpu, q, k, v, dout, segs, T);
      for (const key of ['out', 'dq', 'dk', 'dv'] as const) close(`packed ${key} vs cpu`, pc[key], pr[key], key === 'out' ? 1e-2 : 3e-2);
      off = 0;
      for (const l of lens) {
        const sl = (a: Float32Array, w: number): Float32Array => a.slice(off * w, (off + l) * w);
        const alone = run(g(), sl(q, Hq * D), sl(k, Hk * D), sl(v, Hk * D), sl(dout, Hq * D), new Int32Array(l).fill(1), l);
        close(`out @${off}`, sl(pc.out, Hq * D), alone.out, 1e-2);
        close(`dq @${off}`, sl(pc.dq, Hq * D), alone.dq, 3e-2);
        close(`dk @${off}`, sl(pc.dk, Hk * D), alone.dk, 3e-2);
        close(`dv @${off}`, sl(pc.dv, Hk * D), alone.dv, 3e-2);
        off += l;
      }
    });
  }

  function model(be: Backend, dir: string, quantization: 'nf4' | 'none', extra: object = {}): LlamaStage {
    return loadStage(be, join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))), { quantization, seed: 3, lora: { r: 4, alpha: 8, dropout: 0, useRslora: false, targetModules: 'all-linear' }, ...extra });
  }
  function grads(stage: LlamaStage, be: Backend, mb: MicroBatch): Float32Array {
    for (const p of stage.loraParams()) p.zeroGrad();
    stage.forward(1, mb, undefined, { train: true, gradScale: 1 / mb.labelCount, dropout: { k0: 1, k1: 2 } });
    stage.backward(1);
    return Float32Array.from(stage.loraParams().flatMap((p) => p.trainable().flatMap((t) => Array.from(dl(be, t.grad)))));
  }
  function setB(stage: LlamaStage): void {
    for (const [i, p] of stage.loraParams().entries()) { const h = p.hostState(false); p.setHostState({ A: h.A, B: rand(h.B.length, 50 + i, -0.1, 0.1) }); }
  }

  it('a packed micro-batch through the model: per-example losses and LoRA gradients as unpacked (bf16), and as on cpu', () => {
    const dir = join(FIX, 'llama-f32');
    const tok = loadTokenizer(join(dir, 'model'));
    const { examples } = tokenizeRecords(readRecords(join(dir, 'data.jsonl')).records, tok, { maxLength: 512 });
    const un = makeMicroBatch(examples, { padId: tok.padId!, sampleIds: examples.map((_, i) => i) });
    const pk = makeMicroBatch(examples, { padId: tok.padId!, sampleIds: examples.map((_, i) => i), packing: { maxLength: 128 } });
    const sc = model(g(), dir, 'nf4'), sr = model(cpu, dir, 'nf4');
    setB(sc); setB(sr);
    const gp = grads(sc, g(), pk), gu = grads(sc, g(), un), gr = grads(sr, cpu, pk);
    close('cuda packed vs unpacked gradients', gp, gu, 3e-2);
    close('cuda packed vs cpu packed gradients', gp, gr, 3e-2);
    const lossOf = (s: LlamaStage, mb: MicroBatch): number => { const r = s.forward(-7, mb, undefined, { train: false }); return r.lossSum! / r.count!; };
    const lp = lossOf(sc, pk), lu = lossOf(sc, un);
    assert.ok(Math.abs(lp - lu) / lu < 1e-2, `packed loss ${lp} vs unpacked ${lu}`);
  });

  for (const c of ['llama-f32', 'qwen2-bf16']) {
    it(`quantization none (${c}): eval loss within bf16 tolerance of transformers`, { skip: existsSync(join(FIX, c, 'expected.json')) ? false : 'no expected.json' }, () => {
      const dir = join(FIX, c);
      const exp = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8'));
      const tok = loadTokenizer(join(dir, 'model'));
      const { examples } = tokenizeRecords(readRecords(join(dir, 'data.jsonl')).records, tok, { maxLength: 512 });
      const stage = loadStage(g(), join(dir, 'model'), fullModelSpec(loadModelConfig(join(dir, 'model'))), { quantization: 'none' });
      const base = evaluateLoss([stage], examples, 8, tok.padId!);
      applyAdapter(g(), stage, loadAdapter(join(dir, 'adapter')), c);
      const ad = evaluateLoss([stage], examples, 8, tok.padId!);
      assert.ok(Math.abs(base.loss - exp.base_loss) / exp.base_loss < 1e-2, `base ${base.loss} vs ${exp.base_loss}`);
      assert.ok(Math.abs(ad.loss - exp.adapted_loss) / exp.adapted_loss < 1e-2, `adapted ${ad.loss} vs ${exp.adapted_loss}`);
    });
  }

  it('DoRA model step (NF4 and dense base): loss and gradients (A, B, magnitude) as on cpu', () => {
    const dir = join(FIX, 'llama-f32');
    const tok = loadTokenizer(join(dir, 'model'));
    const { examples } = tokenizeRecords(readRecords(join(dir, 'data.jsonl')).records, tok, { maxLength: 512 });
    const mb = makeMicroBatch(examples.slice(0, 4), { padId: tok.padId!, sampleIds: [0, 1, 2, 3] });
    for (const q of ['nf4', 'none'] as const) {
      const sc = model(g(), dir, q, { useDora: true }), sr = model(cpu, dir, q, { useDora: true });
      setB(sc); setB(sr);
      close(`DoRA ${q} gradients`, grads(sc, g(), mb), grads(sr, cpu, mb), 3e-2);
    }
  });
});
