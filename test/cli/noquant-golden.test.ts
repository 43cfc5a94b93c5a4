// `quantization: none` through the command line, against transformers: `coordinator eval --no-quantize` on an
// unquantized model directory (fp32 Llama; bf16 Qwen2 with q/k/v bias and tied embeddings) prints the loss that
// transformers 5.17 + PEFT 0.21 compute for the same tokens (CPU float32, eager attention), within 1e-5 relative,
// for the base model and with a PEFT adapter. Fixtures: test/reference/make_noquant_inputs.ts (model, data,
// adapter, the token ids our tokenizer gives the data) + make_noquant_golden.py (expected.json, on the device).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const BIN = join(ROOT, 'bin', 'coordinator.js');
const FIX = join(ROOT, 'test', 'fixtures', 'golden-noquant');

function evalCli(dir: string, extra: string[]): { base: { loss: number; tokens: number }; adapted?: { loss: number; tokens: number }; quantization: string } {
  const r = spawnSync(process.execPath, [BIN, 'eval', '--model', join(dir, 'model'), '--data', join(dir, 'data.jsonl'),
    '--adapter', join(dir, 'adapter'), '--backend', 'cpu', '--json', ...extra], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

const rel = (a: number, b: number): number => Math.abs(a - b) / Math.abs(b);

for (const c of ['llama-f32', 'qwen2-bf16']) {
  const dir = join(FIX, c);
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
