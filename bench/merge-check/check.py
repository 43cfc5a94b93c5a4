"""GPU-machine half of the merge check (bench/merge-check/run.sh): loads the models `coordinator merge` wrote with
transformers, checks the dtype they load in and the config values that must stay floats, and compares their logits
with dqlora's logits of the QLoRA model (NF4 base + adapter) that prepare.ts computed.

    python3 bench/merge-check/check.py .merge-check
Exit status 0 when every check passes; one line per check either way.
"""
import json
import logging
import sys

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

root = sys.argv[1] if len(sys.argv) > 1 else ".merge-check"
ref = json.load(open(f"{root}/dqlora_logits.json"))  # written by prepare.ts
ids = torch.tensor([ref["ids"]])
want = np.array(ref["logits"], dtype=np.float64)
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


print(f"transformers {transformers.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
cap = Capture()
logging.getLogger("transformers").addHandler(cap)
# Merged bf16 weights are bf16(dequant(NF4(W)) + BA·s): the logits differ from dqlora's fp32 QLoRA model by the
# bf16 rounding of the weights (~2^-9 relative each); fp32 merged weights only by float summation order.
for name, dtype, tol in [("merged-bf16", torch.bfloat16, 2e-2), ("merged-f32", torch.float32, 1e-4)]:
    d = f"{root}/{name}"
    raw = json.load(open(f"{d}/config.json"))
    text = open(f"{d}/config.json").read()
    check(raw.get("dtype") == raw.get("torch_dtype") == str(dtype).split(".")[1], f"{name}: config.json dtype = torch_dtype = {raw.get('dtype')}")
    check('"rope_theta": 500000.0' in text and '"factor": 8.0' in text, f"{name}: rope_theta 500000.0 and llama3 factor 8.0 written as floats")
    check("quantization_config" not in raw, f"{name}: no quantization_config")
    cfg = AutoConfig.from_pretrained(d)
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    check(isinstance(theta, float) and isinstance(rp.get("factor"), float), f"{name}: transformers reads rope_theta {theta!r} and factor {rp.get('factor')!r} as floats")
    cap.lines.clear()
    m = AutoModelForCausalLM.from_pretrained(d)
    print(f"     {name}: from_pretrained(dir) with no dtype argument loads in {m.dtype}")
    m_auto = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
    check(m_auto.dtype == dtype, f"{name}: from_pretrained(dir, dtype='auto') loads in {m_auto.dtype}")
    warned = [l for l in cap.lines if "dtype" in l.lower()]
    check(not warned, f"{name}: no dtype warning while loading ({warned[:2]})")
    with torch.no_grad():
        got = m.float().eval()(ids).logits[0].double().numpy()  # fp32 on the CPU: no TF32, deterministic
    err = np.abs(got - want).max() / np.abs(want).max()
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    check(err < tol, f"{name}: logits vs dqlora (QLoRA fp32): max |diff| / max |logit| = {err:.2e} (tolerance {tol:g}), argmax agreement {agree:.3f}")
    if torch.cuda.is_available():
        with torch.no_grad():
            g = m_auto.cuda().eval()(ids.cuda()).logits[0].double().cpu().numpy()  # in the loaded dtype, on the GPU
        e2 = np.abs(g - want).max() / np.abs(want).max()
        check(e2 < max(tol, 3e-2), f"{name}: logits on cuda in {m_auto.dtype}: {e2:.2e} of max |logit|")

print("all checks passed" if not failures else f"{len(failures)} checks failed")
sys.exit(1 if failures else 0)
