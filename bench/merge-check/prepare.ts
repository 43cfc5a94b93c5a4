// Prepares the GPU-machine check of `coordinator merge` (bench/merge-check/run.sh): a tiny Llama whose config.json
// is written as transformers 5 writes one (floats like 500000.0 and llama3's factor 8.0, "dtype": "float32"), a
// random PEFT adapter (B ≠ 0) on every linear, the merged model in bfloat16 and float32 (through the CLI, as a
// user runs it), and dqlora's own logits of the QLoRA model (NF4 base + adapter, fp32) on a fixed batch.
// check.py then loads both merged models with transformers and compares.
//   node --import tsx bench/merge-check/prepare.ts .merge-check
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import { writeRandomLlama, hfConfigJson, type TinyLlamaShape } from '../../coordinator/example/model.ts';
import { saveAdapter, type LoraTensors } from '../../common/peft.ts';
import { CounterRng } from '../../common/rng.ts';
import { createBackend } from '../../core/engine/index.ts';
import { loadModelConfig } from '../../core/model/config.ts';
import { loadStage } from '../../core/model/loader.ts';
import { applyAdapter, loadAdapter } from '../../core/model/adapter.ts';
import { fullModelSpec, LINEAR_MODULES } from '../../core/model/llama.ts';

const out = resolve(process.argv[2] ?? '.merge-check');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const model = join(out, 'model'), adapterDir = join(out, 'adapter');

const shape: TinyLlamaShape = {
  hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2, vocabSize: 256,
  maxPositionEmbeddings: 131072, tieWordEmbeddings: false, bosTokenId: 1, eosTokenId: 2, padTokenId: 0, embedStd: 0.5,
};
writeRandomLlama(model, shape, 11);
// config.json as transformers 5.17 writes it (json.dumps(indent=2, sort_keys=True)): Python floats keep their '.0'.
const cfg = { ...hfConfigJson(shape), dtype: 'float32', rope_scaling: { factor: 8, high_freq_factor: 4, low_freq_factor: 1, original_max_position_embeddings: 8192, rope_type: 'llama3' }, rope_theta: 500000 } as Record<string, unknown>;
delete cfg.torch_dtype;
const sorted = Object.fromEntries(Object.keys(cfg).sort().map((k) => [k, cfg[k]]));
const text = JSON.stringify(sorted, null, 2)
  .replace('"rope_theta": 500000', '"rope_theta": 500000.0').replace('"factor": 8', '"factor": 8.0')
  .replace('"high_freq_factor": 4', '"high_freq_factor": 4.0').replace('"low_freq_factor": 1', '"low_freq_factor": 1.0');
writeFileSync(join(model, 'config.json'), text + '\n');

// A random adapter with B ≠ 0 on every linear (r 8, alpha 16), so the merge changes every weight.
const rng = new CounterRng(5, 1);
const H = shape.hiddenSize, I = shape.intermediateSize, KV = shape.numKvHeads * (H / shape.numHeads), r = 8;
const dims: Record<string, [number, number]> = { q_proj: [H, H], k_proj: [KV, H], v_proj: [KV, H], o_proj: [H, H], gate_proj: [I, H], up_proj: [I, H], down_proj: [H, I] };
const modules: LoraTensors[] = [];
for (let l = 0; l < shape.numLayers; l++) {
  for (const m of LINEAR_MODULES) {
    const [o, i] = dims[m];
    const path = `model.layers.${l}.${['gate_proj', 'up_proj', 'down_proj'].includes(m) ? 'mlp' : 'self_attn'}.${m}`;
    modules.push({ path, r, inFeatures: i, outFeatures: o, A: Float32Array.from({ length: r * i }, () => (rng.next() * 2 - 1) / Math.sqrt(i)), B: Float32Array.from({ length: o * r }, () => rng.normal() * 0.05) });
  }
}
saveAdapter(adapterDir, modules, { r, alpha: 16, dropout: 0, useRslora: false, targetModules: 'all-linear' }, model);

const cli = (args: string[]): void => {
  const p = spawnSync(process.execPath, [join(import.meta.dirname, '..', '..', 'bin', 'coordinator.js'), ...args], { encoding: 'utf8' });
  if (p.status !== 0) throw new Error(`coordinator ${args.join(' ')} failed (${p.status}):\n${p.stderr}`);
  process.stdout.write(p.stdout);
};
cli(['merge', '--model', model, '--adapter', adapterDir, '--out', join(out, 'merged-bf16'), '--dtype', 'bfloat16']);
cli(['merge', '--model', model, '--adapter', adapterDir, '--out', join(out, 'merged-f32'), '--dtype', 'float32']);

// dqlora's logits of the QLoRA model the adapter belongs to (NF4 base with double quant + LoRA, fp32 CPU backend).
const be = await createBackend('cpu');
const stage = loadStage(be, model, fullModelSpec(loadModelConfig(model)));
applyAdapter(be, stage, loadAdapter(adapterDir), adapterDir);
const T = 24, ids = Int32Array.from({ length: T }, (_, t) => (7 + t * 37) % shape.vocabSize);
const logits = stage.logitsAt({ B: 1, T, ids, keyMask: new Int32Array(T).fill(1), positions: Int32Array.from({ length: T }, (_, t) => t), sampleIds: new Int32Array(1) }, undefined, [...Array(T).keys()]);
writeFileSync(join(out, 'dqlora_logits.json'), JSON.stringify({ ids: [...ids], logits: logits.map((row) => [...row]) }));
console.log(`prepared ${out}: model, adapter (${modules.length} modules), merged-bf16, merged-f32, dqlora_logits.json (${T} × ${shape.vocabSize})`);
