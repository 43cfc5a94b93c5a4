// The bitsandbytes serialization of 4-bit weights (qlora-spec §3): what `Linear4bit._save_to_state_dict` writes
// and `Params4bit.from_prequantized` reads, so checkpoints move between this project and HF transformers.
//
// For a quantized Linear at module path P (e.g. model.layers.0.self_attn.q_proj), W = P.weight:
//   W                                   U8  [(n+1)//2, 1]     packed nibbles (even element in the high nibble)
//   W.absmax                            F32 [nb]  (U8 [nb] when double-quantized)
//   W.quant_map                         F32 [16]
//   W.nested_absmax                     F32 [ceil(nb/256)]    only when double-quantized
//   W.nested_quant_map                  F32 [256]             only when double-quantized
//   W.quant_state.bitsandbytes__nf4     U8  [len(json)]       json.dumps of the non-tensor fields
//
// Every function here that takes a prefix accepts either P or P.weight (the stage loader passes P.weight).

import type { Nf4Weight } from '../engine/backend.ts';
import type { TensorRecord } from '../../common/safetensors.ts';
import { ConfigError, FormatError, UnsupportedError } from '../../common/errors.ts';

/** Suffix of the packed JSON state tensor, per quant type. */
const STATE_KEY = { nf4: 'quant_state.bitsandbytes__nf4', fp4: 'quant_state.bitsandbytes__fp4' } as const;

const SOURCE_DTYPES = ['bfloat16', 'float16', 'float32'] as const;
type SourceDtype = (typeof SOURCE_DTYPES)[number];

/** `model.layers.0.mlp.up_proj` or `model.layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj.weight`. */
function weightName(prefix: string): string {
  return prefix.endsWith('.weight') ? prefix : `${prefix}.weight`;
}

// ---- Python-compatible JSON ---------------------------------------------------------------------------

/**
 * A double formatted the way Python's `repr(float)` (and so `json.dumps`) does: the shortest digits that
 * round-trip (same as JS), always with a '.0' or an exponent, scientific notation when the decimal exponent is
 * < −4 or ≥ 16, exponents with a sign and at least two digits (`1e-05`, `1.5e+16`). Non-finite values use
 * json.dumps' spellings (NaN, Infinity, -Infinity).
 */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'Infinity';
  if (x === -Infinity) return '-Infinity';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  // toExponential() without an argument gives the shortest round-trip digits, like repr.
  const [mant, expStr] = x.toExponential().split('e');
  const exp = Number(expStr);
  const sign = mant.startsWith('-') ? '-' : '';
  const digits = mant.replace('-', '').replace('.', '');
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
  const intPart = digits.slice(0, exp + 1).padEnd(exp + 1, '0');
  const frac = digits.slice(exp + 1);
  return `${sign}${intPart}.${frac === '' ? '0' : frac}`;
}

/** A JSON string literal as Python's json.dumps writes it (ensure_ascii: every non-ASCII char as \uXXXX). */
function pyJsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i];
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (c < 0x20 || c > 0x7e) out += `\\u${c.toString(16).padStart(4, '0')}`;
    else out += ch;
  }
  return `${out}"`;
}

/**
 * `json.dumps(value)` (indent undefined: separators ", " and ": ") or `json.dumps(value, indent=n)` of a plain
 * value, keys in insertion order. JS has one number type, so Python floats that hold an integer (6.0) must be
 * named: numbers under a key in `floatKeys` print as floats; other integral numbers print as ints.
 */
export function pyJsonDumps(value: unknown, opts: { indent?: number; floatKeys?: ReadonlySet<string> } = {}): string {
  const floatKeys = opts.floatKeys ?? new Set<string>();
  const ind = opts.indent;
  const enc = (v: unknown, key: string | null, depth: number): string => {
    if (v === null || v === undefined) return 'null';
    if (typeof v === 'boolean') return v ? 'true' : 'false';
    if (typeof v === 'number') {
      if (Number.isInteger(v) && !(key !== null && floatKeys.has(key)) && !Object.is(v, -0)) return String(BigInt(v));
      return pyFloatRepr(v);
    }
    if (typeof v === 'string') return pyJsonString(v);
    const nl = ind === undefined ? '' : `\n${' '.repeat(ind * (depth + 1))}`;
    const end = ind === undefined ? '' : `\n${' '.repeat(ind * depth)}`;
    const sep = ind === undefined ? ', ' : ',';
    if (Array.isArray(v)) {
      if (v.length === 0) return '[]';
      return `[${nl}${v.map((x) => enc(x, key, depth + 1)).join(sep + nl)}${end}]`;
    }
    if (typeof v === 'object') {
      const entries = Object.entries(v as Record<string, unknown>);
      if (entries.length === 0) return '{}';
      return `{${nl}${entries.map(([k, x]) => `${pyJsonString(k)}: ${enc(x, k, depth + 1)}`).join(sep + nl)}${end}}`;
    }
    throw new FormatError(`pyJsonDumps: cannot serialize a value of type ${typeof v}`);
  };
  return enc(value, null, 0);
}

// ---- writing ----------------------------------------------------------------------------------------

/** The JSON object bitsandbytes packs into `quant_state.bitsandbytes__nf4`, fields in `QuantState.as_dict` order. */
function quantStateJson(q: Nf4Weight): string {
  const state: Record<string, unknown> = {
    quant_type: 'nf4',
    blocksize: q.blocksize,
    dtype: q.sourceDtype,
    shape: [q.shape[0], q.shape[1]],
  };
  if (q.nested) {
    state.nested_blocksize = q.nested.blocksize;
    state.nested_dtype = 'float32';
    // Python writes offset.item(): the float32 offset as a double, shortest repr of that double.
    state.nested_offset = Math.fround(q.nested.offset);
  }
  return pyJsonDumps(state, { floatKeys: new Set(['nested_offset']) });
}

/**
 * The safetensors records of one quantized weight, in bitsandbytes' state-dict order (weight, absmax, quant_map,
 * nested_absmax, nested_quant_map, quant_state). Data arrays are shared with `q`, not copied.
 */
export function nf4ToRecords(prefix: string, q: Nf4Weight): TensorRecord[] {
  const w = weightName(prefix);
  const n = q.shape[0] * q.shape[1];
  const nb = Math.ceil(n / q.blocksize);
  if (q.packed.length !== Math.ceil(n / 2) || q.absmax.length !== nb) {
    throw new FormatError(`nf4ToRecords: '${w}' has ${q.packed.length} packed bytes and ${q.absmax.length} scales, expected ${Math.ceil(n / 2)} and ${nb} for shape [${q.shape.join(', ')}]`);
  }
  const records: TensorRecord[] = [
    { name: w, dtype: 'U8', shape: [Math.ceil(n / 2), 1], data: q.packed },
    { name: `${w}.absmax`, dtype: q.nested ? 'U8' : 'F32', shape: [nb], data: q.absmax },
    { name: `${w}.quant_map`, dtype: 'F32', shape: [q.quantMap.length], data: q.quantMap },
  ];
  if (q.nested) {
    records.push(
      { name: `${w}.nested_absmax`, dtype: 'F32', shape: [q.nested.absmax.length], data: q.nested.absmax },
      // Cloned per tensor in bnb too: safetensors forbids shared storage.
      { name: `${w}.nested_quant_map`, dtype: 'F32', shape: [q.nested.quantMap.length], data: q.nested.quantMap },
    );
  }
  const json = Buffer.from(quantStateJson(q), 'utf8');
  records.push({ name: `${w}.${STATE_KEY.nf4}`, dtype: 'U8', shape: [json.length], data: new Uint8Array(json) });
  return records;
}

// ---- reading ----------------------------------------------------------------------------------------

/** True when the checkpoint holds `prefix` in the bitsandbytes 4-bit format (nf4 or fp4 state present). */
export function isPrequantized(prefix: string, has: (name: string) => boolean): boolean {
  const w = weightName(prefix);
  return has(`${w}.${STATE_KEY.nf4}`) || has(`${w}.${STATE_KEY.fp4}`);
}

type RawTensor = { dtype: string; shape: readonly number[]; data: Uint8Array };

/**
 * Rebuilds an Nf4Weight from its bitsandbytes tensors. Validates everything — the JSON state, every dtype,
 * shape and byte length against the logical shape and blocksizes, nested fields present iff absmax is U8 —
 * and throws FormatError naming the tensor and `source` (the file or directory, for the message). fp4 weights
 * and non-uint8 quant_storage are UnsupportedError. Data is copied into fresh aligned arrays.
 */
export function nf4FromRecords(prefix: string, get: (name: string) => RawTensor | undefined, source: string): Nf4Weight {
  const w = weightName(prefix);
  const fail = (msg: string, hint?: string): never => {
    throw new FormatError(`${source}: ${msg}`, { hint: hint ?? 'the checkpoint is corrupt or was not written by bitsandbytes >= 0.41.3; re-quantize it from the original weights' });
  };
  const fetch = (name: string): RawTensor => {
    const t = get(name);
    if (!t) return fail(`tensor '${name}' is missing (needed by the pre-quantized weight '${w}')`);
    if (!(t.data instanceof Uint8Array) || !Array.isArray(t.shape) || typeof t.dtype !== 'string') return fail(`tensor '${name}' is malformed`);
    return t;
  };

  if (get(`${w}.${STATE_KEY.fp4}`)) {
    throw new UnsupportedError(`${source}: '${w}' is quantized as fp4; only nf4 checkpoints are supported`, {
      hint: 'quantize the original weights with bnb_4bit_quant_type="nf4" (or let dqlora quantize them on load)',
    });
  }
  const stateName = `${w}.${STATE_KEY.nf4}`;
  const st = fetch(stateName);
  if (st.dtype !== 'U8' || st.shape.length !== 1 || st.shape[0] !== st.data.length) return fail(`'${stateName}' must be a 1-D U8 tensor of JSON bytes, found ${st.dtype} [${st.shape.join(', ')}]`);
  let state: unknown;
  try {
    state = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(st.data));
  } catch (e) {
    return fail(`'${stateName}' is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  if (state === null || typeof state !== 'object' || Array.isArray(state)) return fail(`'${stateName}' must hold a JSON object`);
  const s = state as Record<string, unknown>;
  const own = (k: string): unknown => (Object.prototype.hasOwnProperty.call(s, k) ? s[k] : undefined);

  if (own('quant_type') !== 'nf4') return fail(`'${stateName}': quant_type is ${JSON.stringify(own('quant_type'))}, expected "nf4"`);
  const blocksize = own('blocksize');
  if (typeof blocksize !== 'number' || !Number.isInteger(blocksize) || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) !== 0) {
    return fail(`'${stateName}': blocksize ${JSON.stringify(blocksize)} is not a power of two in 32..4096`);
  }
  const dtype = own('dtype');
  if (typeof dtype !== 'string' || !(SOURCE_DTYPES as readonly string[]).includes(dtype)) return fail(`'${stateName}': dtype ${JSON.stringify(dtype)} is not one of ${SOURCE_DTYPES.join(', ')}`);
  const shapeV = own('shape');
  if (!Array.isArray(shapeV) || shapeV.length !== 2 || !shapeV.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d > 0) || !Number.isSafeInteger(shapeV[0] * shapeV[1])) {
    return fail(`'${stateName}': shape ${JSON.stringify(shapeV)} is not a 2-D [out, in] shape of positive integers`);
  }
  const shape = [shapeV[0] as number, shapeV[1] as number] as const;
  const n = shape[0] * shape[1];
  const nb = Math.ceil(n / blocksize);
  const nestedKeys = ['nested_blocksize', 'nested_dtype', 'nested_offset'].filter((k) => own(k) !== undefined);

  // Packed codes: U8 [(n+1)//2, 1] (the transposed [1, (n+1)//2] form is accepted too, same bytes).
  const packedT = fetch(w);
  const m = Math.ceil(n / 2);
  if (packedT.dtype !== 'U8') {
    if (['BF16', 'F16', 'F32'].includes(packedT.dtype)) {
      throw new UnsupportedError(`${source}: '${w}' uses quant_storage ${packedT.dtype}; only uint8 storage is supported`, { hint: 're-save the model with bnb_4bit_quant_storage=torch.uint8' });
    }
    return fail(`'${w}' has dtype ${packedT.dtype}, expected U8 packed 4-bit codes`);
  }
  const sh = packedT.shape;
  if (!(sh.length === 2 && ((sh[0] === m && sh[1] === 1) || (sh[0] === 1 && sh[1] === m))) || packedT.data.length !== m) {
    return fail(`'${w}' has shape [${sh.join(', ')}] and ${packedT.data.length} bytes, expected [${m}, 1] for the weight shape [${shape.join(', ')}]`);
  }

  const f32 = (name: string, len: number): Float32Array => {
    const t = fetch(name);
    if (t.dtype !== 'F32' || t.shape.length !== 1 || t.shape[0] !== len || t.data.length !== len * 4) {
      return fail(`'${name}' is ${t.dtype} [${t.shape.join(', ')}] (${t.data.length} bytes), expected F32 [${len}]`);
    }
    const out = new Float32Array(new Uint8Array(t.data).buffer, 0, len); // copy: aligned, detached from the file buffer
    for (let i = 0; i < len; i++) if (!Number.isFinite(out[i])) return fail(`'${name}' holds a non-finite value at index ${i}`);
    return out;
  };
  const nonNegative = (name: string, a: Float32Array): Float32Array => {
    for (let i = 0; i < a.length; i++) if (a[i] < 0) return fail(`'${name}' holds a negative scale ${a[i]} at index ${i}`);
    return a;
  };

  const quantMap = f32(`${w}.quant_map`, 16);
  const absName = `${w}.absmax`;
  const absT = fetch(absName);
  const base = { shape, packed: new Uint8Array(packedT.data), blocksize, quantMap, sourceDtype: dtype as SourceDtype };

  if (absT.dtype === 'F32') {
    if (nestedKeys.length > 0) return fail(`'${stateName}' has ${nestedKeys.join(', ')} but '${absName}' is F32 (not double-quantized)`);
    for (const k of ['nested_absmax', 'nested_quant_map']) if (get(`${w}.${k}`)) return fail(`'${w}.${k}' is present but '${absName}' is F32 (not double-quantized)`);
    return { ...base, absmax: nonNegative(absName, f32(absName, nb)) };
  }
  if (absT.dtype !== 'U8') return fail(`'${absName}' has dtype ${absT.dtype}, expected F32 (plain) or U8 (double-quantized)`);
  if (absT.shape.length !== 1 || absT.shape[0] !== nb || absT.data.length !== nb) {
    return fail(`'${absName}' is U8 [${absT.shape.join(', ')}] (${absT.data.length} bytes), expected [${nb}] (= ceil(${n} / ${blocksize}))`);
  }
  if (nestedKeys.length !== 3) return fail(`'${absName}' is U8 (double-quantized) but '${stateName}' lacks ${['nested_blocksize', 'nested_dtype', 'nested_offset'].filter((k) => !nestedKeys.includes(k)).join(', ')}`);
  const nbs = own('nested_blocksize');
  if (typeof nbs !== 'number' || !Number.isSafeInteger(nbs) || nbs < 1) return fail(`'${stateName}': nested_blocksize ${JSON.stringify(nbs)} is not a positive integer`);
  if (own('nested_dtype') !== 'float32') return fail(`'${stateName}': nested_dtype ${JSON.stringify(own('nested_dtype'))} must be "float32"`);
  const offset = own('nested_offset');
  if (typeof offset !== 'number' || !Number.isFinite(offset)) return fail(`'${stateName}': nested_offset ${JSON.stringify(offset)} is not a finite number`);
  // nested_blocksize is always 256 in bitsandbytes; other values are accepted since dequantization handles them.
  const nestedAbsmax = nonNegative(`${w}.nested_absmax`, f32(`${w}.nested_absmax`, Math.ceil(nb / nbs)));
  const nestedMap = f32(`${w}.nested_quant_map`, 256);
  return {
    ...base,
    absmax: new Uint8Array(absT.data),
    // The file stores the float32 offset printed as a double: round back to float32.
    nested: { absmax: nestedAbsmax, quantMap: nestedMap, blocksize: nbs, offset: Math.fround(offset) },
  };
}

// ---- config.json ------------------------------------------------------------------------------------

/**
 * `BitsAndBytesConfig(...).to_dict()` for an NF4 model, keys in the order of spec §3. Serialize it with
 * `quantizationConfigJson` (not JSON.stringify): transformers rejects an int `llm_int8_threshold`.
 */
export function bnbQuantizationConfig(opts: { computeDtype: string; doubleQuant: boolean; quantType?: 'nf4'; skipModules?: string[] }): Record<string, unknown> {
  if (!(SOURCE_DTYPES as readonly string[]).includes(opts.computeDtype)) {
    throw new ConfigError(`quantization compute dtype '${opts.computeDtype}' is not one of ${SOURCE_DTYPES.join(', ')}`);
  }
  if ((opts.quantType ?? 'nf4') !== 'nf4') throw new UnsupportedError(`quant type '${String(opts.quantType)}' is not supported; use nf4`);
  return {
    quant_method: 'bitsandbytes',
    _load_in_4bit: true,
    _load_in_8bit: false,
    load_in_4bit: true,
    load_in_8bit: false,
    llm_int8_threshold: 6.0,
    llm_int8_skip_modules: opts.skipModules ? [...opts.skipModules] : null,
    llm_int8_enable_fp32_cpu_offload: false,
    llm_int8_has_fp16_weight: false,
    bnb_4bit_quant_type: 'nf4',
    bnb_4bit_use_double_quant: opts.doubleQuant,
    bnb_4bit_compute_dtype: opts.computeDtype,
    bnb_4bit_quant_storage: 'uint8',
  };
}

/** The quantization_config dict as Python would write it (llm_int8_threshold as 6.0), optionally indented. */
export function quantizationConfigJson(cfg: Record<string, unknown>, indent?: number): string {
  return pyJsonDumps(cfg, { indent, floatKeys: new Set(['llm_int8_threshold']) });
}
