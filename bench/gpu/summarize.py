#!/usr/bin/env python3
"""Merges the JSON of bench/gpu.sh's runs (argv[1]: the work folder) into one JSON (argv[2]) and prints the markdown
table: dqlora (model-bench.ts) next to PyTorch + PEFT (torch_bench.py), run by run."""
import json, os, sys

work, merged_path = sys.argv[1], sys.argv[2]


def load(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else None


data = {n[:-5]: load(n) for n in sorted(os.listdir(work)) if n.endswith('.json')}
json.dump(data, open(merged_path, 'w'), indent=1)


def f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else '—'


out = []
ceil = [d.get('gemmTflops') for d in data.values() if d and d.get('gemmTflops')]
if ceil:
    out.append(f"bf16 GEMM 8192³ measured in this call: {', '.join(f'{c:.0f}' for c in ceil)} TFLOP/s "
               "(dqlora cuBLASLt / torch); MFU = tokens/s × model FLOPs per token / that rate.\n")
for label, dqn, tn in [('TinyLlama-1.1B shape (d2048, 22 L, GQA 32/4, ff 5632, V 32000)', 'dq-tinyllama', 'torch-tinyllama'),
                       ('Llama-2-7B shape (d4096, 32 L, MHA 32, ff 11008, V 32000)', 'dq-7b', 'torch-7b')]:
    dq, tq = data.get(dqn), data.get(tn)
    if not dq and not tq:
        continue
    out.append(f"### {label}, seq {(dq or tq).get('seq') or (tq or {}).get('config', {}).get('seq')}, LoRA r16 all-linear\n")
    if dq:
        ld = dq.get('load', {})
        out.append(f"dqlora load: {f(ld.get('seconds'), '.1f')} s, {f(ld.get('weightsGiB'), '.2f')} GiB resident after load "
                   f"(NF4+DQ base, bf16 embed/head, fp32 LoRA + AdamW state); {dq.get('model', {}).get('loraParams', 0) / 1e6:.1f} M LoRA params.\n")
    at = (dq or {}).get('attention')
    if at:
        out.append(f"attention alone (B8, this shape): v1 (WMMA) fwd {at['v1FwdMs']:.3f} ms = {at['v1FwdTflops']:.0f} TFLOP/s, bwd {at['v1BwdMs']:.3f} ms = "
                   f"{at['v1BwdTflops']:.0f}; v2 (mma.sync) fwd {at['v2FwdMs']:.3f} ms = {at['v2FwdTflops']:.0f}, bwd {at['v2BwdMs']:.3f} ms = {at['v2BwdTflops']:.0f}; "
                   f"v2 vs v1 max err: out {at['v2VsV1Err_out']:.1e}, dq {at['v2VsV1Err_dq']:.1e}, dk {at['v2VsV1Err_dk']:.1e}, dv {at['v2VsV1Err_dv']:.1e}\n")
    out.append('| ckpt | batch | dqlora tok/s | torch tok/s | ratio | dqlora peak live / reserved / device GiB | torch peak alloc / reserved GiB | dqlora MFU | torch MFU | dqlora first→last loss | torch first→last loss |')
    out.append('|---|---|---|---|---|---|---|---|---|---|---|')
    keys = []
    for d in (dq, tq):
        for r in (d or {}).get('runs', []):
            k = (bool(r['ckpt']), r['batch'])
            if k not in keys:
                keys.append(k)
    for k in keys:
        a = next((r for r in (dq or {}).get('runs', []) if (bool(r['ckpt']), r['batch']) == k), {})
        b = next((r for r in (tq or {}).get('runs', []) if (bool(r['ckpt']), r['batch']) == k), {})
        ratio = a['tokensPerSec'] / b['tokensPerSec'] if a.get('tokensPerSec') and b.get('tokensPerSec') else None
        dmem = f"{f(a.get('peakInUseGiB'), '.2f')} / {f(a.get('peakReservedGiB'), '.2f')} / {f(a.get('deviceUsedGiB'), '.2f')}" if a.get('tokensPerSec') else (a.get('error', '—')[:60])
        tmem = f"{f(b.get('peakGiB'), '.2f')} / {f(b.get('peakReservedGiB'), '.2f')}" if b.get('tokensPerSec') else (b.get('error', '—')[:60])
        la = f"{a['losses'][0]:.3f}→{a['losses'][-1]:.3f}" if a.get('losses') else '—'
        lb = f"{b['losses'][0]:.3f}→{b['losses'][-1]:.3f}" if b.get('losses') else '—'
        out.append(f"| {'on' if k[0] else 'off'} | {k[1]} | {f(a.get('tokensPerSec'), ',.0f')} | {f(b.get('tokensPerSec'), ',.0f')} | "
                   f"{f(ratio, '.2f')}{'×' if ratio else ''} | {dmem} | {tmem} | {f(a.get('mfu') and a['mfu'] * 100, '.1f')}% | "
                   f"{f(b.get('mfu') and b['mfu'] * 100, '.1f')}% | {la} | {lb} |")
    out.append('')
lay, tl = data.get('cuda-bench'), data.get('torch-layer')
if lay:
    tr = lay['train']
    tt = (tl or {}).get('runs', [{}])[0]
    out.append(f"Layer-stack microbenchmark: dqlora {tr['tokensPerSec']:.0f} tok/s (peak reserved {tr['peakReservedGiB']:.2f} GiB), "
               f"torch {f(tt.get('tokensPerSec'), '.0f')} tok/s (peak {f(tt.get('peakGiB'), '.2f')} GiB).\n")
print('\n'.join(out))
