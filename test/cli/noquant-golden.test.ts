// `quantization: none` through the command line, against transformers: `coordinator eval --no-quantize` on an
// unquantized model directory prints the loss that transformers 5.17 + PEFT 0.21 compute for the same tokens (CPU
// float32, eager attention), within 1e-5 relative.
//  1. golden-noquant (fp32 Llama; bf16 Qwen2 with q/k/v bias and tied embeddings), base model and with a PEFT
//     adapter, data through the tokenizer: test/reference/make_noquant_inputs.ts (model, data, adapter, the token
//     ids our tokenizer gives the data) + make_noquant_golden.py (expected.json, on the device machine).
//  2. the three golden checkpoints of test/fixtures/golden (made by make_golden.py): transformers computed their loss
//     on the NF4-dequantized weights, so a model directory holding exactly those weights (sha256 checked against the
//     fixture) is an unquantized model whose transformers + PEFT loss is known; the batch goes in pre-tokenized.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, mkdtempSync, mkdirSync, copyFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createHash } from 'node:crypto';
import { writeSafetensors, type TensorRecord } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { quantizeNf4, dequantizeNf4 } from '../../core/engine/nf4.ts';
import { join } from 'node:path';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const BIN = join(ROOT, 'bin', 'coordinator.js');
const FIX = join(ROOT, 'test', 'fixtures', 'golden-noquant');

function evalCli(dir: string, extra: string[], paths?: { model: string; data: string; adapter: string }): { base: { loss: number; tokens: number }; adapted?: { loss: number; tokens: number }; quantization: string } {
  const p = paths ?? { model: join(dir, 'model'), data: join(dir, 'data.jsonl'), adapter: join(dir, 'adapter') };
  const r = spawnSync(process.execPath, [BIN, 'eval', '--model', p.model, '--data', p.data,
    '--adapter', p.adapter, '--backend', 'cpu', '--json', ...extra], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

const rel = (a: number, b: number): number => Math.abs(a - b) / Math.abs(b);

for (const c of ['llama-f32', 'qwen2-bf16']) {
  const dir = join(FIX, c);
  if (!existsSync(join(dir, 'expected.json'))) {
    test(`${c}: transformers reference`, { skip: `${dir}/expected.json not generated yet (bench/gpu/features.sh on the device machine)` }, () => {});
    continue;
  }
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8'));

  test(`${c}: the CLI tokenizes the data to the token ids transformers was given`, () => {
    const batch = JSON.parse(readFileSync(join(dir, 'batch.json'), 'utf8'));
    const { examples } = tokenizeRecords(readRecords(join(dir, 'data.jsonl')).records, loadTokenizer(join(dir, 'model')), { maxLength: 512 });
    assert.deepEqual(examples.map((e) => ({ input_ids: Array.from(e.inputIds), labels: Array.from(e.labels) })), batch.examples);
  });

  test(`${c}: coordinator eval --no-quantize equals transformers' loss to 1e-5 (base and with the PEFT adapter)`, () => {
    const r = evalCli(dir, ['--no-quantize']);
    assert.equal(r.quantization, 'none');
    assert.equal(r.base.tokens, expected.label_tokens);
    assert.ok(rel(r.base.loss, expected.base_loss) < 1e-5, `base loss ${r.base.loss} vs transformers ${expected.base_loss}`);
    assert.ok(rel(r.adapted!.loss, expected.adapted_loss) < 1e-5, `adapted loss ${r.adapted!.loss} vs transformers + PEFT ${expected.adapted_loss}`);
  });

  test(`${c}: without --no-quantize the base is NF4 and the loss moves away from the unquantized reference`, () => {
    const r = evalCli(dir, []);
    assert.equal(r.quantization, 'nf4');
    assert.ok(rel(r.base.loss, expected.base_loss) > 1e-4, `NF4 loss ${r.base.loss} should differ from the fp32 reference ${expected.base_loss}`);
  });
}

for (const c of ['llama-gqa', 'qwen2-tied', 'llama3-rope']) {
  test(`golden ${c}: coordinator eval --no-quantize on the weights transformers used equals its loss to 1e-5 (pre-tokenized data, PEFT adapter)`, () => {
    const src = join(ROOT, 'test', 'fixtures', 'golden', c);
    const exp = JSON.parse(readFileSync(join(src, 'expected.json'), 'utf8'));
    const work = mkdtempSync(join(tmpdir(), 'dqlora-noquant-')), model = join(work, 'model');
    mkdirSync(model);
    for (const f of ['config.json', 'generation_config.json']) copyFileSync(join(src, 'model', f), join(model, f));
    // eval wants a tokenizer in the model directory; the data is pre-tokenized and --batch-size 1 never pads, so any
    // tokenizer will do (this one's ids are not used).
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(FIX, 'llama-f32', 'model', f), join(model, f));
    const w = ModelWeights.open(join(src, 'model'));
    const recs: TensorRecord[] = [];
    for (const name of w.names()) {
      const info = w.info(name);
      let data = w.readF32(name);
      const mod = name.replace(/\.weight$/, '');
      if (exp.nf4.modules.includes(mod)) {
        data = dequantizeNf4(quantizeNf4(data, [info.shape[0], info.shape[1]], { blocksize: 64, doubleQuant: true }));
        const sha = createHash('sha256').update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)).digest('hex');
        assert.equal(sha, exp.nf4.dequant_sha256[mod], `${mod}: the weights transformers ran with`);
      }
      recs.push({ name, dtype: 'F32', shape: info.shape, data });
    }
    w.close();
    writeSafetensors(join(model, 'model.safetensors'), recs, { format: 'pt' });
    const b = exp.batch as { input_ids: number[][]; labels: number[][]; lengths: number[] };
    const data = join(work, 'batch.jsonl');
    writeFileSync(data, b.lengths.map((n, i) => JSON.stringify({ input_ids: b.input_ids[i].slice(0, n), labels: b.labels[i].slice(0, n) })).join('\n') + '\n');
    const r = evalCli('', ['--no-quantize', '--batch-size', '1'], { model, data, adapter: join(src, 'adapter') });
    assert.equal(r.adapted!.tokens, exp.num_targets);
    assert.ok(rel(r.adapted!.loss, exp.loss) < 1e-5, `loss ${r.adapted!.loss} vs transformers + PEFT ${exp.loss}`);
  });
}
