// The golden fixtures (transformers 5.17 + PEFT 0.21, fp32, see golden.test.ts) on the cuda backend: bf16
// activations: loss within 1e-2 relative, the LoRA gradient within 3e-2 (L2-relative over all modules; each
// tensor ≤ 5e-2 L2-relative and ≤ 6e-2 element-wise of its largest value), the logits of sequence 0 within 3e-2 of their largest magnitude; the NF4 codes the
// loader makes on the GPU are the CPU's bit for bit. Skipped (with the reason) where no GPU / addon is present.
import { goldenBatch } from '../helpers/golden.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCudaBackend, type CudaBackend } from '../../core/engine/cuda/cuda.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec, modulePath } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter } from '../../core/model/adapter.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { quantizeNf4 } from '../../core/engine/nf4.ts';
import type { StageBatch } from '../../core/model/llama.ts';

// The fixtures sit beside this file's folder; a bundled copy (bench/gpu/pack.sh) runs from the repository root.
const ROOT = [join(import.meta.dirname ?? '.', '..', 'fixtures', 'golden'), join(process.cwd(), 'test', 'fixtures', 'golden')].find((d) => existsSync(d))!;
const CASES = ['llama-gqa', 'qwen2-tied', 'llama3-rope'];

let cuda: CudaBackend | undefined;
let skip: string | false = false;
try { cuda = createCudaBackend(); } catch (e) { skip = `cuda backend unavailable here: ${(e as Error).message.split('\n')[0]}`; }

interface Expected {
  loss: number; num_targets: number;
  batch: { input_ids: number[][]; attention_mask: number[][]; labels: number[][] };
}

const batchOf = (e: Expected): StageBatch => goldenBatch(e.batch);

/** ‖got − want‖₂ / ‖want‖₂. */
function l2Err(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < want.length; i++) { num += (got[i] - want[i]) ** 2; den += want[i] ** 2; }
  return Math.sqrt(num / Math.max(den, 1e-60));
}

/** max |got − want| / max |want|. */
function normErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let maxAbs = 0, maxErr = 0;
  for (let i = 0; i < want.length; i++) { maxAbs = Math.max(maxAbs, Math.abs(want[i])); maxErr = Math.max(maxErr, Math.abs(got[i] - want[i])); }
  return maxErr / Math.max(maxAbs, 1e-30);
}

for (const name of CASES) {
  test(`cuda golden ${name}: loss ≤ 1e-2 rel, LoRA gradient ≤ 3e-2 (L2), logits ≤ 3e-2 vs transformers + PEFT`, { skip }, () => {
    const be = cuda!;
    const dir = join(ROOT, name);
    const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected;
    const cfg = loadModelConfig(join(dir, 'model'));
    const stage = loadStage(be, join(dir, 'model'), fullModelSpec(cfg), { gradientCheckpointing: true });
    const adapter = loadAdapter(join(dir, 'adapter'));
    assert.equal(applyAdapter(be, stage, adapter, name), adapter.modules.length);
    const batch = batchOf(expected);
    const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / expected.num_targets });
    assert.equal(r.count, expected.num_targets);
    const loss = r.lossSum! / r.count!;
    const lossErr = Math.abs(loss - expected.loss) / expected.loss;
    assert.ok(lossErr <= 1e-2, `loss ${loss} vs transformers ${expected.loss} (rel ${lossErr.toExponential(2)})`);
    stage.backward(0);
    const grads = SafetensorsFile.open(join(dir, 'grads.safetensors'));
    try {
      // Tolerances: the whole LoRA gradient (every module's dA, dB together) within 3e-2 L2-relative — the issue's
      // bf16 number; each tensor within 5e-2 L2-relative and 6e-2 element-wise of its largest value. Per tensor
      // the 3e-2 is out of reach for these tiny fixtures (H = 64): layer-0 q/k gradients sum terms that largely
      // cancel, and the bf16 roundings of activations, dq/dk and the LoRA intermediates (what autocast does too)
      // land at 2.8–3.8e-2 there (measured on the H200).
      let worst = 0, worstMax = 0, worstKey = '', errSq = 0, refSq = 0, checked = 0;
      const bad: string[] = [];
      for (const p of stage.loraParams()) {
        for (const [which, t] of [['A', p.dA], ['B', p.dB]] as const) {
          const key = `base_model.model.${p.name}.lora_${which}.weight`;
          const want = grads.readF32(key), got = be.download(t) as Float32Array;
          assert.equal(got.length, want.length, key);
          for (let i = 0; i < want.length; i++) { errSq += (got[i] - want[i]) ** 2; refSq += want[i] ** 2; }
          const e = l2Err(got, want), m = normErr(got, want);
          if (e > worst) { worst = e; worstKey = key; }
          worstMax = Math.max(worstMax, m);
          if (!(e <= 5e-2 && m <= 6e-2)) bad.push(`${key}: L2 ${e.toExponential(3)}, max ${m.toExponential(3)}`);
          checked++;
        }
      }
      const global = Math.sqrt(errSq / refSq);
      process.stdout.write(`# cuda golden ${name}: LoRA gradients: all together L2 ${global.toExponential(2)}, worst tensor L2 ${worst.toExponential(2)} (${worstKey}), worst element ${worstMax.toExponential(2)} of max\n`);
      assert.equal(checked, adapter.modules.length * 2);
      assert.deepEqual(bad, [], 'per-tensor LoRA gradient errors');
      assert.ok(global <= 3e-2, `the whole LoRA gradient: L2-relative error ${global.toExponential(3)}`);
      const T = batch.T;
      const logits = stage.logitsAt(batch, undefined, Array.from({ length: T }, (_, t) => t));
      const want = grads.readF32('logits0');
      const got = new Float32Array(want.length);
      logits.forEach((row, t) => got.set(row, t * row.length));
      const le = normErr(got, want);
      assert.ok(le <= 3e-2, `logits error ${le.toExponential(3)} of their largest magnitude`);
      process.stdout.write(`# cuda golden ${name}: loss rel err ${lossErr.toExponential(2)}, logits err ${le.toExponential(2)}\n`);
    } finally { grads.close(); }
  });

  test(`cuda golden ${name}: the loader's NF4 (quantized on the GPU) equals the CPU quantizer's bit for bit`, { skip }, () => {
    const be = cuda!;
    const dir = join(ROOT, name, 'model');
    const w = ModelWeights.open(dir);
    try {
      for (const mod of [modulePath(0, 'q_proj'), modulePath(1, 'down_proj')]) {
        const info = w.info(`${mod}.weight`);
        const data = w.readF32(`${mod}.weight`);
        const shape: [number, number] = [info.shape[0], info.shape[1]];
        const g = be.quantizeNf4(data, shape, { blocksize: 64, doubleQuant: true });
        const c = quantizeNf4(data, shape, { blocksize: 64, doubleQuant: true });
        assert.deepEqual(Buffer.from(g.packed), Buffer.from(c.packed), `${mod} packed`);
        assert.deepEqual(Buffer.from(g.absmax as Uint8Array), Buffer.from(c.absmax as Uint8Array), `${mod} absmax codes`);
        assert.deepEqual(Array.from(g.nested!.absmax), Array.from(c.nested!.absmax), `${mod} nested absmax`);
        assert.equal(g.nested!.offset, c.nested!.offset, `${mod} offset`);
      }
    } finally { w.close(); }
  });
}
