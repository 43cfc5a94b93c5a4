#!/usr/bin/env python3
"""Reference numbers for `quantization: none` and DoRA, from transformers + PEFT (CPU, float32).

1. noquant: for each case dir made by make_noquant_inputs.ts (model/ with an UNQUANTIZED fp32 or bf16 base,
   batch.json = the token ids/labels our tokenizer gives data.jsonl, adapter/ = a PEFT LoRA adapter), writes
   expected.json: the mean token loss over all examples of the base model and of base + adapter, as
   `coordinator eval` reports it (sum of token cross-entropies / label tokens), in float32 (+ float64 diagnostic).
2. dora: PEFT 0.21 DoRA (use_dora=True, r=4, alpha=8, all-linear, dropout 0) on test/fixtures/golden/llama-gqa/model
   (fp32, unquantized) and that case's batch; lora_B := N(0, 0.1), magnitude := norm · (1 + 0.1·N) so every
   gradient is non-trivial. Writes OUT/dora/: adapter/ (PEFT save_pretrained), grads.safetensors (d loss / d every
   trainable tensor, saved key names, + "logits0" of the first sequence), expected.json (loss, batch, key names).

Usage (device machine):  CUDA_VISIBLE_DEVICES= python3 test/reference/make_noquant_golden.py \
    --noquant test/fixtures/golden-noquant --dora-out OUT/dora
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "python": platform.python_version()}


def load(model_dir: str, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def eval_loss(model, examples, dtype) -> tuple[float, int, list]:
    """Sum of token CEs / label tokens, one example at a time (no padding at all)."""
    total, count, per = 0.0, 0, []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].to(dtype)
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        n = int((labels != -100).sum())
        total += float(ce)
        count += n
        per.append(float(ce) / n)
    return total / count, count, per


def noquant(case_dir: str) -> None:
    batch = json.load(open(os.path.join(case_dir, "batch.json")))
    ex = batch["examples"]
    out = {"case": os.path.basename(case_dir.rstrip("/")), "versions": versions(), "attn_implementation": "eager"}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        model = load(os.path.join(case_dir, "model"), dtype)
        loss, count, per = eval_loss(model, ex, dtype)
        pm = PeftModel.from_pretrained(model, os.path.join(case_dir, "adapter"))
        pm.eval()
        aloss, _, aper = eval_loss(pm, ex, dtype)
        if tag == "f32":
            out.update({"base_loss": loss, "adapted_loss": aloss, "label_tokens": count,
                        "base_per_example": per, "adapted_per_example": aper})
        else:
            out["diagnostics"] = {"base_loss_f64": loss, "adapted_loss_f64": aloss}
    print(json.dumps({k: v for k, v in out.items() if k != "versions"}))
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def saved_key(name: str) -> str:
    # named_parameters: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    #                   ...q_proj.lora_magnitude_vector.default.weight
    # PEFT saves:       ...q_proj.lora_A.weight / ...q_proj.lora_magnitude_vector
    if ".lora_magnitude_vector." in name:
        return name.split(".lora_magnitude_vector.")[0] + ".lora_magnitude_vector"
    return name.replace(".default", "")


def dora(out_dir: str) -> None:
    src = os.path.join(ROOT, "test/fixtures/golden/llama-gqa")
    exp = json.load(open(os.path.join(src, "expected.json")))
    b = exp["batch"]
    ids = torch.tensor(b["input_ids"])
    am = torch.tensor(b["attention_mask"])
    labels = torch.tensor(b["labels"])
    result = {"case": "dora-llama-gqa", "model": "test/fixtures/golden/llama-gqa/model", "versions": versions(),
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": True},
              "batch": b}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        model = load(os.path.join(src, "model"), dtype)
        torch.manual_seed(4242)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                              use_dora=True, task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(4343)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1).to(p.dtype))
                elif "lora_magnitude_vector" in n:
                    p.mul_((1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
        pm.eval()
        out = pm(input_ids=ids, attention_mask=am, labels=labels)
        out.loss.backward()
        grads = {saved_key(n): p.grad.detach().float().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
        if tag == "f32":
            result["loss"] = float(out.loss)
            result["num_targets"] = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                logits0 = pm(input_ids=ids[:1]).logits[0].float().contiguous()
            os.makedirs(out_dir, exist_ok=True)
            pm.save_pretrained(os.path.join(out_dir, "adapter"))
            save_file({**grads, "logits0": logits0}, os.path.join(out_dir, "grads.safetensors"), metadata={"format": "pt"})
            result["grad_keys"] = sorted(grads)
            result["weight_norm_detached"] = True
        else:
            result["diagnostics"] = {"loss_f64": float(out.loss)}
            g32 = {k: v for k, v in grads.items()}
            result["diagnostics"]["grad_max_abs"] = max(float(v.abs().max()) for v in g32.values())
    from safetensors import safe_open
    with safe_open(os.path.join(out_dir, "adapter", "adapter_model.safetensors"), "pt") as f:
        result["adapter_keys"] = sorted(f.keys())
    print(json.dumps({k: result[k] for k in ("loss", "num_targets", "diagnostics")}))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noquant", help="dir of cases made by make_noquant_inputs.ts")
    ap.add_argument("--dora-out", help="where to write the DoRA fixture")
    a = ap.parse_args()
    torch.set_num_threads(4)
    if a.noquant:
        for c in sorted(os.listdir(a.noquant)):
            d = os.path.join(a.noquant, c)
            if os.path.isdir(d):
                try:
                    noquant(d)
                except Exception as e:  # keep going: the other fixture is still useful
                    import traceback
                    traceback.print_exc()
                    print(f"noquant {c} failed: {e}", file=sys.stderr)
    if a.dora_out:
        dora(a.dora_out)


if __name__ == "__main__":
    main()
