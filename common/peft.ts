// PEFT adapter files (qlora-spec §6): adapter_config.json + adapter_model.safetensors, key names like
// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, loadable by PEFT and vLLM; adapters saved by
// PEFT load here. A reader ignores unknown config keys and defaults missing ones. Pure file format (no tensors on a
// device), shared by the coordinator (which writes adapters and checkpoints) and the workers (which read them).
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync, openSync, fsyncSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { SafetensorsFile, writeSafetensors, type TensorRecord } from './safetensors.ts';
import { FormatError, ShapeError, UnsupportedError } from './errors.ts';

/** LoRA settings as in PEFT's LoraConfig (the subset that changes training). */
export interface LoraConfig {
  readonly r: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly useRslora: boolean;
  /** Module names (matched like PEFT: exact name or path suffix) or 'all-linear' (every decoder linear, never lm_head). */
  readonly targetModules: readonly string[] | 'all-linear';
  readonly rankPattern?: Readonly<Record<string, number>>;
  readonly alphaPattern?: Readonly<Record<string, number>>;
  /** DoRA (PEFT use_dora): modules carry a magnitude vector `lora_magnitude_vector` [out]. */
  readonly useDora?: boolean;
}

export const PEFT_VERSION = '0.21.0';
const KEY_PREFIX = 'base_model.model.';

/** One module's adapter weights on the host. */
export interface LoraTensors {
  /** HF module path, e.g. model.layers.0.self_attn.q_proj */
  readonly path: string;
  readonly A: Float32Array; // [r, in]
  readonly B: Float32Array; // [out, r]
  readonly r: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** DoRA magnitude [out] (saved as `<path>.lora_magnitude_vector`), present iff the adapter uses DoRA. */
  readonly magnitude?: Float32Array;
}

export interface Adapter {
  readonly config: LoraConfig;
  readonly baseModel: string | null;
  readonly modules: LoraTensors[];
}

/** adapter_config.json exactly as peft 0.21 writes it (sorted keys, indent 2). */
export function adapterConfigJson(cfg: LoraConfig, baseModel: string | null, presentModules: string[]): string {
  const targets = cfg.targetModules === 'all-linear'
    ? [...new Set(presentModules.map((p) => p.split('.').pop()!))].sort()
    : [...cfg.targetModules];
  const obj: Record<string, unknown> = {
    alora_invocation_tokens: null, alpha_pattern: cfg.alphaPattern ?? {}, arrow_config: null, auto_mapping: null,
    base_model_name_or_path: baseModel, bias: 'none', corda_config: null, ensure_weight_tying: false, eva_config: null,
    exclude_modules: null, fan_in_fan_out: false, inference_mode: true, init_lora_weights: true, kasa_config: null,
    layer_replication: null, layers_pattern: null, layers_to_transform: null, loftq_config: {}, lora_alpha: cfg.alpha,
    lora_bias: false, lora_dropout: cfg.dropout, lora_ga_config: null, megatron_config: null, megatron_core: 'megatron.core',
    modules_to_save: null, monteclora_config: null, peft_type: 'LORA', peft_version: PEFT_VERSION, qalora_group_size: 16,
    r: cfg.r, rank_pattern: cfg.rankPattern ?? {}, revision: null, target_modules: targets, target_parameters: null,
    task_type: 'CAUSAL_LM', trainable_token_indices: null, use_bdlora: null, use_dora: cfg.useDora === true, use_qalora: false,
    use_rslora: cfg.useRslora, velora_config: null,
  };
  const sorted: Record<string, unknown> = {};
  for (const k of Object.keys(obj).sort()) sorted[k] = obj[k];
  return JSON.stringify(sorted, null, 2);
}

/**
 * Writes a PEFT adapter directory atomically (a temp dir renamed into place): adapter_config.json,
 * adapter_model.safetensors (F32, metadata {format: pt}) and a short README.md model card.
 */
export function saveAdapter(dir: string, modules: LoraTensors[], cfg: LoraConfig, baseModel: string | null): void {
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const records: TensorRecord[] = [];
  for (const m of [...modules].sort((a, b) => a.path.localeCompare(b.path))) {
    records.push({ name: `${KEY_PREFIX}${m.path}.lora_A.weight`, dtype: 'F32', shape: [m.r, m.inFeatures], data: m.A });
    records.push({ name: `${KEY_PREFIX}${m.path}.lora_B.weight`, dtype: 'F32', shape: [m.outFeatures, m.r], data: m.B });
    if (m.magnitude) records.push({ name: `${KEY_PREFIX}${m.path}.lora_magnitude_vector`, dtype: 'F32', shape: [m.outFeatures], data: m.magnitude });
  }
  writeSafetensors(join(tmp, 'adapter_model.safetensors'), records, { format: 'pt' });
  writeDurable(join(tmp, 'adapter_config.json'), adapterConfigJson(cfg, baseModel, modules.map((m) => m.path)) + '\n');
  writeDurable(join(tmp, 'README.md'), [
    '---', `base_model: ${baseModel ?? 'unknown'}`, 'library_name: peft', 'tags: [lora, qlora, dqlora]', '---', '',
    '# LoRA adapter', '', `Trained with dqlora (QLoRA: NF4 base with double quantization). r=${cfg.r}, alpha=${cfg.alpha},`,
    `dropout=${cfg.dropout}, target modules: ${cfg.targetModules === 'all-linear' ? 'all-linear' : cfg.targetModules.join(', ')}.`,
    'Load with `PeftModel.from_pretrained(base, this_dir)` or `coordinator generate --adapter this_dir`.', '',
  ].join('\n'));
  if (existsSync(dir)) rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
}

function writeDurable(path: string, text: string): void {
  writeFileSync(path, text);
  const fd = openSync(path, 'r'); fsyncSync(fd); closeSync(fd);
}

/** Reads a PEFT LoRA adapter directory (safetensors form). */
export function loadAdapter(dir: string): Adapter {
  const cfgPath = join(dir, 'adapter_config.json');
  if (!existsSync(cfgPath)) throw new FormatError(`${cfgPath} not found`, { hint: 'an adapter directory holds adapter_config.json and adapter_model.safetensors' });
  let raw: Record<string, unknown>;
  try { raw = JSON.parse(readFileSync(cfgPath, 'utf8')); } catch (e) { throw new FormatError(`${cfgPath}: not valid JSON (${(e as Error).message})`); }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new FormatError(`${cfgPath}: expected a JSON object`);
  const peftType = raw.peft_type ?? 'LORA';
  if (peftType !== 'LORA') throw new UnsupportedError(`${cfgPath}: peft_type '${String(peftType)}' is not supported (only LORA)`);
  if (raw.bias !== undefined && raw.bias !== 'none') throw new UnsupportedError(`${cfgPath}: bias='${String(raw.bias)}' is not supported (only 'none')`);
  if (raw.modules_to_save) throw new UnsupportedError(`${cfgPath}: modules_to_save is not supported`);
  const num = (k: string, d: number): number => {
    const v = raw[k];
    if (v === undefined || v === null) return d;
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new FormatError(`${cfgPath}: '${k}' must be a number, got ${JSON.stringify(v)}`);
    return v;
  };
  const numMap = (k: string): Record<string, number> => {
    const v = raw[k];
    if (v === undefined || v === null) return {};
    if (typeof v !== 'object' || Array.isArray(v)) throw new FormatError(`${cfgPath}: '${k}' must be an object`);
    for (const [kk, vv] of Object.entries(v)) if (typeof vv !== 'number') throw new FormatError(`${cfgPath}: '${k}.${kk}' must be a number`);
    return v as Record<string, number>;
  };
  const tm = raw.target_modules;
  const targetModules: string[] | 'all-linear' = tm === 'all-linear' ? 'all-linear'
    : Array.isArray(tm) ? tm.map(String) : typeof tm === 'string' ? [tm] : ['q_proj', 'v_proj'];
  const r = num('r', 8), alpha = num('lora_alpha', 8), dropout = num('lora_dropout', 0);
  if (!Number.isInteger(r) || r < 1) throw new FormatError(`${cfgPath}: 'r' must be a positive integer, got ${r}`);
  if (!(alpha > 0)) throw new FormatError(`${cfgPath}: 'lora_alpha' must be positive, got ${alpha}`);
  if (!(dropout >= 0 && dropout < 1)) throw new FormatError(`${cfgPath}: 'lora_dropout' must be in [0, 1), got ${dropout}`);
  const config: LoraConfig = {
    r, alpha, dropout, useRslora: raw.use_rslora === true,
    targetModules, rankPattern: numMap('rank_pattern'), alphaPattern: numMap('alpha_pattern'), useDora: raw.use_dora === true,
  };
  const stPath = join(dir, 'adapter_model.safetensors');
  if (!existsSync(stPath)) {
    if (existsSync(join(dir, 'adapter_model.bin'))) throw new UnsupportedError(`${dir} holds adapter_model.bin (a pickle from PEFT < 0.7)`, { hint: 're-save it with safe_serialization=True in PEFT, or convert it to safetensors' });
    throw new FormatError(`${stPath} not found`);
  }
  const f = SafetensorsFile.open(stPath);
  try {
    const byPath = new Map<string, { A?: Float32Array; B?: Float32Array; ashape?: number[]; bshape?: number[]; magnitude?: Float32Array }>();
    for (const name of f.names()) {
      const dm = /^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$/.exec(name);
      if (dm) {
        if (!config.useDora) throw new FormatError(`${stPath}: '${name}' is a DoRA magnitude but adapter_config.json does not say use_dora: true`);
        const info = f.info(name);
        if (info.shape.length !== 1) throw new FormatError(`${stPath}: '${name}' must be 1-D, has shape [${info.shape}]`);
        const e = byPath.get(dm[1]) ?? {};
        e.magnitude = f.readF32(name);
        byPath.set(dm[1], e);
        continue;
      }
      const m = /^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$/.exec(name);
      if (!m) throw new UnsupportedError(`${stPath}: unexpected tensor '${name}' (only lora_A / lora_B weights and DoRA magnitudes are supported)`);
      const [, path, which] = m;
      const info = f.info(name);
      if (info.shape.length !== 2) throw new FormatError(`${stPath}: '${name}' must be 2-D, has shape [${info.shape}]`);
      const e = byPath.get(path) ?? {};
      if (which === 'A') { e.A = f.readF32(name); e.ashape = info.shape; } else { e.B = f.readF32(name); e.bshape = info.shape; }
      byPath.set(path, e);
    }
    const modules: LoraTensors[] = [];
    for (const [path, e] of byPath) {
      if (!e.A || !e.B) throw new FormatError(`${stPath}: module '${path}' has lora_${e.A ? 'A' : 'B'} but not lora_${e.A ? 'B' : 'A'}`);
      const [r, inF] = e.ashape!, [outF, r2] = e.bshape!;
      if (r !== r2) throw new ShapeError(`${stPath}: '${path}' lora_A has rank ${r} but lora_B has rank ${r2}`);
      if (config.useDora && !e.magnitude) throw new FormatError(`${stPath}: DoRA adapter without lora_magnitude_vector for '${path}'`);
      if (e.magnitude && e.magnitude.length !== outF) throw new ShapeError(`${stPath}: '${path}' lora_magnitude_vector has ${e.magnitude.length} values, lora_B has ${outF} rows`);
      modules.push({ path, A: e.A, B: e.B, r, inFeatures: inF, outFeatures: outF, ...(e.magnitude ? { magnitude: e.magnitude } : {}) });
    }
    modules.sort((a, b) => a.path.localeCompare(b.path));
    return { config, baseModel: typeof raw.base_model_name_or_path === 'string' ? raw.base_model_name_or_path : null, modules };
  } finally {
    f.close();
  }
}

/** Merged weight delta of one module: scale · B · A  [out, in] (host, float64 accumulation rounded to f32). */
export function loraDelta(t: LoraTensors, scale: number): Float32Array {
  const out = new Float32Array(t.outFeatures * t.inFeatures);
  for (let o = 0; o < t.outFeatures; o++) {
    for (let i = 0; i < t.inFeatures; i++) {
      let s = 0;
      for (let k = 0; k < t.r; k++) s += t.B[o * t.r + k] * t.A[k * t.inFeatures + i];
      out[o * t.inFeatures + i] = s * scale;
    }
  }
  return out;
}
