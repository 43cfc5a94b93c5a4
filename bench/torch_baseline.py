#!/usr/bin/env python3
"""PyTorch CPU baseline for bench/cpu.ts: LoRA training tokens/s of the same Llama shape.

Debian's python3-torch (1.13) + OpenBLAS, fp32, a hand-written Llama (transformers is not packaged in Debian):
RMSNorm, RoPE (rotate_half), causal GQA attention, SwiGLU, frozen dense base weights, LoRA (r, alpha) on all
linear layers, AdamW on the LoRA weights only, loss on all tokens. Prints one JSON line.

usage: python3 bench/torch_baseline.py --hidden 256 --layers 4 --heads 8 --kv-heads 4 --ff 704 --vocab 2048 \
       --batch 8 --seq 256 --rank 16 --steps 5 --threads 2 [--checkpointing]
"""
import argparse, json, math, time
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class LoraLinear(nn.Module):
    def __init__(self, i, o, r, alpha):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) * 0.02, requires_grad=False)
        self.a = nn.Parameter(torch.empty(r, i).uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i)))
        self.b = nn.Parameter(torch.zeros(o, r))
        self.s = alpha / r

    def forward(self, x):
        return F.linear(x, self.w) + F.linear(F.linear(x, self.a), self.b) * self.s


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class Layer(nn.Module):
    def __init__(self, a):
        super().__init__()
        H, D = a.hidden, a.hidden // a.heads
        self.a, self.D = a, D
        self.q = LoraLinear(H, a.heads * D, a.rank, 2 * a.rank)
        self.k = LoraLinear(H, a.kv_heads * D, a.rank, 2 * a.rank)
        self.v = LoraLinear(H, a.kv_heads * D, a.rank, 2 * a.rank)
        self.o = LoraLinear(a.heads * D, H, a.rank, 2 * a.rank)
        self.g = LoraLinear(H, a.ff, a.rank, 2 * a.rank)
        self.u = LoraLinear(H, a.ff, a.rank, 2 * a.rank)
        self.d = LoraLinear(a.ff, H, a.rank, 2 * a.rank)
        self.n1 = nn.Parameter(torch.ones(H), requires_grad=False)
        self.n2 = nn.Parameter(torch.ones(H), requires_grad=False)

    def forward(self, x, cos, sin, mask):
        a, D = self.a, self.D
        B, T, H = x.shape
        y = rms(x, self.n1)
        q = self.q(y).view(B, T, a.heads, D).transpose(1, 2)
        k = self.k(y).view(B, T, a.kv_heads, D).transpose(1, 2)
        v = self.v(y).view(B, T, a.kv_heads, D).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        rep = a.heads // a.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        x = x + self.o(o)
        y = rms(x, self.n2)
        return x + self.d(F.silu(self.g(y)) * self.u(y))


def main():
    p = argparse.ArgumentParser()
    for k, d in [('hidden', 256), ('layers', 4), ('heads', 8), ('kv-heads', 4), ('ff', 704), ('vocab', 2048),
                 ('batch', 8), ('seq', 256), ('rank', 16), ('steps', 5), ('threads', 2)]:
        p.add_argument('--' + k, type=int, default=d)
    p.add_argument('--checkpointing', action='store_true')
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    emb = torch.randn(a.vocab, a.hidden) * 0.125
    layers = nn.ModuleList([Layer(a) for _ in range(a.layers)])
    norm = torch.ones(a.hidden)
    D = a.hidden // a.heads
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(a.seq).float(), inv)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    mask = torch.full((a.seq, a.seq), float('-inf')).triu(1)
    params = [p for p in layers.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))

    def step():
        x = emb[ids]
        for l in layers:
            x = checkpoint(l, x, cos, sin, mask, use_reentrant=False) if a.checkpointing else l(x, cos, sin, mask)
        logits = rms(x, norm) @ emb.t()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({'torch': torch.__version__, 'threads': a.threads, 'seconds_per_step': dt,
                      'tokens_per_second': a.batch * a.seq / dt, 'checkpointing': a.checkpointing}))


if __name__ == '__main__':
    main()
