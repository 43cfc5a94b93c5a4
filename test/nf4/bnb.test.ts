// bitsandbytes serialization of NF4 weights (qlora-spec §3): records ↔ Nf4Weight, Python-exact JSON, fuzzing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Nf4Weight } from '../../core/engine/backend.ts';
import { quantizeNf4, dequantizeNf4, NF4_TABLE, DYNAMIC_SIGNED_MAP } from '../../core/engine/nf4.ts';
import {
  nf4ToRecords, nf4FromRecords, isPrequantized, bnbQuantizationConfig, quantizationConfigJson, pyFloatRepr, pyJsonDumps,
} from '../../core/model/bnb.ts';
import { writeSafetensors, SafetensorsFile, type TensorRecord } from '../../common/safetensors.ts';
import { CounterRng } from '../../common/rng.ts';
import { FormatError, UnsupportedError } from '../../common/errors.ts';

type Raw = { dtype: string; shape: number[]; data: Uint8Array };

function bytesOf(d: TensorRecord['data']): Uint8Array {
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}

function asGetter(records: TensorRecord[]): Map<string, Raw> {
  return new Map(records.map((r) => [r.name, { dtype: r.dtype, shape: [...r.shape], data: new Uint8Array(bytesOf(r.data)) }]));
}

function weights(n: number, seed: number): Float32Array {
  const rng = new CounterRng(seed, 99);
  return Float32Array.from({ length: n }, () => rng.normal() * 0.05);
}

function assertSameNf4(a: Nf4Weight, b: Nf4Weight): void {
  assert.deepEqual(b.shape, a.shape);
  assert.equal(b.blocksize, a.blocksize);
  assert.equal(b.sourceDtype, a.sourceDtype);
  assert.deepEqual(b.packed, a.packed);
  assert.equal(b.absmax.constructor, a.absmax.constructor);
  assert.deepEqual(b.absmax, a.absmax);
  assert.deepEqual(b.quantMap, a.quantMap);
  assert.deepEqual(b.nested, a.nested);
}

test('pyFloatRepr prints doubles exactly like Python repr / json.dumps', () => {
  // Pairs produced by CPython 3: repr(float).
  const cases: Array<[number, string]> = [
    [0.007384200114756823, '0.007384200114756823'], [1e-05, '1e-05'], [1.5e-07, '1.5e-07'], [0.0001, '0.0001'],
    [9.999999e-05, '9.999999e-05'], [123, '123.0'], [6, '6.0'], [1e16, '1e+16'], [1e22, '1e+22'],
    [1234567890123456, '1234567890123456.0'], [12345678901234567, '1.2345678901234568e+16'], [2.5e-300, '2.5e-300'],
    [5e-324, '5e-324'], [-0, '-0.0'], [0, '0.0'], [0.1, '0.1'], [1 / 3, '0.3333333333333333'], [-2.5e-5, '-2.5e-05'],
    [1.7976931348623157e308, '1.7976931348623157e+308'], [Math.fround(0.3), '0.30000001192092896'], [NaN, 'NaN'],
    [Infinity, 'Infinity'], [-Infinity, '-Infinity'], [100, '100.0'], [0.5, '0.5'],
  ];
  for (const [x, s] of cases) assert.equal(pyFloatRepr(x), s, `repr(${x})`);
});

test('pyJsonDumps matches json.dumps, compact and indented', () => {
  assert.equal(pyJsonDumps({ a: [1, 2.5, []], b: {}, c: 'é"\n' }), '{"a": [1, 2.5, []], "b": {}, "c": "\\u00e9\\"\\n"}');
  assert.equal(pyJsonDumps({ a: [1, 2.5, []], b: {}, c: 'é"\n' }, { indent: 2 }), '{\n  "a": [\n    1,\n    2.5,\n    []\n  ],\n  "b": {},\n  "c": "\\u00e9\\"\\n"\n}');
  assert.equal(pyJsonDumps({ x: 6, y: 6 }, { floatKeys: new Set(['x']) }), '{"x": 6.0, "y": 6}');
});

test('the quant_state JSON blob is byte-exact json.dumps of QuantState.as_dict (spec §3 example shape)', () => {
  const [out, inF] = [4096, 4096];
  const n = out * inF, nb = n / 64;
  const q: Nf4Weight = {
    shape: [out, inF], packed: new Uint8Array(n / 2), blocksize: 64, quantMap: NF4_TABLE.slice(), absmax: new Uint8Array(nb),
    nested: { absmax: new Float32Array(nb / 256), quantMap: DYNAMIC_SIGNED_MAP.slice(), blocksize: 256, offset: Math.fround(0.0073842) },
    sourceDtype: 'bfloat16',
  };
  const recs = nf4ToRecords('model.layers.0.self_attn.q_proj', q);
  assert.deepEqual(recs.map((r) => [r.name, r.dtype, r.shape]), [
    ['model.layers.0.self_attn.q_proj.weight', 'U8', [n / 2, 1]],
    ['model.layers.0.self_attn.q_proj.weight.absmax', 'U8', [nb]],
    ['model.layers.0.self_attn.q_proj.weight.quant_map', 'F32', [16]],
    ['model.layers.0.self_attn.q_proj.weight.nested_absmax', 'F32', [nb / 256]],
    ['model.layers.0.self_attn.q_proj.weight.nested_quant_map', 'F32', [256]],
    ['model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4', 'U8', [173]],
  ]);
  // Literal from CPython: json.dumps({... "nested_offset": float32(0.0073842).item()})
  const expected = '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4096, 4096], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.007384200114756823}';
  assert.equal(expected.length, 173);
  assert.equal(Buffer.from(bytesOf(recs[5].data)).toString('utf8'), expected);
  // Without double quantization: no nested keys, F32 absmax.
  const plain = nf4ToRecords('p.weight', { ...q, absmax: new Float32Array(nb), nested: undefined, sourceDtype: 'float16' });
  assert.deepEqual(plain.map((r) => r.name), ['p.weight', 'p.weight.absmax', 'p.weight.quant_map', 'p.weight.quant_state.bitsandbytes__nf4']);
  assert.equal(plain[1].dtype, 'F32');
  assert.equal(Buffer.from(bytesOf(plain[3].data)).toString('utf8'), '{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4096, 4096]}');
});

test('records → Nf4Weight round trip is exact (plain, double-quantized, odd sizes), also through a safetensors file', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-bnb-'));
  try {
    const all: TensorRecord[] = [];
    const originals: Array<[string, Nf4Weight]> = [];
    for (const [k, [rows, cols, bs, dq]] of ([[16, 64, 64, true], [7, 13, 32, true], [300, 40, 128, false], [3, 5, 4096, false]] as const).entries()) {
      const q = quantizeNf4(weights(rows * cols, k + 1), [rows, cols], { blocksize: bs, doubleQuant: dq, sourceDtype: k % 2 ? 'float16' : 'bfloat16' });
      const prefix = `model.layers.${k}.mlp.up_proj`;
      const recs = nf4ToRecords(prefix, q);
      const map = asGetter(recs);
      for (const p of [prefix, `${prefix}.weight`]) {
        assert.ok(isPrequantized(p, (nm) => map.has(nm)));
        const back = nf4FromRecords(p, (nm) => map.get(nm), 'memory');
        assertSameNf4(q, back);
        assert.deepEqual(dequantizeNf4(back), dequantizeNf4(q));
      }
      all.push(...recs);
      originals.push([prefix, q]);
    }
    const file = path.join(dir, 'model.safetensors');
    writeSafetensors(file, all);
    const st = SafetensorsFile.open(file);
    try {
      for (const [prefix, q] of originals) {
        const back = nf4FromRecords(prefix, (nm) => (st.has(nm) ? { dtype: st.info(nm).dtype, shape: st.info(nm).shape, data: st.readRaw(nm) } : undefined), file);
        assertSameNf4(q, back);
      }
      assert.equal(isPrequantized('model.layers.9.mlp.up_proj', (nm) => st.has(nm)), false);
    } finally {
      st.close();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('fp4 checkpoints and non-uint8 quant_storage are UnsupportedError; inconsistent nesting is FormatError naming the tensor', () => {
  const q = quantizeNf4(weights(640, 3), [10, 64]);
  const base = asGetter(nf4ToRecords('m.lin', q));
  const withChange = (f: (m: Map<string, Raw>) => void): Map<string, Raw> => {
    const m = new Map([...base].map(([k, v]) => [k, { ...v, shape: [...v.shape] }]));
    f(m);
    return m;
  };
  const fp4 = withChange((m) => {
    const s = m.get('m.lin.weight.quant_state.bitsandbytes__nf4') as Raw;
    m.delete('m.lin.weight.quant_state.bitsandbytes__nf4');
    m.set('m.lin.weight.quant_state.bitsandbytes__fp4', s);
  });
  assert.ok(isPrequantized('m.lin', (nm) => fp4.has(nm)));
  assert.throws(() => nf4FromRecords('m.lin', (nm) => fp4.get(nm), 'f.safetensors'), UnsupportedError);
  const bf16Storage = withChange((m) => { const w = m.get('m.lin.weight') as Raw; m.set('m.lin.weight', { ...w, dtype: 'BF16', shape: [160, 1] }); });
  assert.throws(() => nf4FromRecords('m.lin', (nm) => bf16Storage.get(nm), 'f.safetensors'), UnsupportedError);
  const noNested = withChange((m) => m.delete('m.lin.weight.nested_absmax'));
  assert.throws(() => nf4FromRecords('m.lin', (nm) => noNested.get(nm), 'f.safetensors'), (e: Error) => e instanceof FormatError && e.message.includes("'m.lin.weight.nested_absmax' is missing") && e.message.startsWith('f.safetensors'));
  const plainAbsmax = withChange((m) => m.set('m.lin.weight.absmax', { dtype: 'F32', shape: [10], data: new Uint8Array(40) }));
  assert.throws(() => nf4FromRecords('m.lin', (nm) => plainAbsmax.get(nm), 'f'), (e: Error) => e instanceof FormatError && /nested_/.test(e.message));
  const wrongShape = withChange((m) => { (m.get('m.lin.weight') as Raw).shape = [321, 1]; });
  assert.throws(() => nf4FromRecords('m.lin', (nm) => wrongShape.get(nm), 'f'), (e: Error) => e instanceof FormatError && e.message.includes("'m.lin.weight' has shape [321, 1]"));
});

test('fuzz: corrupted shapes, dtypes, bytes and JSON give FormatError/UnsupportedError or the exact original', () => {
  const rng = new CounterRng(2024, 7);
  const originals = [quantizeNf4(weights(7 * 96, 5), [7, 96]), quantizeNf4(weights(5 * 33, 6), [5, 33], { doubleQuant: false, blocksize: 32 })];
  const dtypes = ['U8', 'F32', 'F16', 'BF16', 'I8', 'I32', 'F64', 'BOOL', 'U16', ''];
  let errors = 0, successes = 0;
  for (let iter = 0; iter < 3000; iter++) {
    const q = originals[iter % 2];
    const m = asGetter(nf4ToRecords('x.y', q));
    const names = [...m.keys()];
    const victim = m.get(names[rng.int(names.length)]) as Raw;
    const kind = rng.int(7);
    const stateName = 'x.y.weight.quant_state.bitsandbytes__nf4';
    if (kind === 0) victim.dtype = dtypes[rng.int(dtypes.length)];
    else if (kind === 1) victim.shape = victim.shape.map((d) => (rng.next() < 0.5 ? d + rng.int(3) - 1 : d));
    else if (kind === 2) victim.shape = rng.next() < 0.5 ? [...victim.shape, 1] : victim.shape.slice(1);
    else if (kind === 3) victim.data = victim.data.subarray(0, rng.int(victim.data.length + 1));
    else if (kind === 4) m.delete(names[rng.int(names.length)]);
    else {
      // Mutate the JSON text: flip bytes, or replace a value with something of the wrong type.
      const st = m.get(stateName) as Raw;
      let text = Buffer.from(st.data).toString('latin1');
      if (kind === 5) {
        const bytes = Buffer.from(st.data);
        for (let k = 0; k <= rng.int(3); k++) bytes[rng.int(bytes.length)] = rng.int(256);
        st.data = new Uint8Array(bytes);
      } else {
        const subs: Array<[RegExp, string]> = [[/"blocksize": \d+/, '"blocksize": 48'], [/"shape": \[[^\]]*\]/, '"shape": [5, "7"]'],
          [/"dtype": "[a-z0-9]+"/, '"dtype": "float8"'], [/"nested_offset": [^,}]+/, '"nested_offset": null'], [/"quant_type": "nf4"/, '"quant_type": "fp4"'],
          [/"shape": \[(\d+), (\d+)\]/, '"shape": [$2, $1]'], [/^\{/, '['], [/"nested_blocksize": 256/, '"nested_blocksize": 0'], [/, "nested_dtype": "float32"/, '']];
        const [re, rep] = subs[rng.int(subs.length)];
        text = text.replace(re, rep);
        st.data = new Uint8Array(Buffer.from(text, 'latin1'));
        st.shape = [st.data.length];
      }
    }
    let back: Nf4Weight | undefined;
    try {
      back = nf4FromRecords('x.y', (nm) => m.get(nm), 'fuzz');
    } catch (e) {
      assert.ok(e instanceof FormatError || e instanceof UnsupportedError, `iteration ${iter}: unexpected ${String(e)}`);
      errors++;
      continue;
    }
    // Accepted mutations are the undetectable ones (flipped bytes inside the packed codes or scales, a swapped
    // [out, in] whose sizes still agree): the result is still a self-consistent weight of the same size.
    assert.equal(back.shape[0] * back.shape[1], q.shape[0] * q.shape[1], `iteration ${iter}`);
    assert.equal(back.blocksize, q.blocksize);
    assert.equal(dequantizeNf4(back).length, q.shape[0] * q.shape[1]);
    successes++;
  }
  assert.ok(errors > 2000, `most mutations are rejected (${errors} errors, ${successes} accepted)`);
});

test('bnbQuantizationConfig: the BitsAndBytesConfig.to_dict keys, written with a float threshold', () => {
  const cfg = bnbQuantizationConfig({ computeDtype: 'bfloat16', doubleQuant: true });
  assert.deepEqual(Object.keys(cfg), ['quant_method', '_load_in_4bit', '_load_in_8bit', 'load_in_4bit', 'load_in_8bit', 'llm_int8_threshold',
    'llm_int8_skip_modules', 'llm_int8_enable_fp32_cpu_offload', 'llm_int8_has_fp16_weight', 'bnb_4bit_quant_type', 'bnb_4bit_use_double_quant',
    'bnb_4bit_compute_dtype', 'bnb_4bit_quant_storage']);
  // Literal from CPython json.dumps(cfg, indent=2).
  assert.equal(quantizationConfigJson(cfg, 2), `{
  "quant_method": "bitsandbytes",
  "_load_in_4bit": true,
  "_load_in_8bit": false,
  "load_in_4bit": true,
  "load_in_8bit": false,
  "llm_int8_threshold": 6.0,
  "llm_int8_skip_modules": null,
  "llm_int8_enable_fp32_cpu_offload": false,
  "llm_int8_has_fp16_weight": false,
  "bnb_4bit_quant_type": "nf4",
  "bnb_4bit_use_double_quant": true,
  "bnb_4bit_compute_dtype": "bfloat16",
  "bnb_4bit_quant_storage": "uint8"
}`);
  const skip = bnbQuantizationConfig({ computeDtype: 'float32', doubleQuant: false, skipModules: ['lm_head'] });
  assert.deepEqual(skip.llm_int8_skip_modules, ['lm_head']);
  assert.equal(skip.bnb_4bit_use_double_quant, false);
  assert.throws(() => bnbQuantizationConfig({ computeDtype: 'int8', doubleQuant: true }), /compute dtype/);
});
