#!/usr/bin/env python3
"""PyTorch + PEFT reference for bench/gpu.sh: QLoRA-style training throughput of a full Llama model.

transformers LlamaForCausalLM, random init (HF's _init_weights, std 0.02), bf16 base weights (bitsandbytes is not on
the GPU machine), SDPA attention, PEFT LoRA r=16 alpha=32 on all 7 linear layers (fp32 adapters, autocast bf16),
AdamW on the LoRA weights, grad-norm clipping 1.0 (the HF Trainer default), loss on all tokens. Also measures the
bf16 matmul rate (8192³) as the MFU ceiling.

--save DIR writes the random-init base model first (save_pretrained, bf16 safetensors, one shard) so that
bench/gpu/model-bench.ts trains exactly the same weights. --runs is a comma list of <checkpointing 0|1>x<batch>,
all measured on the one model. Prints one line per run and writes JSON with --json.
"""
import argparse, json, os, time
import torch

p = argparse.ArgumentParser()
p.add_argument('--hidden', type=int, default=2048)
p.add_argument('--ff', type=int, default=5632)
p.add_argument('--layers', type=int, default=22)
p.add_argument('--heads', type=int, default=32)
p.add_argument('--kv-heads', type=int, default=4)
p.add_argument('--vocab', type=int, default=32000)
p.add_argument('--seq', type=int, default=1024)
p.add_argument('--steps', type=int, default=3)
p.add_argument('--runs', default='0x8', help='comma list of <checkpointing 0|1>x<batch>')
p.add_argument('--save', help='write the random-init base model here (HF format) before training')
p.add_argument('--no-train', action='store_true', help='only write the checkpoint')
p.add_argument('--json')
a = p.parse_args()

dev = 'cuda'
res = {'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(0), 'config': vars(a)}

# bf16 GEMM ceiling, random data, median of 10 after 3 warm-ups
n = 8192
x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
ts = []
for i in range(13):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); x @ y; e.record(); torch.cuda.synchronize()
    if i >= 3: ts.append(s.elapsed_time(e))
ts.sort()
res['gemmTflops'] = 2 * n ** 3 / (ts[len(ts) // 2] * 1e-3) / 1e12
del x, y

import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
import peft
res['transformers'], res['peft'] = transformers.__version__, peft.__version__

cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.kv_heads, vocab_size=a.vocab, max_position_embeddings=max(2048, a.seq),
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
cfg._attn_implementation = 'sdpa'
torch.manual_seed(0)
t0 = time.perf_counter()
prev = torch.get_default_dtype()
torch.set_default_dtype(torch.bfloat16)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(prev)
model.config.use_cache = False
res['initSeconds'] = time.perf_counter() - t0
if a.save:
    t0 = time.perf_counter()
    os.makedirs(a.save, exist_ok=True)
    model.save_pretrained(a.save, safe_serialization=True, max_shard_size='1000GB')
    res['saveSeconds'] = time.perf_counter() - t0
    print(f"saved {sum(q.numel() for q in model.parameters()) / 1e9:.2f} B params to {a.save} in {res['saveSeconds']:.1f} s", flush=True)
if a.no_train:
    raise SystemExit(0)

lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM',
                  target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
model = get_peft_model(model, lcfg)
for prm in model.parameters():
    if prm.requires_grad:
        prm.data = prm.data.float()  # fp32 LoRA master weights (PEFT's autocast_adapter_dtype does this too)
params = [q for q in model.parameters() if q.requires_grad]
H, I, L, V, Hq, Hk = a.hidden, a.ff, a.layers, a.vocab, a.heads, a.kv_heads
D = H // Hq
layer_params = H * Hq * D * 2 + 2 * H * Hk * D + 3 * H * I
flops_tok = 4 * (L * layer_params + V * H) + L * 6 * a.seq * Hq * D
res['flopsPerToken'] = flops_tok
runs = []
for spec in a.runs.split(','):
    ck, B = spec.split('x')
    ck, B = ck == '1', int(B)
    r = {'ckpt': ck, 'batch': B, 'seq': a.seq}
    base = model.get_base_model()
    if ck:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()
    base.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, a.vocab, (B, a.seq), device=dev, generator=g)

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    try:
        torch.cuda.empty_cache()
        losses = [step(), step()]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.steps):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize(); times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        med = times[len(times) // 2]
        tok = B * a.seq / (med / 1000)
        r.update({'stepMsMedian': med, 'stepMs': times, 'tokensPerSec': tok, 'losses': losses,
                  'peakGiB': torch.cuda.max_memory_allocated() / 2 ** 30,
                  'peakReservedGiB': torch.cuda.max_memory_reserved() / 2 ** 30,
                  'mfu': tok * flops_tok / (res['gemmTflops'] * 1e12)})
        print(f"torch+peft L{L} H{H} B{B} T{a.seq} ckpt={int(ck)}: {med:.1f} ms/step, {tok:.0f} tok/s, "
              f"peak {r['peakGiB']:.2f} GiB (reserved {r['peakReservedGiB']:.2f}), MFU {r['mfu'] * 100:.1f}% of "
              f"{res['gemmTflops']:.0f} TFLOP/s, losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
    except torch.cuda.OutOfMemoryError as e:
        r['error'] = 'out of memory: ' + str(e).split('\n')[0][:200]
        print(f"torch+peft B{B} ckpt={int(ck)}: OOM", flush=True)
    opt.zero_grad(set_to_none=True)
    del opt
    torch.cuda.empty_cache()
    runs.append(r)
res['runs'] = runs
print('TORCH_JSON ' + json.dumps(res))
if a.json:
    with open(a.json, 'w') as f:
        json.dump(res, f, indent=2)
