// `coordinator merge`: folds a LoRA adapter into the base weights and writes a plain HF checkpoint (bf16/f16/f32).
//
// Which base? The adapter was trained against dequant(NF4(W)), not W (spec §12 pitfall 2). `--base dequantized`
// (default) merges into exactly the weights training saw, so the merged model reproduces the QLoRA model's outputs;
// `--base original` merges into the unquantized W (what PEFT's merge_and_unload does on a 16-bit base) and adds the
// quantization error back. Tensor by tensor; the whole output is held in memory once before writing.
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeShardedSafetensors, type TensorRecord } from '../common/safetensors.ts';
import { ModelWeights } from '../common/model-weights.ts';
import { f32ToBf16, f32ToF16 } from '../common/halfprec.ts';
import { loadAdapter, loraDelta } from '../core/model/adapter.ts';
import { hyperFor } from '../core/model/llama.ts';
import { loraScale } from '../core/engine/lora.ts';
import { quantizeNf4, dequantizeNf4 } from '../core/engine/nf4.ts';
import { isPrequantized, nf4FromRecords } from '../core/model/bnb.ts';
import { loadModelConfig } from '../core/model/config.ts';
import { ConfigError, FormatError, ShapeError } from '../common/errors.ts';
import { JsonNumber, parseJsonText, stringifyJsonText, type JsonText } from '../common/json-text.ts';

export interface MergeOptions {
  readonly dtype: 'bfloat16' | 'float16' | 'float32';
  readonly base: 'dequantized' | 'original';
  readonly blocksize?: number;
  readonly doubleQuant?: boolean;
  readonly maxShardBytes?: number;
  readonly onProgress?: (done: number, total: number, name: string) => void;
}

const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json', 'tokenizer.model', 'chat_template.jinja'];

export function mergeAdapter(modelDir: string, adapterDir: string, outDir: string, o: MergeOptions): { merged: number; tensors: number } {
  if (existsSync(join(outDir, 'config.json'))) throw new ConfigError(`${outDir} already holds a model`, { hint: 'choose an empty --out directory' });
  const cfg = loadModelConfig(modelDir);
  const configText = mergedConfigText(readFileSync(join(modelDir, 'config.json'), 'utf8'), o.dtype, join(modelDir, 'config.json')); // fails before the slow part
  const adapter = loadAdapter(adapterDir);
  const byPath = new Map(adapter.modules.map((m) => [m.path, m]));
  const w = ModelWeights.open(modelDir);
  const records: TensorRecord[] = [];
  const st = o.dtype === 'bfloat16' ? 'BF16' : o.dtype === 'float16' ? 'F16' : 'F32';
  const encode = (x: Float32Array): Float32Array | Uint16Array => (o.dtype === 'bfloat16' ? f32ToBf16(x) : o.dtype === 'float16' ? f32ToF16(x) : x);
  let merged = 0;
  try {
    // Logical tensor names: pre-quantized checkpoints store W as packed bytes plus quant-state keys.
    const names = w.names().filter((n) => !/\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$/.test(n));
    names.forEach((name, i) => {
      const path = name.replace(/\.weight$/, '');
      const pre = isPrequantized(name, (n) => w.has(n));
      let x: Float32Array, shape: number[];
      if (pre) {
        const q = nf4FromRecords(name, (n) => (w.has(n) ? { dtype: w.info(n).dtype, shape: w.info(n).shape, data: w.readRaw(n) } : undefined), modelDir);
        x = dequantizeNf4(q); shape = [...q.shape];
      } else {
        x = w.readF32(name); shape = w.info(name).shape;
      }
      const lora = byPath.get(path);
      if (lora) {
        if (shape.length !== 2 || shape[0] !== lora.outFeatures || shape[1] !== lora.inFeatures) throw new ShapeError(`adapter module ${path} is [${lora.outFeatures}, ${lora.inFeatures}] but the weight is [${shape}]`);
        if (!pre && o.base === 'dequantized') x = dequantizeNf4(quantizeNf4(x, [shape[0], shape[1]], { blocksize: o.blocksize ?? 64, doubleQuant: o.doubleQuant ?? true, name }));
        const delta = loraDelta(lora, loraScale({ ...hyperFor(path, adapter.config), r: lora.r }));
        for (let k = 0; k < x.length; k++) x[k] += delta[k];
        merged++;
      }
      const floatName = w.info(name).dtype.startsWith('F') || w.info(name).dtype === 'BF16' || pre;
      records.push(floatName ? { name, dtype: st, shape, data: encode(x) } : { name, dtype: w.info(name).dtype as TensorRecord['dtype'], shape, data: w.readRaw(name) });
      o.onProgress?.(i + 1, names.length, name);
    });
  } finally {
    w.close();
  }
  if (merged !== adapter.modules.length) throw new ShapeError(`only ${merged} of the adapter's ${adapter.modules.length} modules were found in ${modelDir}`, { hint: 'was the adapter trained on another model?' });
  mkdirSync(outDir, { recursive: true });
  writeShardedSafetensors(outDir, records, { maxShardBytes: o.maxShardBytes ?? 4_000_000_000, metadata: { format: 'pt' } });
  writeFileSync(join(outDir, 'config.json'), configText);
  for (const f of TOKENIZER_FILES) if (existsSync(join(modelDir, f))) copyFileSync(join(modelDir, f), join(outDir, f));
  void cfg;
  return { merged, tensors: records.length };
}

/**
 * The merged model's config.json: the source's, without quantization_config, with the merged dtype under BOTH
 * keys transformers reads — `dtype` (transformers ≥ 4.56 / 5 write and prefer it) and `torch_dtype` (what 4.x
 * reads) — so every version loads the weights in the dtype they are stored in, and no stale key (a source
 * `"dtype": "float32"` beside a new `"torch_dtype": "bfloat16"`) contradicts the other. Every other byte of
 * meaning is kept: numbers keep their source text, so `1000000.0` stays a float (rewriting it as 1000000 makes
 * rope_theta an int to transformers, and llama3's rope_scaling.factor 8.0 an int).
 */
export function mergedConfigText(sourceText: string, dtype: MergeOptions['dtype'], source = 'config.json'): string {
  let cfg: JsonText;
  try {
    cfg = parseJsonText(sourceText);
  } catch (e) {
    throw new FormatError(`${source}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
  if (cfg === null || typeof cfg !== 'object' || Array.isArray(cfg) || cfg instanceof JsonNumber) throw new FormatError(`${source} must hold a JSON object`);
  delete cfg.quantization_config;
  cfg.dtype = dtype;
  cfg.torch_dtype = dtype;
  return stringifyJsonText(cfg, 2) + '\n';
}
