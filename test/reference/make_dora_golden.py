#!/usr/bin/env python3
"""PEFT 0.21 DoRA reference (the exact script run on the device machine, 2026-12-06, CPU torch 2.11, fp32, eager):
use_dora, r 4, alpha 8, all-linear, dropout 0 on test/fixtures/golden/llama-gqa/model; lora_B := N(0, 0.1),
magnitude *= 1 + 0.1 N; loss, every trainable gradient (PEFT's saved key names) + logits of sequence 0, the saved
adapter. Run from test/fixtures/golden/llama-gqa with OUT set:  cd test/fixtures/golden/llama-gqa &&
OUT=DIR CUDA_VISIBLE_DEVICES= python3 ../../../reference/make_dora_golden.py   → DIR/dora (= golden-dora/llama-gqa)
Kept compact: the device tool takes a 2,000-character command and copies the main checkout, not a branch.
"""
import json,torch,os,peft
from transformers import AutoModelForCausalLM as A
from peft import LoraConfig,get_peft_model
from safetensors.torch import save_file
from safetensors import safe_open
d=os.environ['OUT']+'/dora';e=json.load(open('expected.json'));b=e['batch']
m=A.from_pretrained('model',dtype=torch.float32,attn_implementation='eager')
torch.manual_seed(4242)
p=get_peft_model(m,LoraConfig(r=4,lora_alpha=8,lora_dropout=0.0,target_modules='all-linear',use_dora=True,task_type='CAUSAL_LM'))
g=torch.Generator().manual_seed(4343)
with torch.no_grad():
 for n,q in p.named_parameters():
  if 'lora_B' in n:q.copy_((torch.randn(q.shape,generator=g,dtype=torch.float64)*0.1).float())
  elif 'lora_magnitude_vector' in n:q.mul_((1+0.1*torch.randn(q.shape,generator=g,dtype=torch.float64)).float())
p.eval()
i=torch.tensor(b['input_ids']);L=torch.tensor(b['labels'])
r=p(input_ids=i,attention_mask=torch.tensor(b['attention_mask']),labels=L);r.loss.backward()
k=lambda n:n.split('.lora_magnitude_vector.')[0]+'.lora_magnitude_vector' if '.lora_magnitude_vector.' in n else n.replace('.default','')
G={k(n):q.grad.detach().float().contiguous() for n,q in p.named_parameters() if q.requires_grad}
with torch.no_grad():G['logits0']=p(input_ids=i[:1]).logits[0].float().contiguous()
p.save_pretrained(d+'/adapter');save_file(G,d+'/grads.safetensors',metadata={'format':'pt'})
ks=sorted(safe_open(d+'/adapter/adapter_model.safetensors','pt').keys())
json.dump({'case':'dora-llama-gqa','note':'PEFT DoRA on golden/llama-gqa/model (fp32, CPU, eager); see test/reference/make_noquant_golden.py dora()','loss':float(r.loss),'num_targets':int((L[:,1:]!=-100).sum()),'batch':b,'grad_keys':sorted(x for x in G if x!='logits0'),'adapter_keys':ks,'versions':{'torch':torch.__version__,'peft':peft.__version__}},open(d+'/expected.json','w'),indent=1)
print(float(r.loss),len(ks))
