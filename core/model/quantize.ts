// `quantize`: turns a Hugging Face model directory into a pre-quantized bitsandbytes NF4 checkpoint (the format
// transformers writes with `save_pretrained` after `load_in_4bit`), so workers — or transformers itself — load
// 4-bit weights directly instead of quantizing on every start.
//
// Quantized: the weight of every nn.Linear inside the decoder layers (Llama / Mistral / Qwen2 naming, see
// LINEAR_WEIGHT). Kept byte for byte with their dtype: embeddings, norms, biases, lm_head — what transformers'
// bitsandbytes integration leaves unquantized by default for these architectures.

import fs from 'node:fs';
import path from 'node:path';
import { writeShardedSafetensors, type TensorRecord, type StDtype } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { writeFileAtomic } from '../../common/fs-atomic.ts';
import { ConfigError, FormatError, UnsupportedError } from '../../common/errors.ts';
import { quantizeNf4, type SourceDtype } from '../engine/nf4.ts';
import { bnbQuantizationConfig, nf4ToRecords, quantizationConfigJson } from './bnb.ts';

/** model.layers.N.(self_attn.(q|k|v|o)_proj | mlp.(gate|up|down)_proj).weight → group 1 = module path. */
const LINEAR_WEIGHT = /^(model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.weight$/;

/** Files besides weights and config.json that make the output a usable model directory. Copied when present. */
const COPIED_FILES = [
  'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json', 'tokenizer.model',
  'added_tokens.json', 'vocab.json', 'merges.txt', 'chat_template.jinja', 'chat_template.json',
];

const CONFIG_FILE = 'config.json';
const WEIGHT_FILE_RE = /^(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)$/;

/** HF's default shard size for save_pretrained ("5GB"). */
const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

const SOURCE_DTYPE: Partial<Record<string, SourceDtype>> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };

export interface QuantizeCheckpointOptions {
  /** NF4 blocksize (default 64). */
  blocksize?: number;
  /** Double quantization of the block scales (default true, as in QLoRA). */
  doubleQuant?: boolean;
  /** bnb_4bit_compute_dtype recorded in quantization_config (default 'bfloat16', QLoRA's choice). */
  computeDtype?: 'bfloat16' | 'float16' | 'float32';
  /** Replace an earlier quantize output in outDir (default false: refused). */
  force?: boolean;
  /** Shard size limit of the written safetensors (default 5 GB, like save_pretrained). */
  maxShardBytes?: number;
  /** Called after each tensor: tensors done, tensors in total, the tensor just handled. */
  onProgress?: (done: number, total: number, name: string) => void;
}

export interface QuantizeSummary {
  /** Linear weights quantized to NF4. */
  quantized: number;
  /** Tensors copied unchanged. */
  kept: number;
  /** Bytes of tensor data read / written. */
  bytesIn: number;
  bytesOut: number;
}

/** Reads and parses `dir/config.json` as a JSON object; returns the text too (it is edited textually). */
function readConfig(dir: string): { text: string; json: Record<string, unknown> } {
  const p = path.join(dir, CONFIG_FILE);
  let text: string;
  try {
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    throw new FormatError(`cannot read ${p}: ${(e as Error).message}`, { cause: e, hint: 'point quantize at a Hugging Face model directory (config.json + *.safetensors)' });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(`${p} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new FormatError(`${p} must hold a JSON object`);
  return { text, json: json as Record<string, unknown> };
}

/**
 * config.json with `"quantization_config": {...}` appended as the last key. Edited as text so every other byte
 * stays as Python wrote it (JSON.parse + stringify would turn `10000.0` into `10000`, an int to transformers).
 */
function withQuantizationConfig(text: string, json: Record<string, unknown>, qc: Record<string, unknown>): string {
  const end = text.lastIndexOf('}');
  const body = quantizationConfigJson(qc, 2).replace(/\n/g, '\n  ');
  const head = text.slice(0, end).trimEnd();
  const sep = Object.keys(json).length === 0 ? '' : ',';
  return `${head}${sep}\n  "quantization_config": ${body}\n${text.slice(end)}`;
}

/**
 * Checks that outDir may be written: absent, empty, or — with `force` — a previous quantize output (only files
 * quantize writes, and a config.json with a bitsandbytes quantization_config). Anything else is refused, never
 * overwritten.
 */
function checkOutDir(modelDir: string, outDir: string, force: boolean): void {
  if (fs.existsSync(outDir) && fs.realpathSync(outDir) === fs.realpathSync(modelDir)) {
    throw new ConfigError(`quantize: the output directory ${outDir} is the model directory itself`, { hint: 'choose a new, empty output directory' });
  }
  if (fs.existsSync(outDir) && !fs.statSync(outDir).isDirectory()) {
    throw new ConfigError(`quantize: the output ${outDir} is a file, not a directory`, { hint: 'choose a new output directory, or move the file away' });
  }
  let entries: string[];
  try {
    entries = fs.readdirSync(outDir);
  } catch {
    return; // does not exist yet
  }
  if (entries.length === 0) return;
  const foreign = entries.filter((f) => f !== CONFIG_FILE && !COPIED_FILES.includes(f) && !WEIGHT_FILE_RE.test(f));
  let previous = false;
  if (foreign.length === 0 && entries.includes(CONFIG_FILE)) {
    try {
      const qc = readConfig(outDir).json.quantization_config as Record<string, unknown> | undefined;
      previous = qc?.quant_method === 'bitsandbytes' && qc?.bnb_4bit_quant_type === 'nf4';
    } catch {
      previous = false;
    }
  }
  if (previous && !force) {
    throw new ConfigError(`quantize: ${outDir} already holds a quantized model (an earlier quantize output)`, {
      hint: 'pass --force to replace it, or choose a new output directory',
    });
  }
  if (!previous) {
    throw new ConfigError(`quantize: the output directory ${outDir} is not empty and is not an earlier quantize output (it holds ${entries.slice(0, 5).join(', ')}${entries.length > 5 ? ', ...' : ''})`, {
      hint: 'choose a new or empty output directory, or delete this one first',
    });
  }
}

/** A Buffer as a plain Uint8Array view (the pinned @types/node Buffer does not type-check as one). */
function asBytes(b: Buffer): Uint8Array {
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/**
 * Quantizes the decoder-layer Linear weights of the model in `modelDir` to NF4 (double-quantized by default)
 * and writes a complete model directory to `outDir`: safetensors in the bitsandbytes format, config.json with
 * quantization_config, tokenizer and generation files copied. Throws ConfigError for an already quantized
 * model or an occupied outDir, FormatError for unreadable inputs.
 */
export async function quantizeCheckpoint(modelDir: string, outDir: string, opts: QuantizeCheckpointOptions = {}): Promise<QuantizeSummary> {
  const { text: configText, json: config } = readConfig(modelDir);
  if (config.quantization_config !== undefined) {
    const method = (config.quantization_config as Record<string, unknown> | null)?.quant_method;
    throw new ConfigError(`quantize: ${path.join(modelDir, CONFIG_FILE)} already has a quantization_config (quant_method ${JSON.stringify(method)}); the model is already quantized`, {
      hint: 'pass the original (bf16/fp16/fp32) model directory; pre-quantized NF4 checkpoints can be trained on directly',
    });
  }
  const blocksize = opts.blocksize ?? 64;
  const doubleQuant = opts.doubleQuant ?? true;
  const qc = bnbQuantizationConfig({ computeDtype: opts.computeDtype ?? 'bfloat16', doubleQuant });

  const weights = ModelWeights.open(modelDir);
  try {
    const names = weights.names();
    const prequant = names.find((n) => /\.quant_state\.bitsandbytes__(nf4|fp4)$/.test(n));
    if (prequant) {
      throw new ConfigError(`quantize: ${modelDir} is already a pre-quantized bitsandbytes checkpoint (it holds '${prequant}')`, {
        hint: 'pass the original (bf16/fp16/fp32) model directory',
      });
    }
    if (!names.some((n) => LINEAR_WEIGHT.test(n))) {
      throw new UnsupportedError(`quantize: no decoder Linear weights (model.layers.N.self_attn.q_proj.weight, ...) in ${modelDir} (architectures ${JSON.stringify(config.architectures ?? null)})`, {
        hint: 'quantize supports Llama, Mistral and Qwen2 style checkpoints',
      });
    }
    checkOutDir(modelDir, outDir, opts.force ?? false);

    const records: TensorRecord[] = [];
    const summary: QuantizeSummary = { quantized: 0, kept: 0, bytesIn: 0, bytesOut: 0 };
    for (const [k, name] of names.entries()) {
      const info = weights.info(name);
      summary.bytesIn += info.byteLength;
      const m = LINEAR_WEIGHT.exec(name);
      if (m) {
        const src = SOURCE_DTYPE[info.dtype];
        if (!src || info.shape.length !== 2) {
          throw new UnsupportedError(`quantize: Linear weight '${name}' is ${info.dtype} [${info.shape.join(', ')}] in ${info.file}; expected a 2-D F32/F16/BF16 tensor`);
        }
        const q = quantizeNf4(weights.readF32(name), [info.shape[0], info.shape[1]], { blocksize, doubleQuant, sourceDtype: src, name: `${name} (${info.file})` });
        for (const r of nf4ToRecords(m[1], q)) records.push(r);
        summary.quantized++;
      } else {
        const dtype = info.dtype as StDtype;
        if (!['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL'].includes(dtype)) {
          throw new UnsupportedError(`quantize: tensor '${name}' has dtype ${info.dtype}, which cannot be copied into the output`);
        }
        records.push({ name, dtype, shape: info.shape, data: weights.readRaw(name) });
        summary.kept++;
      }
      opts.onProgress?.(k + 1, names.length, name);
      // Lets progress output and signals through between tensors of a long run.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    for (const r of records) summary.bytesOut += r.data.byteLength;

    fs.mkdirSync(outDir, { recursive: true });
    // transformers refuses safetensors whose metadata lacks format "pt".
    writeShardedSafetensors(outDir, records, { maxShardBytes: opts.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES, metadata: { format: 'pt' } });
    for (const f of COPIED_FILES) {
      const src = path.join(modelDir, f);
      const dst = path.join(outDir, f);
      if (fs.existsSync(src)) writeFileAtomic(dst, [asBytes(fs.readFileSync(src))]);
      else if (fs.existsSync(dst)) fs.unlinkSync(dst); // stale file of an earlier quantize run
    }
    // config.json last: its quantization_config marks the directory as a finished quantize output.
    writeFileAtomic(path.join(outDir, CONFIG_FILE), [asBytes(Buffer.from(withQuantizationConfig(configText, config, qc), 'utf8'))]);
    return summary;
  } finally {
    weights.close();
  }
}
