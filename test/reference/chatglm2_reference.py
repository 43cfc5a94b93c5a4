#!/usr/bin/env python3
"""Golden numbers for ChatGLM2 (the seed model's architecture) from an independent PyTorch implementation.

The real THUDM/chatglm2-6b modeling code is remote code on the Hub and not reachable here, so this file
re-implements its forward pass from qlora-spec.md §10.3 in plain PyTorch, written the way the original is
(interleaved RoPE on the first half of each head, packed query_key_value with bias, multi-query attention,
SwiGLU from a packed dense_h_to_4h, RMSNorm with the weight applied before the cast) — deliberately NOT the way
dqlora computes it (dqlora permutes q/k rows to rotate_half and splits packed modules). LoRA as PEFT does it on
the packed modules: y = W x + b + (alpha/r) · B (A x).

Weights are "NF4-exact": every block of 64 consecutive elements is table[code] · absmax with a ±1 code present,
so NF4 without double quantization reproduces them bit for bit — the test compares architecture, not rounding.

Writes test/fixtures/golden-chatglm/<case>/{model/config.json, model/model.safetensors, adapter/*, expected.json,
grads.safetensors}. Run with Debian's python3-torch (CPU, fp32):
    /usr/bin/python3 test/reference/chatglm2_reference.py
"""
import json, math, os, struct, sys
import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def save_safetensors(path, tensors, metadata=None):
    """Minimal safetensors writer (F32 / I64), names sorted, offsets contiguous."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        dt = {torch.float32: 'F32', torch.int64: 'I64'}[t.dtype]
        b = t.numpy().tobytes()
        header[name] = {'dtype': dt, 'shape': list(t.shape), 'data_offsets': [off, off + len(b)]}
        blobs.append(b); off += len(b)
    if metadata: header['__metadata__'] = metadata
    h = json.dumps(header, separators=(',', ':')).encode()
    h += b' ' * ((8 - len(h) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(h))); f.write(h)
        for b in blobs: f.write(b)


def nf4_exact(shape, g):
    """Random weights that NF4 (blocksize 64, no double quant) represents exactly."""
    n = math.prod(shape)
    assert n % 64 == 0
    table = torch.tensor(NF4, dtype=torch.float32)
    codes = torch.randint(0, 16, (n // 64, 64), generator=g)
    codes[:, torch.randint(0, 64, (1,), generator=g)] = 15  # max |w| = absmax exactly
    absmax = (0.05 + 0.25 * torch.rand(n // 64, 1, generator=g)).float()
    return (table[codes] * absmax).reshape(shape)


def rms(x, w, eps):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (w * (x * torch.rsqrt(v + eps))).to(x.dtype)


def rope_cache(seq, rot, base=10000.0):
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))   # [rot/2]
    idx = torch.outer(torch.arange(seq, dtype=torch.float), theta)
    return torch.stack([torch.cos(idx), torch.sin(idx)], dim=-1)                  # [seq, rot/2, 2]


def apply_rope(x, cache):
    # x [b, sq, np, hn]; interleaved pairs (2i, 2i+1) over the first rot dims, the rest passes through
    rot = cache.shape[-2] * 2
    x, xp = x[..., :rot], x[..., rot:]
    b, sq, np_, _ = x.shape
    xs = x.reshape(b, sq, np_, rot // 2, 2)
    c = cache[:sq].view(1, sq, 1, rot // 2, 2)
    out = torch.stack([xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
                       xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1).flatten(3)
    return torch.cat((out, xp), dim=-1)


def lora(x, A, B, scale):
    return (x @ A.t()) @ B.t() * scale


def forward(P, cfg, ids, mask, loras, scale):
    H, nh, hn, ng = cfg['hidden_size'], cfg['num_attention_heads'], cfg['kv_channels'], cfg['multi_query_group_num']
    eps = cfg['layernorm_epsilon']
    b, sq = ids.shape
    x = P['transformer.embedding.word_embeddings.weight'][ids]
    cache = rope_cache(sq, hn // 2)
    causal = torch.tril(torch.ones(sq, sq, dtype=torch.bool))
    allowed = causal[None, None] & mask[:, None, None, :].bool()                 # [b, 1, sq, sq]
    for l in range(cfg['num_layers']):
        p = f'transformer.encoder.layers.{l}'
        def lin(name, inp):
            y = inp @ P[f'{p}.{name}.weight'].t()
            if f'{p}.{name}.bias' in P: y = y + P[f'{p}.{name}.bias']
            key = f'{p}.{name}'
            if key in loras: y = y + lora(inp, loras[key][0], loras[key][1], scale)
            return y
        h = rms(x, P[f'{p}.input_layernorm.weight'], eps)
        mixed = lin('self_attention.query_key_value', h)
        q, k, v = mixed.split([nh * hn, ng * hn, ng * hn], dim=-1)
        q = apply_rope(q.view(b, sq, nh, hn), cache)
        k = apply_rope(k.view(b, sq, ng, hn), cache)
        v = v.view(b, sq, ng, hn)
        rep = nh // ng
        k = k.unsqueeze(3).expand(b, sq, ng, rep, hn).reshape(b, sq, nh, hn)      # head h uses group h // rep
        v = v.unsqueeze(3).expand(b, sq, ng, rep, hn).reshape(b, sq, nh, hn)
        s = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hn)
        s = s.masked_fill(~allowed, float('-inf'))
        pr = torch.softmax(s.float(), dim=-1)
        pr = torch.nan_to_num(pr, nan=0.0)
        ctx = torch.einsum('bhqk,bkhd->bqhd', pr, v).reshape(b, sq, nh * hn)
        x = x + lin('self_attention.dense', ctx)
        h = rms(x, P[f'{p}.post_attention_layernorm.weight'], eps)
        gu = lin('mlp.dense_h_to_4h', h)
        g, u = gu.chunk(2, dim=-1)
        x = x + lin('mlp.dense_4h_to_h', torch.nn.functional.silu(g) * u)
    x = rms(x, P['transformer.encoder.final_layernorm.weight'], eps)
    return x @ P['transformer.output_layer.weight'].t()


def make_case(out, name, targets, rslora, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = {
        'architectures': ['ChatGLMModel'], 'model_type': 'chatglm', 'add_bias_linear': False, 'add_qkv_bias': True,
        'apply_query_key_layer_scaling': True, 'apply_residual_connection_post_layernorm': False,
        'attention_dropout': 0.0, 'attention_softmax_in_fp32': True, 'bias_dropout_fusion': True,
        'ffn_hidden_size': 96, 'fp32_residual_connection': False, 'hidden_dropout': 0.0, 'hidden_size': 64,
        'kv_channels': 16, 'layernorm_epsilon': 1e-05, 'multi_query_attention': True, 'multi_query_group_num': 2,
        'num_attention_heads': 4, 'num_layers': 2, 'original_rope': True, 'padded_vocab_size': 128,
        'post_layer_norm': True, 'rmsnorm': True, 'seq_length': 256, 'use_cache': True, 'torch_dtype': 'float32',
        'transformers_version': '4.30.2', 'tie_word_embeddings': False, 'eos_token_id': 2, 'pad_token_id': 0,
        'auto_map': {'AutoConfig': 'configuration_chatglm.ChatGLMConfig', 'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
    }
    H, I, V, hn, nh, ng = 64, 96, 128, 16, 4, 2
    P = {'transformer.embedding.word_embeddings.weight': torch.randn(V, H, generator=g) * 0.125,
         'transformer.output_layer.weight': torch.randn(V, H, generator=g) * 0.125,
         'transformer.encoder.final_layernorm.weight': 1 + 0.1 * torch.randn(H, generator=g)}
    for l in range(cfg['num_layers']):
        p = f'transformer.encoder.layers.{l}'
        P[f'{p}.input_layernorm.weight'] = 1 + 0.1 * torch.randn(H, generator=g)
        P[f'{p}.post_attention_layernorm.weight'] = 1 + 0.1 * torch.randn(H, generator=g)
        P[f'{p}.self_attention.query_key_value.weight'] = nf4_exact(((nh + 2 * ng) * hn, H), g)
        P[f'{p}.self_attention.query_key_value.bias'] = 0.1 * torch.randn((nh + 2 * ng) * hn, generator=g)
        P[f'{p}.self_attention.dense.weight'] = nf4_exact((H, nh * hn), g)
        P[f'{p}.mlp.dense_h_to_4h.weight'] = nf4_exact((2 * I, H), g)
        P[f'{p}.mlp.dense_4h_to_h.weight'] = nf4_exact((H, I), g)
    P = {k: v.float().contiguous() for k, v in P.items()}
    r, alpha = 4, 8
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    shapes = {'self_attention.query_key_value': ((nh + 2 * ng) * hn, H), 'self_attention.dense': (H, nh * hn),
              'mlp.dense_h_to_4h': (2 * I, H), 'mlp.dense_4h_to_h': (H, I)}
    loras = {}
    for l in range(cfg['num_layers']):
        for mod, (o, i) in shapes.items():
            if mod.split('.')[-1] not in targets: continue
            A = ((torch.rand(r, i, generator=g) * 2 - 1) / math.sqrt(i)).requires_grad_(True)
            B = (0.1 * torch.randn(o, r, generator=g)).requires_grad_(True)
            loras[f'transformer.encoder.layers.{l}.{mod}'] = (A, B)
    # batch: 3 sequences right-padded to 12; the first 3 tokens are the "prompt" (labels -100), e.g. [gMASK] sop ...
    lens, T = [12, 9, 5], 12
    ids = torch.zeros(3, T, dtype=torch.long); mask = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100, dtype=torch.long)
    for bi, L in enumerate(lens):
        ids[bi, :L] = torch.randint(3, V, (L,), generator=g); mask[bi, :L] = 1; labels[bi, 3:L] = ids[bi, 3:L]
    logits = forward(P, cfg, ids, mask, loras, scale)
    sl, tl = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(sl, tl, ignore_index=-100)
    loss.backward()
    d = os.path.join(out, name)
    os.makedirs(os.path.join(d, 'model'), exist_ok=True); os.makedirs(os.path.join(d, 'adapter'), exist_ok=True)
    json.dump(cfg, open(os.path.join(d, 'model', 'config.json'), 'w'), indent=2)
    save_safetensors(os.path.join(d, 'model', 'model.safetensors'), P, {'format': 'pt'})
    ad = {}
    grads = {}
    for k, (A, B) in loras.items():
        ad[f'base_model.model.{k}.lora_A.weight'] = A.detach(); ad[f'base_model.model.{k}.lora_B.weight'] = B.detach()
        grads[f'base_model.model.{k}.lora_A.weight'] = A.grad; grads[f'base_model.model.{k}.lora_B.weight'] = B.grad
    save_safetensors(os.path.join(d, 'adapter', 'adapter_model.safetensors'), ad, {'format': 'pt'})
    json.dump({'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': r, 'lora_alpha': alpha, 'lora_dropout': 0.0,
               'target_modules': sorted(targets), 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': rslora,
               'base_model_name_or_path': 'THUDM/chatglm2-6b (tiny random)', 'inference_mode': True},
              open(os.path.join(d, 'adapter', 'adapter_config.json'), 'w'), indent=2, sort_keys=True)
    grads['logits0'] = logits[0].detach()
    save_safetensors(os.path.join(d, 'grads.safetensors'), grads)
    json.dump({'case': name, 'loss': loss.item(), 'num_targets': int((tl != -100).sum()),
               'batch': {'input_ids': ids.tolist(), 'attention_mask': mask.tolist(), 'labels': labels.tolist()},
               'torch': torch.__version__}, open(os.path.join(d, 'expected.json'), 'w'), indent=1)
    print(name, 'loss', loss.item())


if __name__ == '__main__':
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures', 'golden-chatglm')
    make_case(root, 'chatglm-qkv', ['query_key_value'], False, 2024)
    make_case(root, 'chatglm-all', ['query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h'], True, 2025)
