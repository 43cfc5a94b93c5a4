// Adapters on a device: a stage's LoRA weights to host copies, and a loaded PEFT adapter into a stage.
// The file format itself lives in common/peft.ts.
import { ShapeError, UnsupportedError } from '../../common/errors.ts';
import type { Backend } from '../engine/backend.ts';
import { LoraParams } from '../engine/lora.ts';
import type { LlamaStage } from './llama.ts';
import { LINEAR_MODULES, hyperFor } from './llama.ts';
import type { Adapter, LoraTensors } from '../../common/peft.ts';

export { saveAdapter, loadAdapter, loraDelta, adapterConfigJson, PEFT_VERSION, type LoraTensors, type Adapter } from '../../common/peft.ts';

/** Host copies of a stage's LoRA weights. */
export function stageLoraTensors(be: Backend, stage: LlamaStage): LoraTensors[] {
  return stage.loraParams().map((p) => ({
    path: p.name, r: p.hyper.r, inFeatures: p.inFeatures, outFeatures: p.outFeatures,
    A: be.download(p.A) as Float32Array, B: be.download(p.B) as Float32Array,
  }));
}

/**
 * Puts an adapter's weights into a stage (replacing any LoRA it had). Modules outside the stage's layers are
 * ignored (another stage holds them); a module this model does not have, or a shape mismatch, is an error.
 */
export function applyAdapter(be: Backend, stage: LlamaStage, adapter: Adapter, source: string): number {
  const known = new Map<string, { layerIdx: number; mod: (typeof LINEAR_MODULES)[number] }>();
  stage.weights.layers.forEach((lw, i) => { for (const m of LINEAR_MODULES) known.set(lw.linears[m].name, { layerIdx: i, mod: m }); });
  let applied = 0;
  for (const t of adapter.modules) {
    const lm = /^model\.layers\.(\d+)\./.exec(t.path);
    if (!lm) throw new UnsupportedError(`${source}: adapter module '${t.path}' is not a decoder linear (embeddings / lm_head adapters are not supported)`);
    const layer = Number(lm[1]);
    if (layer >= stage.cfg.numLayers) throw new ShapeError(`${source}: adapter has '${t.path}' but the model has ${stage.cfg.numLayers} layers`, { hint: 'was the adapter trained on another model?' });
    if (layer < stage.spec.firstLayer || layer >= stage.spec.lastLayer) continue;
    const k = known.get(t.path);
    if (!k) throw new ShapeError(`${source}: adapter module '${t.path}' does not exist in this model`, { hint: 'was the adapter trained on another architecture?' });
    const lin = stage.weights.layers[k.layerIdx].linears[k.mod];
    if (t.inFeatures !== lin.inFeatures || t.outFeatures !== lin.outFeatures) {
      throw new ShapeError(`${source}: expected lora_A [${t.r}, ${lin.inFeatures}] and lora_B [${lin.outFeatures}, ${t.r}] for ${t.path}, found [${t.r}, ${t.inFeatures}] and [${t.outFeatures}, ${t.r}]`, { hint: 'was the adapter trained on another model?' });
    }
    const hyper = { ...hyperFor(t.path, adapter.config), r: t.r };
    lin.lora?.free();
    lin.lora = new LoraParams(be, t.path, t.inFeatures, t.outFeatures, hyper, be.upload(t.A, [t.r, t.inFeatures], 'f32'), be.upload(t.B, [t.outFeatures, t.r], 'f32'));
    applied++;
  }
  return applied;
}

