#!/usr/bin/env python3
"""PEFT 0.21 loads a DoRA adapter trained by dqlora (make_dora_roundtrip.ts) and must give dqlora's logits.

Writes DIR/peft-check.json: max |PEFT logits − dqlora logits| over sequence 0 of the golden batch (fp32, CPU, eager).
Usage (device machine): CUDA_VISIBLE_DEVICES= python3 test/reference/check_dora_adapter.py [DIR] [OUT_JSON]
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "test/fixtures/golden-dora/llama-gqa")
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(d, "peft-check.json")
exp = json.load(open(os.path.join(d, "expected.json")))
model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "test/fixtures/golden/llama-gqa/model"), dtype=torch.float32,
                                             attn_implementation="eager")
pm = PeftModel.from_pretrained(model, os.path.join(d, "ours", "adapter"))
pm.eval()
ids = torch.tensor(exp["batch"]["input_ids"][:1])
with torch.no_grad():
    logits = pm(input_ids=ids).logits[0].float()
ours = load_file(os.path.join(d, "ours", "logits0.safetensors"))["logits0"]
diff = float((logits - ours).abs().max())
res = {"max_abs_diff": diff, "max_abs_logit": float(logits.abs().max()), "use_dora": bool(pm.peft_config["default"].use_dora),
       "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
print(json.dumps(res))
json.dump(res, open(out, "w"), indent=1)
