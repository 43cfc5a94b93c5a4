#!/usr/bin/env python3
"""A tiny random ChatGLM2 checkpoint laid out exactly like THUDM/chatglm2-6b: config.json with the remote-code
fields, fp16 weights in two pickled `pytorch_model-0000k-of-00002.bin` shards written by torch.save plus
`pytorch_model.bin.index.json`, a SentencePiece `tokenizer.model` (the project's small BPE fixture) and the real
tokenizer_config.json fields. Used by test/cli/chatglm2.test.ts to run the seed's flow end to end.

    /usr/bin/python3 test/reference/make_chatglm2_tiny.py      (Debian python3-torch)
"""
import json, os, shutil, struct
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, '..', 'fixtures', 'chatglm2-tiny')
SP = os.path.join(HERE, '..', 'fixtures', 'sentencepiece', 'bpe.model')


def sp_vocab_size(path):
    """Number of pieces in a SentencePiece ModelProto (count of field-1 entries)."""
    b = open(path, 'rb').read()
    i, n = 0, 0
    def varint(i):
        v, s = 0, 0
        while True:
            c = b[i]; i += 1; v |= (c & 0x7f) << s; s += 7
            if c < 0x80: return v, i
    while i < len(b):
        key, i = varint(i)
        field, wt = key >> 3, key & 7
        if wt == 2:
            ln, i = varint(i); i += ln
            if field == 1: n += 1
        elif wt == 0: _, i = varint(i)
        elif wt == 5: i += 4
        elif wt == 1: i += 8
        else: raise ValueError('bad wire type')
    return n


def main():
    torch.manual_seed(7)
    n_sp = sp_vocab_size(SP)
    vocab = ((n_sp + 5 + 63) // 64) * 64        # SP pieces + [MASK] [gMASK] [sMASK] sop eop, padded like 65024
    H, L, nh, ng, hn, ffn = 64, 2, 4, 2, 16, 160
    cfg = {
        '_name_or_path': 'THUDM/chatglm2-6b (tiny random)', 'model_type': 'chatglm', 'architectures': ['ChatGLMModel'],
        'auto_map': {'AutoConfig': 'configuration_chatglm.ChatGLMConfig', 'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration',
                     'AutoModelForCausalLM': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
        'add_bias_linear': False, 'add_qkv_bias': True, 'apply_query_key_layer_scaling': True,
        'apply_residual_connection_post_layernorm': False, 'attention_dropout': 0.0, 'attention_softmax_in_fp32': True,
        'bias_dropout_fusion': True, 'ffn_hidden_size': ffn, 'fp32_residual_connection': False, 'hidden_dropout': 0.0,
        'hidden_size': H, 'kv_channels': hn, 'layernorm_epsilon': 1e-05, 'multi_query_attention': True,
        'multi_query_group_num': ng, 'num_attention_heads': nh, 'num_layers': L, 'original_rope': True,
        'padded_vocab_size': vocab, 'post_layer_norm': True, 'rmsnorm': True, 'seq_length': 512, 'use_cache': True,
        'torch_dtype': 'float16', 'transformers_version': '4.27.1', 'tie_word_embeddings': False, 'eos_token_id': 2, 'pad_token_id': 0,
    }
    sd = {'transformer.embedding.word_embeddings.weight': torch.randn(vocab, H) * 0.125,
          'transformer.rotary_pos_emb.inv_freq': 1.0 / (10000 ** (torch.arange(0, hn // 2, 2).float() / (hn // 2)))}
    shard2 = {}
    for l in range(L):
        p = f'transformer.encoder.layers.{l}'
        d = sd if l == 0 else shard2
        d[f'{p}.input_layernorm.weight'] = torch.ones(H)
        d[f'{p}.self_attention.query_key_value.weight'] = torch.randn((nh + 2 * ng) * hn, H) * 0.02
        d[f'{p}.self_attention.query_key_value.bias'] = torch.randn((nh + 2 * ng) * hn) * 0.02
        d[f'{p}.self_attention.dense.weight'] = torch.randn(H, nh * hn) * 0.02 / 2
        d[f'{p}.post_attention_layernorm.weight'] = torch.ones(H)
        d[f'{p}.mlp.dense_h_to_4h.weight'] = torch.randn(2 * ffn, H) * 0.02
        d[f'{p}.mlp.dense_4h_to_h.weight'] = torch.randn(H, ffn) * 0.02 / 2
    shard2['transformer.encoder.final_layernorm.weight'] = torch.ones(H)
    shard2['transformer.output_layer.weight'] = torch.randn(vocab, H) * 0.125
    if os.path.exists(OUT): shutil.rmtree(OUT)
    os.makedirs(OUT)
    weight_map, total = {}, 0
    for k, d in enumerate([sd, shard2]):
        name = f'pytorch_model-0000{k + 1}-of-00002.bin'
        d16 = {n: t.half() for n, t in d.items()}
        torch.save(d16, os.path.join(OUT, name))
        for n, t in d16.items(): weight_map[n] = name; total += t.numel() * 2
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, open(os.path.join(OUT, 'pytorch_model.bin.index.json'), 'w'), indent=2)
    json.dump(cfg, open(os.path.join(OUT, 'config.json'), 'w'), indent=2)
    shutil.copy(SP, os.path.join(OUT, 'tokenizer.model'))
    json.dump({'name_or_path': 'THUDM/chatglm2-6b', 'remove_space': False, 'do_lower_case': False, 'tokenizer_class': 'ChatGLMTokenizer',
               'auto_map': {'AutoTokenizer': ['tokenization_chatglm.ChatGLMTokenizer', None]}}, open(os.path.join(OUT, 'tokenizer_config.json'), 'w'), indent=2)
    print('vocab', vocab, 'sp', n_sp, 'bytes', total)


if __name__ == '__main__':
    main()
