# Writes the golden fixtures test/formats/reference.test.ts checks against: RoPE inv_freq of every rope type
# from transformers' own LlamaRotaryEmbedding / ROPE_INIT_FUNCTIONS (as float32 bit patterns), and a
# safetensors file written by the reference `safetensors.torch.save_file`.
# Run: OUT=test/formats/reference python3 test/formats/reference/make_fixtures.py  (needs torch, transformers, safetensors)
import json,os,torch
from transformers import LlamaConfig,Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
import transformers as T
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
O=os.environ["OUT"];R={'v':[torch.__version__,T.__version__]}
def bits(t):return t.float().contiguous().view(torch.int32).tolist()
L=dict(hidden_size=4096,num_attention_heads=32,num_key_value_heads=8,intermediate_size=64,num_hidden_layers=1,vocab_size=10)
cs={'l2':LlamaConfig(**L,rope_theta=1e4,max_position_embeddings=4096),
'l31':LlamaConfig(**L,rope_theta=5e5,max_position_embeddings=131072,rope_scaling=dict(rope_type='llama3',factor=8.0,low_freq_factor=1.0,high_freq_factor=4.0,original_max_position_embeddings=8192)),
'lin':LlamaConfig(**L,rope_theta=1e4,max_position_embeddings=4096,rope_scaling=dict(type='linear',factor=2.0)),
'dyn':LlamaConfig(**L,rope_theta=1e4,max_position_embeddings=4096,rope_scaling=dict(rope_type='dynamic',factor=4.0)),
'yarn':Qwen2Config(hidden_size=896,num_attention_heads=14,num_key_value_heads=2,intermediate_size=64,num_hidden_layers=1,vocab_size=10,rope_theta=1e6,max_position_embeddings=32768,rope_scaling=dict(type='yarn',factor=4.0,original_max_position_embeddings=32768))}
for k,c in cs.items():
  try:
    r=LlamaRotaryEmbedding(config=c);R[k]=[bits(r.inv_freq),float(r.attention_scaling)]
  except Exception as e:R[k]=repr(e)
try:
  inv,a=ROPE_INIT_FUNCTIONS['dynamic'](cs['dyn'],'cpu',seq_len=10000);R['dyn10000']=[bits(inv),a]
except Exception as e:R['dyn10000']=repr(e)
json.dump(R,open(O+'/rope.json','w'))
from safetensors.torch import save_file
save_file({'b':torch.arange(6,dtype=torch.float32).reshape(2,3),'a':torch.arange(4).to(torch.bfloat16),'c':torch.tensor([1,-2]),'z.0':torch.tensor([0.5,-1,65504],dtype=torch.float16),'m':torch.tensor([True,False]),'10':torch.tensor([7],dtype=torch.int8)},O+'/ref.safetensors',metadata={'format':'pt'})
print('ok',R['v'])
