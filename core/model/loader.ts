// Loads the tensors one stage needs from a Hugging Face model directory, tensor by tensor: decoder linears are
// quantized to NF4 (+ double quantization) on the way in, or taken as they are from a pre-quantized
// bitsandbytes checkpoint, or (quantization: none) kept in full precision; norms, embeddings and the LM head are
// kept in full precision (spec §4.2).
import type { Backend, Tensor } from '../engine/backend.ts';
import { LoraParams, QLoraLinear, isDenseWeight, type BaseWeight } from '../engine/lora.ts';
import { DoraMagnitude, rowNormsSq } from '../engine/dora.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { isPrequantized, nf4FromRecords } from './bnb.ts';
import { loadModelConfig, type ModelConfig } from './config.ts';
import { LINEAR_MODULES, LlamaStage, hyperFor, isTargeted, type LayerWeights, type LinearModule, type LoraConfig, type StageSpec, type StageWeights } from './llama.ts';
import { FormatError, ShapeError, UnsupportedError } from '../../common/errors.ts';
import { modelNames, sliceRows } from './layout.ts';
import { logger } from '../../common/log.ts';

const log = logger('loader');

export interface LoadOptions {
  /** LoRA to create (fresh, PEFT init) on targeted modules; undefined = base model only. */
  readonly lora?: LoraConfig;
  /** Seed for the LoRA init. */
  readonly seed?: number;
  readonly blocksize?: number;
  readonly doubleQuant?: boolean;
  /**
   * 'nf4' (default): decoder linears are NF4 (QLoRA). 'none': they stay full precision ('act' tensors: f32 on cpu,
   * bf16 on cuda) — LoRA on an unquantized base, as PEFT without bitsandbytes. A pre-quantized checkpoint has no
   * full-precision weights to keep, so 'none' refuses it.
   */
  readonly quantization?: 'nf4' | 'none';
  readonly gradientCheckpointing?: boolean;
  /** NEFTune noise alpha for training (0/absent = off); see core/model/neftune.ts. */
  readonly neftuneAlpha?: number;
  /** DoRA (lora.use_dora): every LoRA module also gets PEFT's magnitude vector, initialised to ‖W‖_row. */
  readonly useDora?: boolean;
  /** LoRA+ (Hayou et al. 2024): B's learning rate = lr × this ratio; set on every LoraParams as `lrScaleB`. */
  readonly loraplusLrRatio?: number;
  /** Progress callback: tensors done / total. */
  readonly onProgress?: (done: number, total: number, name: string) => void;
}

/** Expected [out, in] of each decoder linear. */
export function linearShape(cfg: ModelConfig, m: LinearModule): [number, number] {
  const H = cfg.hiddenSize, D = cfg.headDim;
  switch (m) {
    case 'q_proj': return [cfg.numHeads * D, H];
    case 'k_proj': case 'v_proj': return [cfg.numKvHeads * D, H];
    case 'o_proj': return [H, cfg.numHeads * D];
    case 'gate_proj': case 'up_proj': return [cfg.intermediateSize, H];
    case 'down_proj': return [H, cfg.intermediateSize];
  }
}

function hasBias(cfg: ModelConfig, m: LinearModule): boolean {
  if (m === 'q_proj' || m === 'k_proj' || m === 'v_proj') return cfg.qkvBias;
  if (m === 'o_proj') return cfg.oBias;
  return cfg.mlpBias;
}

function sourceDtype(dt: string): 'bfloat16' | 'float16' | 'float32' {
  return dt === 'BF16' ? 'bfloat16' : dt === 'F16' ? 'float16' : 'float32';
}

/** Opens a model directory and builds the stage `spec` on backend `be`. */
export function loadStage(be: Backend, modelDir: string, spec: StageSpec, opts: LoadOptions = {}): LlamaStage {
  const cfg = loadModelConfig(modelDir);
  const w = ModelWeights.open(modelDir);
  try {
    const weights = loadStageWeights(be, cfg, w, spec, opts);
    return new LlamaStage(be, cfg, spec, weights, { gradientCheckpointing: opts.gradientCheckpointing ?? true, neftuneAlpha: opts.neftuneAlpha });
  } finally {
    w.close();
  }
}

export function loadStageWeights(be: Backend, cfg: ModelConfig, w: ModelWeights, spec: StageSpec, opts: LoadOptions): StageWeights {
  if (spec.firstLayer < 0 || spec.lastLayer > cfg.numLayers || spec.firstLayer > spec.lastLayer) {
    throw new ShapeError(`stage layers [${spec.firstLayer}, ${spec.lastLayer}) are outside the model's ${cfg.numLayers} layers`);
  }
  const H = cfg.hiddenSize;
  const nLayers = spec.lastLayer - spec.firstLayer;
  const total = nLayers * (2 + LINEAR_MODULES.length) + (spec.hasEmbedding ? 1 : 0) + (spec.hasHead ? 2 : 0);
  let done = 0;
  const progress = (name: string): void => { done++; opts.onProgress?.(done, total, name); };

  const dense = (name: string, shape: readonly number[]): Tensor => {
    if (!w.has(name)) throw new FormatError(`tensor '${name}' is missing from the checkpoint`, { hint: `is this a ${cfg.modelType} checkpoint in Hugging Face format?` });
    const info = w.info(name);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new ShapeError(`tensor '${name}' has shape [${info.shape}], config.json implies [${shape}]`, { hint: 'config.json and the weights disagree: wrong config or a truncated export?' });
    }
    const t = be.upload(w.readF32(name), shape, 'act');
    progress(name);
    return t;
  };

  const names = modelNames(cfg);
  let embed: Tensor | undefined;
  const needEmbedTable = spec.hasEmbedding || (spec.hasHead && cfg.tieWordEmbeddings);
  if (needEmbedTable) embed = dense(names.embed, [cfg.vocabSize, H]);

  const qo = { blocksize: opts.blocksize ?? 64, doubleQuant: opts.doubleQuant ?? true };
  const layers: LayerWeights[] = [];
  for (let l = spec.firstLayer; l < spec.lastLayer; l++) {
    const ln = names.layer(l);
    const inputNorm = dense(ln.inputNorm, [H]);
    const postNorm = dense(ln.postNorm, [H]);
    const linears = {} as Record<LinearModule, QLoraLinear>;
    const packed = new Map<string, Float32Array>();   // a packed module's full weight, read once per layer
    const loraOf = new Map<string, LoraParams>();     // a packed module's one LoRA, shared by its parts
    for (const m of LINEAR_MODULES) {
      const src = ln.linears[m];
      const path = src.module;
      const [out, inF] = linearShape(cfg, m);
      const total = src.rows?.total ?? out;
      const name = `${path}.weight`;
      let q: BaseWeight;
      const prequantized = isPrequantized(name, (n) => w.has(n));
      if (prequantized && opts.quantization === 'none') {
        throw new UnsupportedError(`'${name}' is stored pre-quantized (bitsandbytes NF4), so the model cannot be loaded unquantized (quantization: none)`, {
          hint: 'use the original full-precision checkpoint for quantization: none, or drop that setting (NF4 is the default)',
        });
      }
      if (prequantized) {
        if (src.rows || src.perm) throw new UnsupportedError(`pre-quantized '${name}' is a packed module (${cfg.modelType}); only unquantized ${cfg.modelType} checkpoints are supported`, { hint: 'load the original fp16/bf16 weights; they are quantized on the fly' });
        const nf4 = nf4FromRecords(name, (n) => {
          if (!w.has(n)) return undefined;
          const i = w.info(n);
          return { dtype: i.dtype, shape: i.shape, data: w.readRaw(n) };
        }, modelDir(w));
        if (nf4.shape[0] !== out || nf4.shape[1] !== inF) throw new ShapeError(`pre-quantized '${name}' has shape [${nf4.shape}], config.json implies [${out}, ${inF}]`);
        q = be.uploadNf4(nf4);
      } else {
        if (!w.has(name)) throw new FormatError(`tensor '${name}' is missing from the checkpoint`, { hint: `is this a ${cfg.modelType} checkpoint in Hugging Face format?` });
        const info = w.info(name);
        if (info.shape.length !== 2 || info.shape[0] !== total || info.shape[1] !== inF) throw new ShapeError(`tensor '${name}' has shape [${info.shape}], config.json implies [${total}, ${inF}]`);
        let full = packed.get(name);
        if (!full) { full = w.readF32(name); if (src.rows) packed.set(name, full); }
        // Packed modules are split (and q/k rows of interleaved-RoPE models permuted) before quantizing: with
        // in % blocksize == 0 no block crosses a row, so the 4-bit codes equal the packed weight's (the double-quant
        // offset is per part).
        const wdata = src.rows || src.perm ? sliceRows(full, inF, src.rows?.start ?? 0, src.rows?.end ?? out, src.perm) : full;
        if (opts.quantization === 'none') {
          q = be.upload(wdata, [out, inF], 'act');
        } else {
          const o = { ...qo, sourceDtype: sourceDtype(info.dtype), name: src.rows || src.perm ? `${name} (the ${m} part)` : name };
          const nf4 = be.quantizeNf4(wdata, [out, inF], o);
          q = be.uploadNf4(nf4);
        }
      }
      let bias: Tensor | undefined;
      if (hasBias(cfg, m)) {
        const bn = `${path}.bias`;
        if (!w.has(bn)) throw new FormatError(`tensor '${bn}' is missing from the checkpoint`, { hint: 'config.json says the projection has a bias' });
        const b = w.readF32(bn);
        if (b.length !== total) throw new ShapeError(`tensor '${bn}' has ${b.length} values, config.json implies ${total}`);
        bias = be.upload(src.rows || src.perm ? sliceRows(b, 1, src.rows?.start ?? 0, src.rows?.end ?? out, src.perm) : b, [out], 'act');
      }
      let lora = loraOf.get(path);
      if (!lora && opts.lora && isTargeted(path, opts.lora.targetModules)) {
        lora = LoraParams.init(be, path, inF, total, hyperFor(path, opts.lora), opts.seed ?? 0, src.loraRowPerm);
        if (opts.loraplusLrRatio !== undefined) lora.lrScaleB = opts.loraplusLrRatio;
        if (opts.useDora) {
          if (src.rows || src.loraRowPerm) throw new UnsupportedError(`DoRA (lora.use_dora) on '${path}': packed / row-permuted ${cfg.modelType} modules are not supported`, { hint: 'use plain LoRA for this model, or target only unpacked modules' });
          lora.magnitude = DoraMagnitude.init(be, baseWeightRowNormsSq(be, q));
        }
        loraOf.set(path, lora);
      }
      linears[m] = new QLoraLinear(be, src.rows ? `${path}[${src.rows.start}:${src.rows.end}]` : path, q, bias, lora, path, src.rows, src.loraRowPerm);
      progress(path);
    }
    layers.push({ inputNorm, postNorm, linears });
  }

  let finalNorm: Tensor | undefined, lmHead: Tensor | undefined;
  if (spec.hasHead) {
    finalNorm = dense(names.finalNorm, [H]);
    if (cfg.tieWordEmbeddings) { lmHead = embed; progress('lm_head (tied)'); }
    else lmHead = dense(names.lmHead, [cfg.vocabSize, H]);
  }
  log.debug({ spec, layers: nLayers, memory: be.memoryInUse() }, 'stage loaded');
  return { embed: spec.hasEmbedding ? embed : undefined, layers, finalNorm, lmHead };
}

/** ‖W_o‖² per output row of a base weight as the forward sees it (NF4: the dequantized values, as PEFT on bnb). */
export function baseWeightRowNormsSq(be: Backend, q: BaseWeight): Float64Array {
  const [out, inF] = q.shape;
  if (isDenseWeight(q)) return rowNormsSq(be.download(q) as Float32Array, out, inF);
  const t = be.dequantize(q);
  try { return rowNormsSq(be.download(t) as Float32Array, out, inF); } finally { be.free(t); }
}

function modelDir(w: ModelWeights): string {
  const names = w.names();
  return names.length ? w.info(names[0]).file : 'model';
}
