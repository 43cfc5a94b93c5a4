#!/usr/bin/env python3
"""Writes the PyTorch `.bin` fixtures that test/formats/torch-bin*.test.ts reads with common/torch-pickle.ts.

    /usr/bin/python3 test/reference/make_torch_bin.py   # -> test/fixtures/torch-bin/ (about 28 KB)

Every checkpoint is written by `torch.save` itself (torch >= 1.6 zip serialization), the way
`save_pretrained` wrote ChatGLM2-6B's shards. `expected.json` holds, for every tensor of every checkpoint, the
dtype, the shape and the bytes of `t.contiguous()` (little-endian, base64), so the TypeScript reader is checked
bit for bit, views included: a transposed view, a slice sharing its storage at an offset, a stride-0 expand,
an empty tensor, a 0-d tensor, an nn.Parameter. Deterministic (fixed seed); re-running rewrites the same
bytes (torch writes zero zip timestamps; the DEFLATE copy uses a fixed one), except legacy.bin, whose storage keys
are object addresses.

Also written: the same state dict pickled with protocol 4 (FRAME / SHORT_BINUNICODE / STACK_GLOBAL / MEMOIZE),
re-zipped with DEFLATE by Python's zipfile, a sharded pair + `pytorch_model.bin.index.json`, a pre-1.6 legacy
checkpoint (`_use_new_zipfile_serialization=False`), and a malicious one whose pickle calls `os.system`
(it must be refused, never executed).
"""
import base64
import json
import os
import shutil
import sys
import zipfile

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures', 'torch-bin')

DTYPE = {
    torch.float16: 'F16', torch.bfloat16: 'BF16', torch.float32: 'F32', torch.float64: 'F64',
    torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8', torch.bool: 'BOOL',
}


def raw_bytes(t: torch.Tensor) -> bytes:
    c = t.detach().contiguous()
    if c.dtype == torch.bfloat16:
        c = c.view(torch.int16)  # numpy has no bfloat16; the bits are what we compare
    return c.numpy().tobytes()  # host order: little-endian on every machine we run this on


def describe(sd) -> dict:
    return {name: {'dtype': DTYPE[t.dtype], 'shape': list(t.shape), 'data': base64.b64encode(raw_bytes(t)).decode()}
            for name, t in sd.items()}


class Evil:
    """Pickles as `os.system('echo pwned > ...')`; a safe reader refuses it instead of calling it."""

    def __reduce__(self):
        return (os.system, ('echo pwned > /tmp/dqlora-torch-bin-pwned',))


def main() -> None:
    torch.manual_seed(1234)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    expected = {'torch': torch.__version__, 'checkpoints': {}}

    # A tiny module's state dict (an OrderedDict carrying `_metadata`, which torch pickles through BUILD) plus
    # one tensor of each dtype and every kind of view torch.save keeps as a view of a shared storage.
    lin = torch.nn.Linear(4, 3).half()
    sd = lin.state_dict()
    base = torch.randn(8, 16).half()                      # [8, 16] fp16, contiguous
    sd['f16'] = base
    sd['f16_t'] = base.t()                                # [16, 8] transposed view of the same storage
    sd['f16_row3'] = base[3]                              # [16] view at storage offset 48
    sd['f16_cols'] = base[2:6, 5:11]                      # [4, 6] strided window, offset 37
    sd['bf16'] = (torch.randn(4, 5) * 100).bfloat16()
    f32 = torch.randn(3, 7)
    f32[0, 0] = float('inf')
    f32[0, 1] = float('-inf')
    f32[0, 2] = float('nan')
    f32[0, 3] = -0.0
    sd['f32'] = f32
    sd['f64'] = torch.randn(2, 2, dtype=torch.float64)
    sd['i64'] = torch.tensor([0, -1, 2**40, -2**40, 7], dtype=torch.int64)
    sd['i64_small'] = torch.tensor([[1, -2], [300000, -2147483648]], dtype=torch.int64)
    sd['i32'] = torch.tensor([5, -6, 2147483647], dtype=torch.int32)
    sd['i16'] = torch.tensor([-32768, 32767, 1], dtype=torch.int16)
    sd['i8'] = torch.tensor([-128, 127, 0, 3], dtype=torch.int8)
    sd['u8'] = torch.tensor([0, 255, 17], dtype=torch.uint8)
    sd['bool'] = torch.tensor([True, False, True])
    sd['expand'] = torch.arange(3, dtype=torch.float32).expand(4, 3)   # stride (0, 1)
    sd['empty'] = torch.zeros(0, 4)
    sd['scalar'] = torch.tensor(2.5, dtype=torch.float32)               # 0-d
    sd['perm3d'] = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4).permute(2, 0, 1)  # [4, 2, 3]

    single = os.path.join(OUT, 'single')
    os.makedirs(single)
    torch.save(sd, os.path.join(single, 'pytorch_model.bin'))
    expected['checkpoints']['single/pytorch_model.bin'] = describe(sd)
    assert_same(sd, torch.load(os.path.join(single, 'pytorch_model.bin')))

    # An nn.Parameter is pickled through torch._utils._rebuild_parameter.
    param = {'p': torch.nn.Parameter(torch.randn(2, 3)), 'q': torch.ones(2, dtype=torch.float16)}
    torch.save(param, os.path.join(OUT, 'parameter.bin'))
    expected['checkpoints']['parameter.bin'] = describe(param)

    proto4 = {k: sd[k] for k in ('f16', 'f16_t', 'bf16', 'scalar', 'i64')}
    torch.save(proto4, os.path.join(OUT, 'protocol4.bin'), pickle_protocol=4)
    expected['checkpoints']['protocol4.bin'] = describe(proto4)

    # The same archive with every member DEFLATEd (torch writes STORED; other zip tools may not).
    with zipfile.ZipFile(os.path.join(OUT, 'protocol4.bin')) as src, \
            zipfile.ZipFile(os.path.join(OUT, 'deflated.bin'), 'w', compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            # A fixed timestamp keeps the fixture byte-identical across runs.
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), src.read(info.filename),
                         compress_type=zipfile.ZIP_DEFLATED)
    expected['checkpoints']['deflated.bin'] = describe(proto4)
    assert_same(proto4, torch.load(os.path.join(OUT, 'deflated.bin')))

    # A sharded fp16 model as transformers writes it: shards of plain dicts + an index.
    sharded = os.path.join(OUT, 'sharded')
    os.makedirs(sharded)
    names = ['transformer.embedding.word_embeddings.weight', 'transformer.encoder.layers.0.input_layernorm.weight',
             'transformer.encoder.layers.0.self_attention.query_key_value.weight',
             'transformer.encoder.layers.0.self_attention.query_key_value.bias',
             'transformer.encoder.final_layernorm.weight', 'transformer.output_layer.weight']
    shapes = [[32, 16], [16], [24, 16], [24], [16], [32, 16]]
    tensors = {n: torch.randn(*s).half() for n, s in zip(names, shapes)}
    shard_of = {n: (1 if i < 3 else 2) for i, n in enumerate(names)}
    weight_map = {}
    for k in (1, 2):
        fname = f'pytorch_model-{k:05d}-of-00002.bin'
        part = {n: t for n, t in tensors.items() if shard_of[n] == k}
        torch.save(part, os.path.join(sharded, fname))
        expected['checkpoints'][f'sharded/{fname}'] = describe(part)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(sharded, 'pytorch_model.bin.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}, f, indent=2)
        f.write('\n')

    legacy = {'w': torch.ones(2, 2)}
    torch.save(legacy, os.path.join(OUT, 'legacy.bin'), _use_new_zipfile_serialization=False)

    torch.save({'w': torch.ones(2), 'evil': Evil()}, os.path.join(OUT, 'malicious.bin'))

    with open(os.path.join(OUT, 'expected.json'), 'w') as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write('\n')
    size = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(OUT) for x in fs)
    print(f'wrote {OUT} ({size} bytes) with torch {torch.__version__}', file=sys.stderr)


def assert_same(a, b) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].stride() == b[k].stride(), k
        assert raw_bytes(a[k]) == raw_bytes(b[k]), k


if __name__ == '__main__':
    main()
