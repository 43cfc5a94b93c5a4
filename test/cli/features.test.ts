// The issue-13 training features through `coordinator start` as a user runs them (real processes, real files):
// quantization: none + DoRA + LoRA+ + NEFTune + packing in one job trains, saves a PEFT DoRA adapter, and a run
// stopped after 2 steps and resumed from its checkpoint ends with the bit-identical adapter (DoRA magnitudes and their
// AdamW moments are checkpointed); packing changes only the padding: the adapter equals the unpacked run's (1e-5).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tinyExampleSetup } from '../helpers/tiny.ts';
import { loadAdapter } from '../../core/model/adapter.ts';

const ROOT = join(import.meta.dirname, '..', '..');
const BIN = join(ROOT, 'bin', 'coordinator.js');
const work = mkdtempSync(join(tmpdir(), 'dqlora-features-'));
const { trainPath } = tinyExampleSetup(work, { shape: { hiddenSize: 32, intermediateSize: 48, numLayers: 2 } });

function cli(args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: work, encoding: 'utf8', timeout: 300_000, env: { ...process.env, DQLORA_LOG_LEVEL: 'warn' } });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}
function job(name: string, extra: { data?: string; lora?: string; training?: string; top?: string }): string {
  const p = join(work, `${name}.yaml`);
  writeFileSync(p, [
    'model: model', `output_dir: ${name}`, 'backend: cpu', extra.top ?? '',
    `data: { train: ${trainPath}, max_length: 96, validation_split: 0${extra.data ?? ''} }`,
    `lora: { r: 4, alpha: 8, dropout: 0.1, target_modules: all-linear${extra.lora ?? ''} }`,
    `training: { max_steps: 4, micro_batch_size: 8, grad_accum: 1, lr: 3.0e-3, save_every: 2, seed: 5${extra.training ?? ''} }`, '',
  ].join('\n'));
  return p;
}
const maxDiff = (a: Float32Array, b: Float32Array): number => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);

test('quantization none + DoRA + LoRA+ + NEFTune + packing: trains, saves a PEFT DoRA adapter, resumes bit-identically', () => {
  const all = { top: 'quantization: none', data: ', packing: true', lora: ', use_dora: true, loraplus_lr_ratio: 4', training: ', neftune_noise_alpha: 5' };
  const a = cli(['start', '-c', job('full', all), '--no-progress']);
  assert.equal(a.code, 0, a.err);
  assert.match(a.out, /trained 4 steps/);
  const ad = loadAdapter(join(work, 'full', 'adapter'));
  assert.equal(ad.config.useDora, true);
  assert.equal(JSON.parse(readFileSync(join(work, 'full', 'adapter', 'adapter_config.json'), 'utf8')).use_dora, true);
  assert.ok(ad.modules.every((m) => m.magnitude && m.magnitude.length === m.outFeatures));

  const b1 = cli(['start', '-c', job('resumed', all), '--no-progress', '--stop-after', '2']);
  assert.equal(b1.code, 0, b1.err);
  const b2 = cli(['start', '-c', job('resumed', all), '--no-progress']);
  assert.equal(b2.code, 0, b2.err);
  assert.match(b2.out, /resumed from .*step-000002 at step 2\/4/);
  const bd = loadAdapter(join(work, 'resumed', 'adapter'));
  for (let i = 0; i < ad.modules.length; i++) {
    assert.deepEqual(bd.modules[i].A, ad.modules[i].A, `${ad.modules[i].path} A`);
    assert.deepEqual(bd.modules[i].B, ad.modules[i].B, `${ad.modules[i].path} B`);
    assert.deepEqual(bd.modules[i].magnitude, ad.modules[i].magnitude, `${ad.modules[i].path} magnitude`);
  }
});

test('data.packing trains the same adapter as without packing (1e-5), with LoRA dropout', () => {
  const p = cli(['start', '-c', job('packed', { data: ', packing: true' }), '--no-progress']);
  const u = cli(['start', '-c', job('unpacked', {}), '--no-progress']);
  assert.equal(p.code, 0, p.err); assert.equal(u.code, 0, u.err);
  const pa = loadAdapter(join(work, 'packed', 'adapter')), ua = loadAdapter(join(work, 'unpacked', 'adapter'));
  let worst = 0, scale = 0;
  for (let i = 0; i < pa.modules.length; i++) {
    worst = Math.max(worst, maxDiff(pa.modules[i].B, ua.modules[i].B), maxDiff(pa.modules[i].A, ua.modules[i].A));
    scale = Math.max(scale, ...ua.modules[i].B.map(Math.abs));
  }
  assert.ok(scale > 0);
  assert.ok(worst <= 1e-5 * Math.max(1, scale), `packed vs unpacked adapter: max difference ${worst}`);
});
