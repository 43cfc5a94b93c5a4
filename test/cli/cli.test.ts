// The command line as a user runs it: real processes, real files. A tiny model with the example's tokenizer and
// data is trained with a job.yaml; the adapter is used by generate / eval / merge; quantize writes a checkpoint
// that loads to the same numbers; bad configs fail with errors that name the field.
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAdapter } from '../../core/model/adapter.ts';
import { ModelWeights } from '../../common/model-weights.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const BIN = join(ROOT, 'bin', 'coordinator.js');

function cli(args: string[], cwd = ROOT): { code: number; out: string; err: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd, encoding: 'utf8', timeout: 300_000, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}

const work = mkdtempSync(join(tmpdir(), 'dqlora-cli-'));
const { model, trainPath, validationPath, prompt } = tinyExampleSetup(work, { shape: { hiddenSize: 64, intermediateSize: 96, numLayers: 2 } });
const jobPath = join(work, 'job.yaml');
writeFileSync(jobPath, [
  'model: model', 'output_dir: run', 'backend: cpu',
  `data: { train: ${trainPath}, validation: ${validationPath}, max_length: 96 }`,
  'lora: { r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear }',
  'training: { max_steps: 6, micro_batch_size: 8, grad_accum: 2, lr: 3.0e-3, schedule: cosine, warmup_steps: 1, save_every: 3 }',
  `compare: { prompts: ["${prompt}"], max_new_tokens: 8 }`, '',
].join('\n'));

test('coordinator start -c job.yaml trains, checkpoints, saves a PEFT adapter and prints before/after answers', () => {
  const r = cli(['start', '-c', jobPath, '--no-progress']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /trained 6 steps/);
  assert.match(r.out, /before \/ after fine-tuning/);
  assert.match(r.out, new RegExp(`━━ ${prompt.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  const adapter = loadAdapter(join(work, 'run', 'adapter'));
  assert.equal(adapter.modules.length, 2 * 7);
  assert.equal(adapter.config.r, 8);
  assert.ok(adapter.modules.some((m) => m.B.some((x) => x !== 0)), 'the adapter was trained (B ≠ 0)');
  const cfg = JSON.parse(readFileSync(join(work, 'run', 'adapter', 'adapter_config.json'), 'utf8'));
  assert.equal(cfg.peft_type, 'LORA');
  assert.deepEqual(cfg.target_modules, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']);
  const summary = JSON.parse(readFileSync(join(work, 'run', 'summary.json'), 'utf8'));
  assert.equal(summary.steps, 6);
  assert.ok(existsSync(join(work, 'run', 'checkpoints', 'step-000006', 'manifest.json')));
  assert.ok(existsSync(join(work, 'run', 'checkpoints', 'step-000003', 'manifest.json')));
});

test('a finished job started again says so and exits 0 without training or rewriting anything', () => {
  const summary = readFileSync(join(work, 'run', 'summary.json'), 'utf8');
  const r = cli(['start', '-c', jobPath, '--no-progress']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /already holds a finished run: 6\/6 steps/);
  assert.doesNotMatch(r.out, /trained \d+ steps|resumed from/);
  assert.equal(readFileSync(join(work, 'run', 'summary.json'), 'utf8'), summary, 'summary.json untouched');
});

test('generate prints the base and the fine-tuned answer; eval prints loss and perplexity for both', () => {
  const g = cli(['generate', '--model', model, '--adapter', join(work, 'run', 'adapter'), '--max-new-tokens', '6', '--backend', 'cpu', prompt, '其他#问题']);
  assert.equal(g.code, 0, g.err);
  assert.match(g.out, /adapter: 14 LoRA modules/);
  assert.equal((g.out.match(/base model :/g) ?? []).length, 2);
  assert.equal((g.out.match(/fine-tuned :/g) ?? []).length, 2);
  const e = cli(['eval', '--model', model, '--adapter', join(work, 'run', 'adapter'), '--data', validationPath, '--backend', 'cpu']);
  assert.equal(e.code, 0, e.err);
  const base = Number(/base model : loss ([\d.]+)/.exec(e.out)![1]), tuned = Number(/fine-tuned : loss ([\d.]+)/.exec(e.out)![1]);
  assert.ok(Number.isFinite(base) && Number.isFinite(tuned) && tuned < base, e.out);
});

test('quantize writes a bitsandbytes checkpoint that evaluates to the same loss as quantizing on the fly', () => {
  const q = cli(['quantize', '--model', model, '--out', join(work, 'model-nf4')]);
  assert.equal(q.code, 0, q.err);
  assert.match(q.out, /quantized 14 linear weights/);
  const cfg = JSON.parse(readFileSync(join(work, 'model-nf4', 'config.json'), 'utf8'));
  assert.equal(cfg.quantization_config.bnb_4bit_quant_type, 'nf4');
  assert.equal(cfg.quantization_config.bnb_4bit_use_double_quant, true);
  const w = ModelWeights.open(join(work, 'model-nf4'));
  assert.ok(w.has('model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4'));
  w.close();
  const a = cli(['eval', '--model', model, '--data', validationPath, '--backend', 'cpu']);
  const b = cli(['eval', '--model', join(work, 'model-nf4'), '--data', validationPath, '--backend', 'cpu']);
  assert.equal(b.code, 0, b.err);
  assert.equal(/loss ([\d.]+)/.exec(a.out)![1], /loss ([\d.]+)/.exec(b.out)![1]);
});

test('merge writes a bf16 checkpoint whose loss matches the adapter on the dequantized base', () => {
  const m = cli(['merge', '--model', model, '--adapter', join(work, 'run', 'adapter'), '--out', join(work, 'merged'), '--dtype', 'float32']);
  assert.equal(m.code, 0, m.err);
  assert.match(m.out, /merged 14 LoRA modules/);
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(model, f), join(work, 'merged', f));
  const tuned = cli(['eval', '--model', model, '--adapter', join(work, 'run', 'adapter'), '--data', validationPath, '--backend', 'cpu']);
  const merged = cli(['eval', '--model', join(work, 'merged'), '--data', validationPath, '--backend', 'cpu']);
  assert.equal(merged.code, 0, merged.err);
  // The merged fp32 weights are re-quantized to NF4 when loaded, so the numbers agree only approximately.
  const lt = Number(/fine-tuned : loss ([\d.]+)/.exec(tuned.out)![1]), lm = Number(/base model : loss ([\d.]+)/.exec(merged.out)![1]);
  assert.ok(Math.abs(lt - lm) < 0.05 * lt, `adapter ${lt} vs merged ${lm}`);
  const bf = cli(['merge', '--model', model, '--adapter', join(work, 'run', 'adapter'), '--out', join(work, 'merged-bf16')]);
  assert.equal(bf.code, 0, bf.err);
  const w = ModelWeights.open(join(work, 'merged-bf16'));
  assert.equal(w.info('model.layers.0.self_attn.q_proj.weight').dtype, 'BF16');
  w.close();
});

test('bad job configs fail with an error naming the field; missing files name the path', () => {
  const bad = join(work, 'bad.yaml');
  writeFileSync(bad, 'model: model\noutput_dir: run\ndata: { train: x.jsonl }\nlora: { r: 0, alpah: 3 }\n');
  const r = cli(['start', '-c', bad]);
  assert.equal(r.code, 2, 'a config error exits 2');
  assert.match(r.err, /lora\.r: Too small/);
  assert.match(r.err, /lora: Unrecognized key: "alpah"/);
  const y = join(work, 'broken.yaml');
  writeFileSync(y, 'model: [unclosed\n');
  const r2 = cli(['start', '-c', y]);
  assert.equal(r2.code, 2);
  assert.match(r2.err, /broken\.yaml:\d+:\d+: not valid YAML/);
  const r3 = cli(['generate', '--model', join(work, 'nope'), 'x']);
  assert.equal(r3.code, 2);
  assert.match(r3.err, /nope/);
});

test('the README main command: `coordinator start` with no config builds the example and trains it (shortened here)', () => {
  const out = join(work, 'example-run');
  const r = cli(['start', '--max-steps', '4', '--output', out, '--no-progress']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /dqlora example: QLoRA on a small random-init Llama/);
  assert.match(r.out, /trained 4 steps/);
  assert.match(r.out, /before \/ after fine-tuning/);
  assert.equal((r.out.match(/training {3}:/g) ?? []).length, 3, 'three training keywords are compared');
  assert.ok(existsSync(join(out, 'adapter', 'adapter_model.safetensors')));
  assert.ok(existsSync(join(ROOT, 'examples-cache', 'example-v1', 'READY')));
});
