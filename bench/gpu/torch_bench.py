#!/usr/bin/env python3
"""PyTorch + PEFT reference for bench/gpu.sh: QLoRA-style training throughput of the same Llama shape.

transformers LlamaForCausalLM, random init, bf16 base weights (bitsandbytes is not on the GPU machine), SDPA
attention, PEFT LoRA r=16 alpha=32 on all 7 linear layers (fp32 adapters, autocast bf16), AdamW on the LoRA
weights, loss on all tokens, no gradient checkpointing unless --checkpointing. Also measures the bf16 matmul
rate (8192³) as the MFU ceiling. Prints a summary line and writes JSON with --json.
"""
import argparse, json, time
import torch

p = argparse.ArgumentParser()
p.add_argument('--hidden', type=int, default=2048)
p.add_argument('--ff', type=int, default=5632)
p.add_argument('--layers', type=int, default=22)
p.add_argument('--heads', type=int, default=32)
p.add_argument('--kv-heads', type=int, default=4)
p.add_argument('--vocab', type=int, default=32000)
p.add_argument('--batch', type=int, default=8)
p.add_argument('--seq', type=int, default=1024)
p.add_argument('--steps', type=int, default=5)
p.add_argument('--checkpointing', action='store_true')
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

from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.kv_heads, vocab_size=a.vocab, max_position_embeddings=max(2048, a.seq),
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
cfg._attn_implementation = 'sdpa'
torch.manual_seed(0)
prev = torch.get_default_dtype()
torch.set_default_dtype(torch.bfloat16)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(prev)
model.config.use_cache = False
if a.checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    model.enable_input_require_grads()
lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM',
                  target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
model = get_peft_model(model, lcfg)
for prm in model.parameters():
    if prm.requires_grad:
        prm.data = prm.data.float()  # fp32 LoRA master weights (PEFT's autocast_adapter_dtype does this too)
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
g = torch.Generator(device=dev).manual_seed(1)
ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev, generator=g)


def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


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
tok = a.batch * a.seq / (med / 1000)
H, I, L, V, Hq, Hk = a.hidden, a.ff, a.layers, a.vocab, a.heads, a.kv_heads
D = H // Hq
layer_params = H * Hq * D * 2 + 2 * H * Hk * D + 3 * H * I
flops_tok = 4 * (L * layer_params + V * H) + L * 6 * a.seq * Hq * D
res.update({'stepMsMedian': med, 'stepMs': times, 'tokensPerSec': tok, 'losses': losses,
            'peakGiB': torch.cuda.max_memory_allocated() / 2 ** 30, 'flopsPerToken': flops_tok,
            'mfu': tok * flops_tok / (res['gemmTflops'] * 1e12)})
print(f"torch+peft L{L} B{a.batch} T{a.seq} ckpt={a.checkpointing}: {med:.1f} ms/step, {tok:.0f} tok/s, "
      f"peak {res['peakGiB']:.2f} GiB, MFU {res['mfu'] * 100:.1f}% of {res['gemmTflops']:.0f} TFLOP/s bf16 GEMM")
print('TORCH_JSON ' + json.dumps(res))
if a.json:
    with open(a.json, 'w') as f:
        json.dump(res, f, indent=2)
