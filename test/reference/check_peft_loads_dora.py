#!/usr/bin/env python3
"""Issue 13: the DoRA adapter dqlora saves loads in PEFT 0.21 with the same logits. Run on the device machine, CPU
fp32, eager, from test/fixtures/golden/llama-gqa:
  cd test/fixtures/golden/llama-gqa && OUT=DIR CUDA_VISIBLE_DEVICES= python3 ../../../reference/check_peft_loads_dora.py
Loads golden-dora/llama-gqa/ours-trained/adapter (written here by make_dora_ours.ts) with PeftModel.from_pretrained
(no warnings about missing/unexpected keys allowed), prints PEFT's logits of sequence 0 vs ours, and writes them
to DIR/peft-logits0.safetensors (copy into ours-trained/; test/model/dora-golden.test.ts compares).
"""
import json,os,sys,warnings,torch,peft
from transformers import AutoModelForCausalLM as A
from peft import PeftModel
from safetensors.torch import save_file,load_file
src='../../golden-dora/llama-gqa/ours-trained';b=json.load(open('../../golden-dora/llama-gqa/expected.json'))['batch']
m=A.from_pretrained('model',dtype=torch.float32,attn_implementation='eager')
with warnings.catch_warnings(record=True) as w:
 warnings.simplefilter('always');p=PeftModel.from_pretrained(m,src+'/adapter')
bad=[str(x.message) for x in w if 'key' in str(x.message).lower()]
assert not bad,bad
assert any('lora_magnitude_vector' in n for n,_ in p.named_parameters()),'no DoRA magnitudes loaded'
p.eval()
with torch.no_grad():z=p(input_ids=torch.tensor(b['input_ids'][:1])).logits[0].float().contiguous()
o=load_file(src+'/logits0.safetensors')['logits0'];e=(z-o).abs().max().item()
os.makedirs(os.environ['OUT'],exist_ok=True)
save_file({'logits0':z},os.environ['OUT']+'/peft-logits0.safetensors',metadata={'format':'pt','note':'PEFT %s logits of sequence 0 with the dqlora-saved DoRA adapter ours-trained/adapter'%peft.__version__})
print(json.dumps({'max_abs_diff_vs_dqlora':e,'max_abs_logit':z.abs().max().item(),'peft':peft.__version__,'torch':torch.__version__}))
sys.exit(0 if e<1e-4 else 1)
