// Fuzzing the parsers this layer owns: job.yaml, PEFT adapter directories and checkpoint manifests. Every
// mutated input must either load correctly or fail with one of the project's named errors — never a crash, a
// hang or a TypeError from deep inside.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync, cpSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadJob } from '../../coordinator/job.ts';
import { loadAdapter, saveAdapter } from '../../core/model/adapter.ts';
import { loadCheckpoint, saveCheckpoint } from '../../common/checkpoint.ts';
import { DqloraError } from '../../common/errors.ts';
import { CounterRng } from '../../common/rng.ts';

const rng = new CounterRng(77, 1);
const work = mkdtempSync(join(tmpdir(), 'dqlora-fuzz-'));

function mutate(s: string, n: number): string {
  const chars = Array.from(s);
  for (let i = 0; i < n; i++) {
    const k = rng.int(4), at = rng.int(chars.length + 1);
    const junk = ['{', '}', '[', ']', ':', ',', '"', '\n', ' ', '-', '0', '1e999', 'null', 'true', '#', '\u0000', '\u00e9', '&a', '*a', '!!binary'][rng.int(20)];
    if (k === 0) chars.splice(at, 1);
    else if (k === 1) chars.splice(at, 0, junk);
    else if (k === 2) chars[at % chars.length] = junk;
    else chars.splice(at, rng.int(8));
  }
  return chars.join('');
}

function expectCleanFailure(fn: () => unknown, what: string): void {
  try { fn(); } catch (e) {
    assert.ok(e instanceof DqloraError, `${what}: threw ${(e as Error)?.constructor?.name}: ${(e as Error)?.message}`);
  }
}

test('fuzz job.yaml: 1500 mutations of a valid config load or fail with ConfigError', () => {
  const valid = [
    'name: kb', 'model: models/m', 'output_dir: runs/x', 'backend: cpu',
    'data:', '  train: data/train.jsonl', '  validation: data/val.jsonl', '  max_length: 256', '  dedup: true',
    'quantization: { blocksize: 64, double_quant: true }',
    'lora: { r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj] }',
    'training: { epochs: 2, micro_batch_size: 4, grad_accum: 2, lr: 2.0e-4, schedule: cosine, warmup_steps: 0.1 }',
    'compare: { prompts: ["a#b"], max_new_tokens: 16 }', '',
  ].join('\n');
  const p = join(work, 'job.yaml');
  writeFileSync(p, valid);
  assert.equal(loadJob(p).lora.r, 8);
  for (let i = 0; i < 1500; i++) {
    writeFileSync(p, mutate(valid, 1 + rng.int(6)));
    expectCleanFailure(() => loadJob(p), `mutation ${i}`);
  }
});

test('fuzz PEFT adapter_config.json: 800 mutations load or fail with a named error', () => {
  const dir = join(work, 'adapter');
  saveAdapter(dir, [{ path: 'model.layers.0.self_attn.q_proj', r: 2, inFeatures: 4, outFeatures: 4, A: new Float32Array(8).fill(0.5), B: new Float32Array(8).fill(0.25) }],
    { r: 2, alpha: 4, dropout: 0, useRslora: false, targetModules: ['q_proj'] }, null);
  const cfgPath = join(dir, 'adapter_config.json');
  const valid = readFileSync(cfgPath, 'utf8');
  assert.equal(loadAdapter(dir).modules.length, 1);
  for (let i = 0; i < 800; i++) {
    writeFileSync(cfgPath, mutate(valid, 1 + rng.int(5)));
    expectCleanFailure(() => loadAdapter(dir), `mutation ${i}`);
  }
  // Value-level fuzz: every field set to values of the wrong type.
  const obj = JSON.parse(valid) as Record<string, unknown>;
  for (const k of Object.keys(obj)) {
    for (const v of [null, -1, 'x', [], {}, 1e309, true]) {
      writeFileSync(cfgPath, JSON.stringify({ ...obj, [k]: v }));
      expectCleanFailure(() => loadAdapter(dir), `${k}=${JSON.stringify(v)}`);
    }
  }
});

test('fuzz adapter_model.safetensors: truncations and byte flips load or fail with a named error', () => {
  const dir = join(work, 'adapter2');
  saveAdapter(dir, [{ path: 'model.layers.1.mlp.down_proj', r: 2, inFeatures: 6, outFeatures: 3, A: new Float32Array(12).fill(1), B: new Float32Array(6).fill(2) }],
    { r: 2, alpha: 4, dropout: 0, useRslora: false, targetModules: ['down_proj'] }, null);
  const f = join(dir, 'adapter_model.safetensors');
  const good = readFileSync(f);
  for (let i = 0; i < 400; i++) {
    const b = Buffer.from(good);
    if (i % 3 === 0) { writeFileSync(f, b.subarray(0, rng.int(b.length))); }
    else { for (let k = 0; k < 1 + rng.int(4); k++) b[rng.int(b.length)] = rng.int(256); writeFileSync(f, b); }
    expectCleanFailure(() => loadAdapter(dir), `mutation ${i}`);
  }
});

test('fuzz checkpoint manifests and trainer state: corrupt files are refused with CheckpointError', () => {
  const out = join(work, 'ck');
  const modules = [{ path: 'model.layers.0.self_attn.v_proj', r: 2, inFeatures: 4, outFeatures: 2, A: new Float32Array(8), B: new Float32Array(4) }];
  const moments = [{ path: modules[0].path, mA: new Float32Array(8), vA: new Float32Array(8), mB: new Float32Array(4), vB: new Float32Array(4) }];
  const state = { step: 3, totalSteps: 9, stepsPerEpoch: 3, configHash: 'c', dataHash: 'd', history: [], evalHistory: [] };
  const dir = saveCheckpoint(out, { state, modules, moments, loraConfig: { r: 2, alpha: 2, dropout: 0, useRslora: false, targetModules: ['v_proj'] } }, 'm', 3);
  assert.equal(loadCheckpoint(dir).state.step, 3);
  const backup = join(work, 'ck-backup');
  cpSync(dir, backup, { recursive: true });
  for (const file of ['manifest.json', 'trainer_state.json', 'optimizer.safetensors', 'adapter/adapter_config.json']) {
    const valid = readFileSync(join(backup, file), 'latin1');
    for (let i = 0; i < 60; i++) {
      rmSync(dir, { recursive: true, force: true });
      cpSync(backup, dir, { recursive: true });
      writeFileSync(join(dir, file), mutate(valid, 1 + rng.int(4)), 'latin1');
      expectCleanFailure(() => loadCheckpoint(dir), `${file} mutation ${i}`);
    }
  }
});
