// DoRA against PEFT 0.21 itself (fixtures written on the device machine by test/reference/make_dora_golden.py and
// make_dora_trained.py,
// CPU float32, eager attention): PEFT's DoRA adapter (use_dora, r=4, alpha=8, all-linear, magnitudes perturbed from
// their ‖W‖ init) on the unquantized llama-gqa golden model loads here; the loss is PEFT's within 1e-5, every
// lora_A / lora_B / lora_magnitude_vector gradient within 1e-4 of the tensor's largest value, the logits of sequence 0
// within 1e-4. The adapter we save has exactly PEFT's keys and config, and three AdamW steps here from PEFT's adapter
// give what three torch AdamW steps give in PEFT (peft-trained/: losses, A, B, magnitudes, logits).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { goldenBatch } from '../helpers/golden.ts';
import { createCpuBackend } from '../../core/engine/cpu.ts';
import { loadStage } from '../../core/model/loader.ts';
import { fullModelSpec } from '../../core/model/llama.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { applyAdapter, loadAdapter, saveAdapter, stageLoraTensors } from '../../core/model/adapter.ts';
import { SafetensorsFile } from '../../common/safetensors.ts';

const ROOT = join(import.meta.dirname, '..', 'fixtures');
const MODEL = join(ROOT, 'golden', 'llama-gqa', 'model');
const DIR = join(ROOT, 'golden-dora', 'llama-gqa');
const HAVE = existsSync(join(DIR, 'expected.json'));
const skip = HAVE ? false : `${DIR} not generated yet (bench/gpu/features.sh on the device machine)`;
const expected = (HAVE ? JSON.parse(readFileSync(join(DIR, 'expected.json'), 'utf8')) : {}) as {
  loss: number; num_targets: number; batch: Parameters<typeof goldenBatch>[0]; grad_keys: string[]; adapter_keys: string[];
};

function loadDora(): { be: ReturnType<typeof createCpuBackend>; stage: ReturnType<typeof loadStage>; n: number } {
  const be = createCpuBackend();
  const stage = loadStage(be, MODEL, fullModelSpec(loadModelConfig(MODEL)), { quantization: 'none' });
  const n = applyAdapter(be, stage, loadAdapter(join(DIR, 'adapter')), 'golden-dora');
  return { be, stage, n };
}

test('DoRA golden: PEFT\'s DoRA adapter loads with its magnitudes; loss and every gradient match PEFT 0.21 (fp32)', { skip }, () => {
  const { be, stage, n } = loadDora();
  assert.equal(n, 14);
  assert.ok(stage.loraParams().every((p) => p.magnitude !== undefined));
  const r = stage.forward(0, goldenBatch(expected.batch), undefined, { train: true, gradScale: 1 / expected.num_targets });
  assert.equal(r.count, expected.num_targets);
  const loss = r.lossSum! / r.count!;
  assert.ok(Math.abs(loss - expected.loss) <= 1e-5 * expected.loss, `loss ${loss} vs PEFT ${expected.loss}`);
  stage.backward(0);
  const grads = SafetensorsFile.open(join(DIR, 'grads.safetensors'));
  try {
    const seen = new Set<string>();
    for (const p of stage.loraParams()) {
      for (const [key, t] of [[`base_model.model.${p.name}.lora_A.weight`, p.dA], [`base_model.model.${p.name}.lora_B.weight`, p.dB], [`base_model.model.${p.name}.lora_magnitude_vector`, p.magnitude!.dm]] as const) {
        const want = grads.readF32(key), got = be.download(t) as Float32Array;
        assert.equal(got.length, want.length, key);
        let maxAbs = 0, maxErr = 0;
        for (let i = 0; i < want.length; i++) { maxAbs = Math.max(maxAbs, Math.abs(want[i])); maxErr = Math.max(maxErr, Math.abs(got[i] - want[i])); }
        assert.ok(maxAbs > 0, `${key}: PEFT's gradient is not trivial`);
        assert.ok(maxErr <= 1e-4 * maxAbs, `${key}: max error ${maxErr.toExponential(3)} vs max |grad| ${maxAbs.toExponential(3)}`);
        seen.add(key);
      }
    }
    assert.deepEqual([...seen].sort(), [...expected.grad_keys].sort());
  } finally { grads.close(); }
});

test('DoRA golden: logits of sequence 0 match PEFT', { skip }, () => {
  const { stage } = loadDora();
  const batch = goldenBatch(expected.batch);
  const logits = stage.logitsAt(batch, undefined, Array.from({ length: batch.T }, (_, t) => t));
  const g = SafetensorsFile.open(join(DIR, 'grads.safetensors'));
  const want = g.readF32('logits0'); g.close();
  const V = want.length / batch.T;
  let maxErr = 0;
  for (let t = 0; t < batch.T; t++) for (let v = 0; v < V; v++) maxErr = Math.max(maxErr, Math.abs(logits[t][v] - want[t * V + v]));
  assert.ok(maxErr < 1e-4, `logits max error ${maxErr}`);
});

test('DoRA golden: the adapter we save has PEFT\'s keys, use_dora: true, and loads back to the same magnitudes', { skip }, () => {
  const { be, stage } = loadDora();
  const out = join(mkdtempSync(join(tmpdir(), 'dqlora-dora-')), 'adapter');
  const cfg = loadAdapter(join(DIR, 'adapter')).config;
  saveAdapter(out, stageLoraTensors(be, stage), cfg, null);
  const f = SafetensorsFile.open(join(out, 'adapter_model.safetensors'));
  const keys = f.names().sort(); f.close();
  assert.deepEqual(keys, [...expected.adapter_keys].sort());
  assert.equal(JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8')).use_dora, true);
  const back = loadAdapter(out), orig = loadAdapter(join(DIR, 'adapter'));
  for (let i = 0; i < orig.modules.length; i++) assert.deepEqual(back.modules[i].magnitude, orig.modules[i].magnitude);
});

test('DoRA training: 3 AdamW steps here from PEFT\'s adapter = 3 torch AdamW steps in PEFT (losses, A, B, magnitudes, logits)', { skip }, () => {
  const dir = join(DIR, 'peft-trained');
  const want = JSON.parse(readFileSync(join(dir, 'trained.json'), 'utf8')) as { losses: number[] };
  const { be, stage } = loadDora();
  const batch = goldenBatch(expected.batch);
  for (let step = 1; step <= 3; step++) {
    const r = stage.forward(0, batch, undefined, { train: true, gradScale: 1 / expected.num_targets });
    stage.backward(0);
    const loss = r.lossSum! / r.count!;
    assert.ok(Math.abs(loss - want.losses[step - 1]) <= 1e-5 * want.losses[step - 1], `step ${step}: loss ${loss} vs PEFT ${want.losses[step - 1]}`);
    for (const p of stage.loraParams()) {
      for (const t of p.trainable()) be.adamw(t.param, t.grad, t.m, t.v, { lr: 1e-2 * t.lrScale, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step });
      p.zeroGrad();
    }
  }
  const peft = loadAdapter(join(dir, 'adapter'));
  const ours = new Map(stageLoraTensors(be, stage).map((m) => [m.path, m]));
  let worst = 0;
  for (const m of peft.modules) {
    const o = ours.get(m.path)!;
    for (const [a, b] of [[o.A, m.A], [o.B, m.B], [o.magnitude!, m.magnitude!]] as const) {
      let e = 0, s = 0;
      for (let i = 0; i < b.length; i++) { e = Math.max(e, Math.abs(a[i] - b[i])); s = Math.max(s, Math.abs(b[i])); }
      worst = Math.max(worst, e / s);
    }
  }
  // AdamW's first steps move every weight by ≈ lr·sign(g): the tolerance is relative to the tensor's largest value.
  assert.ok(worst < 1e-4, `adapter after 3 steps differs from PEFT's by ${worst.toExponential(3)} (relative to max)`);
  const logits = stage.logitsAt(batch, undefined, Array.from({ length: batch.T }, (_, t) => t));
  const g = SafetensorsFile.open(join(dir, 'logits0.safetensors'));
  const wl = g.readF32('logits0'); g.close();
  const V = wl.length / batch.T;
  let maxErr = 0;
  for (let t = 0; t < batch.T; t++) for (let v = 0; v < V; v++) maxErr = Math.max(maxErr, Math.abs(logits[t][v] - wl[t * V + v]));
  assert.ok(maxErr < 1e-4, `logits after training: max error ${maxErr}`);
});

// The other direction: the adapter WE save (ours-trained/adapter, written by test/reference/make_dora_ours.ts after
// three DoRA steps here) loaded by PEFT 0.21 (PeftModel.from_pretrained, test/reference/check_peft_loads_dora.py on
// the device machine) gives the logits we give with it.
const OURS = join(DIR, 'ours-trained');
const HAVE_PEFT_OF_OURS = existsSync(join(OURS, 'peft-logits0.safetensors'));
test('DoRA: the adapter we save loads in PEFT 0.21 with the same logits (sequence 0, 1e-4)', { skip: HAVE_PEFT_OF_OURS ? false : `${OURS}/peft-logits0.safetensors not made yet (test/reference/check_peft_loads_dora.py on the device machine)` }, () => {
  const be = createCpuBackend();
  const stage = loadStage(be, MODEL, fullModelSpec(loadModelConfig(MODEL)), { quantization: 'none' });
  const adapter = loadAdapter(join(OURS, 'adapter'));
  assert.equal(applyAdapter(be, stage, adapter, 'ours-trained'), 14);
  const batch = goldenBatch(expected.batch);
  const logits = stage.logitsAt(batch, undefined, Array.from({ length: batch.T }, (_, t) => t));
  const g = SafetensorsFile.open(join(OURS, 'peft-logits0.safetensors'));
  const want = g.readF32('logits0'); g.close();
  const V = want.length / batch.T;
  let maxErr = 0, maxAbs = 0;
  for (let t = 0; t < batch.T; t++) for (let v = 0; v < V; v++) { maxErr = Math.max(maxErr, Math.abs(logits[t][v] - want[t * V + v])); maxAbs = Math.max(maxAbs, Math.abs(want[t * V + v])); }
  assert.ok(maxAbs > 0.1, 'PEFT logits are not trivial');
  assert.ok(maxErr < 1e-4, `PEFT's logits with our adapter differ from ours by ${maxErr}`);
  // and the adapter really is the trained one, not PEFT's starting adapter
  const start = loadAdapter(join(DIR, 'adapter'));
  assert.notDeepEqual(adapter.modules[0].magnitude, start.modules[0].magnitude);
});
