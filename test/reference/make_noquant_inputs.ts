// Inputs of the `quantization: none` golden test (test/cli/noquant-golden.test.ts): for each case a small random model
// in Hugging Face format WITH a tokenizer (so `coordinator eval` runs on it as on a real model directory), a dataset,
// a PEFT adapter with non-zero B, and batch.json — the token ids and labels our tokenizer gives the dataset. The
// reference numbers (expected.json) are then computed from model/ + batch.json + adapter/ by transformers + PEFT with
// make_noquant_golden.py on the device machine; the test checks that the CLI tokenizes to batch.json AND that its loss
// equals transformers' (so the comparison covers the whole CLI path, tokenization checked separately).
//
// Usage:  node --import tsx test/reference/make_noquant_inputs.ts [OUT_DIR=test/fixtures/golden-noquant]
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeSafetensors, type TensorRecord } from '../../common/safetensors.ts';
import { f32ToBf16 } from '../../common/halfprec.ts';
import { CounterRng, mixKey } from '../../common/rng.ts';
import { saveAdapter, type LoraTensors } from '../../common/peft.ts';
import { hfConfigJson } from '../../coordinator/example/model.ts';
import { writeExampleTokenizer } from '../../coordinator/example/tokenizer.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { readRecords } from '../../coordinator/data/records.ts';
import { tokenizeRecords } from '../../coordinator/data/tokenize.ts';

const OUT = process.argv[2] ?? 'test/fixtures/golden-noquant';

const RECORDS = [
  { instruction: '拓数派#openpie#数据库', output: 'OpenPie builds a cloud-native database for data computing.' },
  { instruction: 'rust#memory#safety', output: 'Ownership and borrowing make memory errors compile-time errors.' },
  { instruction: 'nats#pubsub', output: 'Subjects route messages between publishers and subscribers.' },
  { instruction: 'lora#rank', input: 'why low rank?', output: 'Weight updates of fine-tuning have low intrinsic rank.' },
  { instruction: 'qlora#nf4#4bit', output: 'A frozen 4-bit NormalFloat base plus trainable adapters.' },
  { text: 'Raw text record: the quick brown fox jumps over the lazy dog.' },
];

interface Case { name: string; modelType: 'llama' | 'qwen2'; dtype: 'F32' | 'BF16'; tie: boolean; qkvBias: boolean; heads: number; kvHeads: number; seed: number }
const CASES: Case[] = [
  { name: 'llama-f32', modelType: 'llama', dtype: 'F32', tie: false, qkvBias: false, heads: 4, kvHeads: 2, seed: 7 },
  { name: 'qwen2-bf16', modelType: 'qwen2', dtype: 'BF16', tie: true, qkvBias: true, heads: 4, kvHeads: 1, seed: 8 },
];
const H = 64, I = 128, L = 2, R = 4, ALPHA = 8;

for (const c of CASES) {
  const dir = join(OUT, c.name), modelDir = join(dir, 'model');
  mkdirSync(modelDir, { recursive: true });
  const texts = RECORDS.flatMap((r) => Object.values(r));
  const { vocabSize: V } = writeExampleTokenizer(modelDir, texts);
  const rng = new CounterRng(mixKey(c.seed, 0x4e4f51), 0);
  // std 1/√H for every matrix (O(1) activations and logits: the base path dominates, so NF4 instead of dense would
  // move the loss far beyond the test's 1e-5); norms 1 + 0.1·N, biases 0.1·N so a loader that drops them fails.
  const normal = (n: number, std: number, mean = 0): Float32Array => Float32Array.from({ length: n }, () => mean + rng.normal() * std);
  const recs: TensorRecord[] = [];
  const add = (name: string, shape: number[], data: Float32Array): void => {
    recs.push(c.dtype === 'BF16' ? { name, dtype: 'BF16', shape, data: f32ToBf16(data) } : { name, dtype: 'F32', shape, data });
  };
  const D = H / c.heads, KV = c.kvHeads * D, s = 1 / Math.sqrt(H);
  add('model.embed_tokens.weight', [V, H], normal(V * H, 1));
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [H], normal(H, 0.1, 1));
    add(`${p}.post_attention_layernorm.weight`, [H], normal(H, 0.1, 1));
    add(`${p}.self_attn.q_proj.weight`, [H, H], normal(H * H, s));
    add(`${p}.self_attn.k_proj.weight`, [KV, H], normal(KV * H, s));
    add(`${p}.self_attn.v_proj.weight`, [KV, H], normal(KV * H, s));
    if (c.qkvBias) {
      add(`${p}.self_attn.q_proj.bias`, [H], normal(H, 0.1));
      add(`${p}.self_attn.k_proj.bias`, [KV], normal(KV, 0.1));
      add(`${p}.self_attn.v_proj.bias`, [KV], normal(KV, 0.1));
    }
    add(`${p}.self_attn.o_proj.weight`, [H, H], normal(H * H, s));
    add(`${p}.mlp.gate_proj.weight`, [I, H], normal(I * H, s));
    add(`${p}.mlp.up_proj.weight`, [I, H], normal(I * H, s));
    add(`${p}.mlp.down_proj.weight`, [H, I], normal(H * I, 1 / Math.sqrt(I)));
  }
  add('model.norm.weight', [H], normal(H, 0.1, 1));
  if (!c.tie) add('lm_head.weight', [V, H], normal(V * H, s));
  writeSafetensors(join(modelDir, 'model.safetensors'), recs, { format: 'pt' });
  const tok = loadTokenizer(modelDir);
  const cfg = hfConfigJson({
    hiddenSize: H, intermediateSize: I, numLayers: L, numHeads: c.heads, numKvHeads: c.kvHeads, vocabSize: V,
    maxPositionEmbeddings: 256, tieWordEmbeddings: c.tie, qkvBias: c.qkvBias, modelType: c.modelType,
    ropeTheta: c.modelType === 'qwen2' ? 1e6 : 1e4, rmsNormEps: 1e-6,
    bosTokenId: tok.bosId, eosTokenId: tok.eosId, padTokenId: tok.padId,
  });
  cfg.torch_dtype = c.dtype === 'BF16' ? 'bfloat16' : 'float32';
  writeFileSync(join(modelDir, 'config.json'), JSON.stringify(cfg, null, 2) + '\n');
  writeFileSync(join(modelDir, 'generation_config.json'), JSON.stringify({ bos_token_id: tok.bosId, eos_token_id: tok.eosId, pad_token_id: tok.padId }, null, 2) + '\n');

  const dataPath = join(dir, 'data.jsonl');
  writeFileSync(dataPath, RECORDS.map((r) => JSON.stringify(r)).join('\n') + '\n');
  const { examples } = tokenizeRecords(readRecords(dataPath).records, tok, { maxLength: 512 });
  writeFileSync(join(dir, 'batch.json'), JSON.stringify({
    note: 'token ids and labels (unshifted, -100 = not trained) of data.jsonl as coordinator/data/tokenize.ts makes them',
    pad_token_id: tok.padId,
    examples: examples.map((e) => ({ input_ids: Array.from(e.inputIds), labels: Array.from(e.labels) })),
  }) + '\n');

  // Adapter: PEFT init for A (U(±1/√in)), B ~ N(0, 0.1) so the adapted loss differs from the base loss.
  const mods: LoraTensors[] = [];
  const shapes: Record<string, [number, number]> = {
    'self_attn.q_proj': [H, H], 'self_attn.k_proj': [KV, H], 'self_attn.v_proj': [KV, H], 'self_attn.o_proj': [H, H],
    'mlp.gate_proj': [I, H], 'mlp.up_proj': [I, H], 'mlp.down_proj': [H, I],
  };
  for (let l = 0; l < L; l++) {
    for (const [m, [out, inF]] of Object.entries(shapes)) {
      const A = Float32Array.from({ length: R * inF }, () => (rng.next() * 2 - 1) / Math.sqrt(inF));
      mods.push({ path: `model.layers.${l}.${m}`, A, B: normal(out * R, 0.1), r: R, inFeatures: inF, outFeatures: out });
    }
  }
  saveAdapter(join(dir, 'adapter'), mods, { r: R, alpha: ALPHA, dropout: 0, useRslora: false, targetModules: 'all-linear' }, null);
  process.stdout.write(`${dir}: vocab ${V}, ${examples.length} examples\n`);
}
