#!/usr/bin/env python3
"""PEFT 0.21 DoRA training reference (run on the device machine, 2026-12-06): the adapter of make_dora_golden.py
(same seeds), 3 torch AdamW steps (lr 1e-2, betas 0.9/0.999, eps 1e-8, wd 0, no clipping) on the golden batch;
losses, the trained adapter and the logits of sequence 0 → DIR/trained (= golden-dora/llama-gqa/peft-trained).
Run like make_dora_golden.py.
"""
import json,torch,os,peft
from transformers import AutoModelForCausalLM as A
from peft import LoraConfig,get_peft_model
from safetensors.torch import save_file
d=os.environ['OUT']+'/trained';b=json.load(open('expected.json'))['batch']
m=A.from_pretrained('model',dtype=torch.float32,attn_implementation='eager')
torch.manual_seed(4242)
p=get_peft_model(m,LoraConfig(r=4,lora_alpha=8,lora_dropout=0.0,target_modules='all-linear',use_dora=True,task_type='CAUSAL_LM'))
g=torch.Generator().manual_seed(4343)
with torch.no_grad():
 for n,q in p.named_parameters():
  if 'lora_B' in n:q.copy_((torch.randn(q.shape,generator=g,dtype=torch.float64)*0.1).float())
  elif 'lora_magnitude_vector' in n:q.mul_((1+0.1*torch.randn(q.shape,generator=g,dtype=torch.float64)).float())
p.eval()
i=torch.tensor(b['input_ids']);L=torch.tensor(b['labels']);M=torch.tensor(b['attention_mask'])
o=torch.optim.AdamW([q for q in p.parameters() if q.requires_grad],lr=1e-2,betas=(0.9,0.999),eps=1e-8,weight_decay=0.0)
ls=[]
for s in range(3):
 r=p(input_ids=i,attention_mask=M,labels=L);r.loss.backward();o.step();o.zero_grad();ls.append(r.loss.item())
with torch.no_grad():z=p(input_ids=i[:1]).logits[0].float().contiguous()
p.save_pretrained(d+'/adapter');save_file({'logits0':z},d+'/logits0.safetensors',metadata={'format':'pt'})
json.dump({'note':'PEFT 0.21 DoRA adapter of expected.json, 3 torch AdamW steps (lr 1e-2, betas 0.9/0.999, eps 1e-8, wd 0, no clipping) on the golden batch','losses':ls,'versions':{'torch':torch.__version__,'peft':peft.__version__}},open(d+'/trained.json','w'),indent=1)
print(ls)
