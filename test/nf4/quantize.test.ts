// quantizeCheckpoint: a tiny Llama-shaped model directory → pre-quantized bitsandbytes NF4 directory.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeSafetensors, type TensorRecord } from '../../common/safetensors.ts';
import { ModelWeights } from '../../common/model-weights.ts';
import { f32ToBf16 } from '../../common/halfprec.ts';
import { CounterRng } from '../../common/rng.ts';
import { ConfigError } from '../../common/errors.ts';
import { quantizeNf4, dequantizeNf4 } from '../../core/engine/nf4.ts';
import { nf4FromRecords, nf4ToRecords, isPrequantized } from '../../core/model/bnb.ts';
import { quantizeCheckpoint } from '../../core/model/quantize.ts';

const H = 64, I = 128, V = 96, L = 2, HEADS = 4, KV = 2, D = H / HEADS;

// As transformers writes it (sorted keys, indent 2, Python floats such as 10000.0 and 1e-05).
const CONFIG_TEXT = `{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "hidden_act": "silu",
  "hidden_size": ${H},
  "intermediate_size": ${I},
  "max_position_embeddings": 128,
  "model_type": "llama",
  "num_attention_heads": ${HEADS},
  "num_hidden_layers": ${L},
  "num_key_value_heads": ${KV},
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "vocab_size": ${V}
}
`;

/** The linear modules of one layer with their [out, in] shapes. */
const LINEARS: Array<[string, number, number]> = [
  ['self_attn.q_proj', HEADS * D, H], ['self_attn.k_proj', KV * D, H], ['self_attn.v_proj', KV * D, H], ['self_attn.o_proj', H, HEADS * D],
  ['mlp.gate_proj', I, H], ['mlp.up_proj', I, H], ['mlp.down_proj', H, I],
];

function randomF32(n: number, rng: CounterRng, std: number): Float32Array {
  return Float32Array.from({ length: n }, () => rng.normal() * std);
}

/** Writes a random bf16 Llama checkpoint (norms in F32 to cover mixed dtypes); returns the records written. */
function makeModel(dir: string): TensorRecord[] {
  const rng = new CounterRng(42, 1);
  const bf16 = (name: string, shape: number[], std: number): TensorRecord => ({ name, dtype: 'BF16', shape, data: f32ToBf16(randomF32(shape[0] * (shape[1] ?? 1), rng, std)) });
  const recs: TensorRecord[] = [bf16('model.embed_tokens.weight', [V, H], 1)];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    recs.push({ name: `${p}.input_layernorm.weight`, dtype: 'F32', shape: [H], data: randomF32(H, rng, 1) });
    recs.push({ name: `${p}.post_attention_layernorm.weight`, dtype: 'F32', shape: [H], data: randomF32(H, rng, 1) });
    for (const [m, o, i] of LINEARS) recs.push(bf16(`${p}.${m}.weight`, [o, i], 0.05));
    recs.push(bf16(`${p}.self_attn.q_proj.bias`, [HEADS * D], 0.1)); // Qwen2-style bias: kept, not quantized
  }
  recs.push({ name: 'model.norm.weight', dtype: 'F32', shape: [H], data: randomF32(H, rng, 1) });
  recs.push(bf16('lm_head.weight', [V, H], 0.05));
  fs.mkdirSync(dir, { recursive: true });
  writeSafetensors(path.join(dir, 'model.safetensors'), recs, { format: 'pt' });
  fs.writeFileSync(path.join(dir, 'config.json'), CONFIG_TEXT);
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), '{"version": "1.0", "model": {"type": "BPE"}}');
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), '{"bos_token": "<s>"}');
  fs.writeFileSync(path.join(dir, 'generation_config.json'), '{"do_sample": false}');
  return recs;
}

function bytesOf(d: TensorRecord['data']): Uint8Array {
  return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
}

test('quantize a tiny Llama: NF4 linears equal quantizeNf4 of the originals bit for bit, everything else byte-identical', async () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-quantize-'));
  try {
    const src = path.join(root, 'model'), out = path.join(root, 'out');
    const recs = makeModel(src);
    const progress: string[] = [];
    const summary = await quantizeCheckpoint(src, out, { onProgress: (done, total, name) => progress.push(`${done}/${total} ${name}`) });
    assert.equal(summary.quantized, L * 7);
    assert.equal(summary.kept, recs.length - L * 7);
    assert.equal(summary.bytesIn, recs.reduce((s, r) => s + r.data.byteLength, 0));
    assert.equal(progress.length, recs.length);
    assert.match(progress[progress.length - 1], new RegExp(`^${recs.length}/${recs.length} `));

    const w = ModelWeights.open(out);
    try {
      let bytesOut = 0;
      for (const n of w.names()) bytesOut += w.info(n).byteLength;
      assert.equal(summary.bytesOut, bytesOut);
      assert.ok(summary.bytesOut < summary.bytesIn);
      for (const r of recs) {
        const lin = /^(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight$/.exec(r.name);
        if (lin) {
          assert.ok(isPrequantized(lin[1], (n) => w.has(n)), r.name);
          const got = nf4FromRecords(lin[1], (n) => (w.has(n) ? { dtype: w.info(n).dtype, shape: w.info(n).shape, data: w.readRaw(n) } : undefined), out);
          const orig = readF32(src, r.name);
          const want = quantizeNf4(orig, [r.shape[0], r.shape[1]], { sourceDtype: 'bfloat16' });
          assert.equal(got.sourceDtype, 'bfloat16');
          assert.ok(got.nested, 'double-quantized by default');
          assert.deepEqual(dequantizeNf4(got), dequantizeNf4(want), r.name);
          assert.deepEqual(got.packed, want.packed);
          // The stored records are exactly what nf4ToRecords writes.
          for (const rec of nf4ToRecords(lin[1], want)) assert.deepEqual(w.readRaw(rec.name), bytesOf(rec.data), rec.name);
        } else {
          assert.equal(w.info(r.name).dtype, r.dtype, r.name);
          assert.deepEqual(w.info(r.name).shape, [...r.shape]);
          assert.deepEqual(w.readRaw(r.name), bytesOf(r.data), r.name);
        }
      }
      assert.equal(w.has('model.layers.0.self_attn.q_proj.weight.absmax'), true);
      assert.equal(w.has('lm_head.weight.absmax'), false);
      assert.equal(w.metadata.format, 'pt');
    } finally {
      w.close();
    }

    const cfgText = fs.readFileSync(path.join(out, 'config.json'), 'utf8');
    const cfg = JSON.parse(cfgText) as Record<string, Record<string, unknown>>;
    assert.equal(cfg.quantization_config.quant_method, 'bitsandbytes');
    assert.equal(cfg.quantization_config.bnb_4bit_quant_type, 'nf4');
    assert.equal(cfg.quantization_config.bnb_4bit_use_double_quant, true);
    assert.equal(cfg.quantization_config.bnb_4bit_compute_dtype, 'bfloat16');
    assert.ok(cfgText.includes('    "llm_int8_threshold": 6.0,\n'), 'the threshold stays a Python float');
    // Every original byte is kept (10000.0 and 1e-05 stay as written); the new key goes last.
    assert.ok(cfgText.startsWith(CONFIG_TEXT.slice(0, CONFIG_TEXT.lastIndexOf('\n}'))));
    assert.ok(cfgText.endsWith('    "bnb_4bit_quant_storage": "uint8"\n  }\n}\n'));
    for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
      assert.equal(fs.readFileSync(path.join(out, f), 'utf8'), fs.readFileSync(path.join(src, f), 'utf8'));
    }
    assert.equal(fs.existsSync(path.join(out, 'tokenizer.model')), false);

    // Re-running into the previous output is refused without force (the issue: it was silently overwritten), and
    // allowed with it; sharding and plain absmax (no double quant) work.
    await assert.rejects(quantizeCheckpoint(src, out, { doubleQuant: false }), (e: Error) => e instanceof ConfigError && /already holds a quantized model/.test(e.message) && /--force/.test(e.message));
    const again = await quantizeCheckpoint(src, out, { doubleQuant: false, blocksize: 128, maxShardBytes: 20_000, force: true });
    assert.equal(again.quantized, L * 7);
    const files = fs.readdirSync(out).sort();
    assert.ok(files.includes('model.safetensors.index.json') && !files.includes('model.safetensors'), files.join(', '));
    const w2 = ModelWeights.open(out);
    try {
      assert.equal(w2.info('model.layers.1.mlp.down_proj.weight.absmax').dtype, 'F32');
      assert.equal(w2.has('model.layers.1.mlp.down_proj.weight.nested_absmax'), false);
      const got = nf4FromRecords('model.layers.1.mlp.down_proj', (n) => (w2.has(n) ? { dtype: w2.info(n).dtype, shape: w2.info(n).shape, data: w2.readRaw(n) } : undefined), out);
      assert.equal(got.blocksize, 128);
    } finally {
      w2.close();
    }
    const cfg2 = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as Record<string, Record<string, unknown>>;
    assert.equal(cfg2.quantization_config.bnb_4bit_use_double_quant, false);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test('quantize refuses an occupied output directory and an already quantized model with ConfigError', async () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'dqlora-quantize-'));
  try {
    const src = path.join(root, 'model'), out = path.join(root, 'out'), other = path.join(root, 'other');
    makeModel(src);
    fs.mkdirSync(other);
    fs.writeFileSync(path.join(other, 'notes.txt'), 'mine');
    await assert.rejects(quantizeCheckpoint(src, other), (e: Error) => e instanceof ConfigError && e.message.includes('not empty') && e.message.includes('notes.txt'));
    assert.equal(fs.readFileSync(path.join(other, 'notes.txt'), 'utf8'), 'mine');
    await assert.rejects(quantizeCheckpoint(src, src), ConfigError);
    // A model directory that is not a quantize output (config.json without quantization_config) is not overwritten.
    await assert.rejects(quantizeCheckpoint(src, path.join(root, 'model')), ConfigError);

    await quantizeCheckpoint(src, out);
    await assert.rejects(quantizeCheckpoint(out, path.join(root, 'out2')), (e: Error) => e instanceof ConfigError && e.message.includes('already'));
    // Same with the quantization_config removed: the tensors themselves give it away.
    const cfg = fs.readFileSync(path.join(out, 'config.json'), 'utf8');
    fs.writeFileSync(path.join(out, 'config.json'), cfg.replace(/,\n {2}"quantization_config": \{[^}]*\}/, ''));
    await assert.rejects(quantizeCheckpoint(out, path.join(root, 'out3')), (e: Error) => e instanceof ConfigError && /pre-quantized/.test(e.message));
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

/** One tensor of a model directory as float32. */
function readF32(dir: string, name: string): Float32Array {
  const w = ModelWeights.open(dir);
  try {
    return w.readF32(name);
  } finally {
    w.close();
  }
}
