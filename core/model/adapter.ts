// Adapters on a device: a stage's LoRA weights to host copies, and a loaded PEFT adapter into a stage.
// The file format itself lives in common/peft.ts.
import { ShapeError, UnsupportedError } from '../../common/errors.ts';
import type { Backend } from '../engine/backend.ts';
import { LoraParams, type QLoraLinear } from '../engine/lora.ts';
import type { LlamaStage } from './llama.ts';
import { DoraMagnitude } from '../engine/dora.ts';
import { baseWeightRowNormsSq } from './loader.ts';
import { LINEAR_MODULES, hyperFor } from './llama.ts';
import type { Adapter, LoraTensors } from '../../common/peft.ts';

export { saveAdapter, loadAdapter, loraDelta, adapterConfigJson, PEFT_VERSION, type LoraTensors, type Adapter } from '../../common/peft.ts';

/** Host copies of a stage's LoRA weights. */
export function stageLoraTensors(be: Backend, stage: LlamaStage): LoraTensors[] {
  void be;
  return stage.loraParams().map((p) => {
    const h = p.hostState(false);
    return { path: p.name, r: p.hyper.r, inFeatures: p.inFeatures, outFeatures: p.outFeatures, A: h.A, B: h.B, ...(h.magnitude ? { magnitude: h.magnitude } : {}) };
  });
}

/**
 * Puts an adapter's weights into a stage (replacing any LoRA it had). Modules outside the stage's layers are
 * ignored (another stage holds them); a module this model does not have, or a shape mismatch, is an error.
 * A packed checkpoint module (ChatGLM's query_key_value) feeds several linears of the stage, which share it.
 */
export function applyAdapter(be: Backend, stage: LlamaStage, adapter: Adapter, source: string): number {
  const groups = new Map<string, QLoraLinear[]>();
  for (const lw of stage.weights.layers) for (const m of LINEAR_MODULES) {
    const lin = lw.linears[m];
    const g = groups.get(lin.loraPath) ?? [];
    g.push(lin);
    groups.set(lin.loraPath, g);
  }
  let applied = 0;
  for (const t of adapter.modules) {
    const lm = /(?:^|\.)layers\.(\d+)\./.exec(t.path);
    if (!lm) throw new UnsupportedError(`${source}: adapter module '${t.path}' is not a decoder linear (embeddings / lm_head adapters are not supported)`);
    const layer = Number(lm[1]);
    if (layer >= stage.cfg.numLayers) throw new ShapeError(`${source}: adapter has '${t.path}' but the model has ${stage.cfg.numLayers} layers`, { hint: 'was the adapter trained on another model?' });
    if (layer < stage.spec.firstLayer || layer >= stage.spec.lastLayer) continue;
    const parts = groups.get(t.path);
    if (!parts) throw new ShapeError(`${source}: adapter module '${t.path}' does not exist in this model`, { hint: 'was the adapter trained on another architecture?' });
    const inF = parts[0].inFeatures;
    const outF = parts[0].loraRows ? parts[0].loraRows.total : parts[0].outFeatures;
    if (t.inFeatures !== inF || t.outFeatures !== outF) {
      throw new ShapeError(`${source}: expected lora_A [${t.r}, ${inF}] and lora_B [${outF}, ${t.r}] for ${t.path}, found [${t.r}, ${t.inFeatures}] and [${t.outFeatures}, ${t.r}]`, { hint: 'was the adapter trained on another model?' });
    }
    const hyper = { ...hyperFor(t.path, adapter.config), r: t.r };
    parts[0].lora?.free();
    const p = new LoraParams(be, t.path, inF, outF, hyper, be.zeros([t.r, inF], 'f32'), be.zeros([outF, t.r], 'f32'), parts[0].loraRowPerm);
    if (t.magnitude) {
      if (parts.length > 1 || parts[0].loraRowPerm) throw new UnsupportedError(`${source}: DoRA on the packed module '${t.path}' is not supported`);
      p.magnitude = DoraMagnitude.init(be, baseWeightRowNormsSq(be, parts[0].weight));
    }
    p.setHostState({ A: t.A, B: t.B, magnitude: t.magnitude });
    for (const lin of parts) lin.lora = p;
    applied++;
  }
  return applied;
}
