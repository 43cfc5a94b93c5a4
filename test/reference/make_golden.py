#!/usr/bin/env python3
"""Golden reference numbers for the QLoRA engine, from Hugging Face transformers + PEFT (CPU, float32).

For each case (see CASES) this writes OUT/<case>/:
  model/             save_pretrained of the ORIGINAL float32 random model (config.json, model.safetensors, ...)
  adapter/           PEFT save_pretrained (adapter_config.json, adapter_model.safetensors)
  nf4.safetensors    NF4 + double-quant storage of every decoder Linear, from nf4_emulation.py
  grads.safetensors  d loss / d every lora_A / lora_B (PEFT saved key names) + "logits0" [T, V]
  expected.json      loss, batch, greedy generations, versions, diagnostics
The loss/gradients/generations are computed with every decoder Linear replaced by its NF4
dequantized value: the base QLoRA actually trains against. See test/reference/README.md.

Usage (device machine, CPU):  CUDA_VISIBLE_DEVICES= python3 test/reference/make_golden.py --out DIR
Local dry run without torch:  python3 test/reference/make_golden.py --nf4-only
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network; never try the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import nf4_emulation as nf4  # noqa: E402

# Spec §1.7 test vector: refuse to produce fixtures from a broken emulation.
nf4.self_test()
_i = np.arange(130)
_x = ((((_i * 37) % 101) - 50) / 64).astype(np.float32)
assert hashlib.sha256(bytes(nf4.nf4_quantize(_x)[0])).hexdigest() == (
    "e7c717345277ddd22cb7a7d9efe1a54d3bf84b2b2e0d6e432d17e093cfe9a08f"
), "NF4 emulation does not reproduce the spec §1.7 test vector"

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SEQ_LENGTHS = [12, 9, 5]  # B = 3, right-padded to T = 12
T = 12
PROMPT_TOKENS = 3  # labels = -100 on the first 3 tokens of each sequence ("prompt") and on padding
GEN_PROMPT = [BOS_ID, 45, 113, 7, 201]
GEN_NEW_TOKENS = 8
WEIGHT_SCALE = 6.25  # initializer_range 0.02 * 6.25 = std 0.125 ~ 1/sqrt(hidden): O(1) attention scores/logits
LORA_B_STD = 0.1
DECODER_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    max_position_embeddings=128,
    hidden_act="silu",
    initializer_range=0.02,
    attention_dropout=0.0,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    use_cache=True,
)

CASES: dict[str, dict] = {
    "llama-gqa": dict(
        arch="llama",
        seed=1001,
        config=dict(
            _COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
        rope=dict(rope_type="default", rope_theta=10000.0),
        lora=dict(target_modules="all-linear", use_rslora=False),
    ),
    "qwen2-tied": dict(
        arch="qwen2",
        seed=2002,
        config=dict(
            _COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        rope=dict(rope_type="default", rope_theta=1000000.0),
        lora=dict(target_modules=["q_proj", "v_proj"], use_rslora=False),
    ),
    "llama3-rope": dict(
        arch="llama",
        seed=3003,
        config=dict(
            _COMMON,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
        rope=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        lora=dict(target_modules="all-linear", use_rslora=True),
    ),
}


def log(msg: str) -> None:
    print(f"[make_golden {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_f32(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# torch / transformers / peft parts (imported lazily so --nf4-only runs where only numpy exists)
# --------------------------------------------------------------------------------------------


def make_config(case: dict):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if case["arch"] == "llama" else Qwen2Config
    kw = dict(case["config"])
    rope = dict(case["rope"])
    try:
        cfg = cls(**kw, rope_parameters=rope)  # transformers 5.x
    except TypeError:
        legacy = dict(rope)
        theta = legacy.pop("rope_theta")
        scaling = None if legacy["rope_type"] == "default" else legacy
        cfg = cls(**kw, rope_theta=theta, rope_scaling=scaling)  # transformers 4.x
    return cfg


def build_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    return model.to(torch.float32)


def load_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
    return model.to(torch.float32)


def check_eager(model) -> str:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            model.config._attn_implementation = "eager"
        impl = getattr(model.config, "_attn_implementation", None)
    assert impl == "eager", f"attention implementation is {impl!r}, expected 'eager'"
    return impl


def save_model(model, model_dir: str) -> None:
    try:
        model.save_pretrained(model_dir, safe_serialization=True)
    except TypeError:  # 5.x may have dropped the argument (safetensors is the only format)
        model.save_pretrained(model_dir)
    assert os.path.exists(os.path.join(model_dir, "model.safetensors")), os.listdir(model_dir)
    assert os.path.exists(os.path.join(model_dir, "config.json")), os.listdir(model_dir)


def randomize(model, torch) -> None:
    """Default init (N(0, 0.02)) scaled to std 0.125; norms 1 + N(0, 0.1); biases N(0, 0.1).

    Non-trivial norm weights and biases so a loader that ignores them fails the test.
    named_parameters() yields a tied tensor once, so the tied embedding is scaled once.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")


def make_batch(seed: int, torch):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(SEQ_LENGTHS), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(SEQ_LENGTHS), T), dtype=torch.long)
    for b, length in enumerate(SEQ_LENGTHS):
        ids[b, :length] = torch.randint(3, 256, (length,), generator=g)  # no pad/bos/eos inside
        mask[b, :length] = 1
    labels = ids.clone()
    labels[:, :PROMPT_TOKENS] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def greedy(model, torch) -> dict:
    """generate(do_sample=False) with eos disabled, cross-checked by a no-cache full-recompute loop."""
    prompt = torch.tensor([GEN_PROMPT], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            num_beams=1,
            max_new_tokens=GEN_NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=PAD_ID,
        )
    seq = out.sequences if hasattr(out, "sequences") else out
    gen = seq[0, len(GEN_PROMPT):].tolist()
    assert len(gen) == GEN_NEW_TOKENS, f"generate produced {len(gen)} tokens, expected {GEN_NEW_TOKENS}: {out}"
    ids = prompt.clone()
    manual: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        for _ in range(GEN_NEW_TOKENS):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1]
            top = torch.topk(logits.float(), 2)
            margins.append(float(top.values[0] - top.values[1]))
            nxt = int(torch.argmax(logits))
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], dtype=torch.long)], dim=1)
    return {"tokens": gen, "manual": manual, "agree": gen == manual, "top2_margins": margins}


def run_case(name: str, case: dict, out_root: str, versions: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    seed = case["seed"]
    case_dir = os.path.join(out_root, name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    model_dir = os.path.join(case_dir, "model")
    adapter_dir = os.path.join(case_dir, "adapter")
    os.makedirs(model_dir)
    diag: dict = {}

    # 1. random model, saved with save_pretrained (original float32 weights), then reloaded from disk so
    #    every number below comes from what the files say (config.json round trip included).
    config = make_config(case)
    torch.manual_seed(seed)
    model = build_model(config)
    check_eager(model)
    randomize(model, torch)
    save_model(model, model_dir)
    ref_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    model = load_model(model_dir)
    diag["attn_implementation"] = check_eager(model)
    model.eval()
    loaded = model.state_dict()
    for k, v in ref_state.items():
        assert k in loaded, f"{k} missing after reload"
        assert torch.equal(loaded[k], v), f"{k} differs after reload"
    for k, v in model.named_parameters():
        assert v.dtype == torch.float32, f"{k} is {v.dtype}"
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == bool(case["config"]["tie_word_embeddings"]), f"tied={tied}"
    diag["tied_lm_head"] = tied
    diag["config_rope_parameters"] = getattr(model.config, "rope_parameters", None)
    diag["config_rope_scaling"] = getattr(model.config, "rope_scaling", None)
    rot = getattr(model.model, "rotary_emb", None)
    if rot is not None:
        diag["rope_inv_freq"] = [float(x) for x in rot.inv_freq.float().tolist()]
        diag["rope_attention_scaling"] = float(getattr(rot, "attention_scaling", 1.0))
    with open(os.path.join(model_dir, "config.json")) as f:
        diag["config_json_keys"] = sorted(json.load(f).keys())

    # 2. NF4 + double quant of every decoder Linear; the model then runs on the dequantized weights.
    nf4_tensors: dict = {}
    dequant_sha: dict = {}
    rel_err: dict = {}
    for li in range(len(model.model.layers)):
        for ln in DECODER_LINEARS:
            prefix = f"model.layers.{li}.{ln}"
            mod = model.get_submodule(prefix)
            w = mod.weight.detach().cpu().numpy().astype(np.float32, copy=True)
            q = nf4.quantize_weight(w)
            nf4_tensors[prefix + ".packed"] = torch.from_numpy(q["packed"].reshape(-1, 1).copy())
            nf4_tensors[prefix + ".absmax"] = torch.from_numpy(q["absmax"].copy())
            nf4_tensors[prefix + ".nested_absmax"] = torch.from_numpy(q["nested_absmax"].copy())
            nf4_tensors[prefix + ".offset"] = torch.from_numpy(q["offset"].copy())
            dq = q["dequant"]
            dequant_sha[prefix] = sha256_f32(dq)
            rel_err[prefix] = float(np.sqrt(np.mean((dq - w) ** 2) / np.mean(w**2)))
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(dq))
            assert torch.equal(mod.weight.detach(), torch.from_numpy(dq))
    assert len(dequant_sha) == 7 * len(model.model.layers)
    save_file(nf4_tensors, os.path.join(case_dir, "nf4.safetensors"))
    diag["nf4_rel_rmse"] = rel_err

    # 4a. batch; greedy generation with the base (NF4-dequantized, no adapter) before PEFT wraps it.
    ids, mask, labels = make_batch(seed + 7, torch)
    # generate() falls back to the model's generation_config for fields left at default: disable eos there too.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    base_gen = greedy(model, torch)

    # 3. PEFT LoRA; lora_B ~ N(0, 0.1) so lora_A gradients are non-zero.
    torch.manual_seed(seed + 11)
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=case["lora"]["target_modules"],
        use_rslora=case["lora"]["use_rslora"],
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, lcfg)
    torch.manual_seed(seed + 13)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, LORA_B_STD)
    trainable = {pname: p for pname, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_A" in k or "lora_B" in k) for k in trainable), list(trainable)
    pm.save_pretrained(adapter_dir)
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))

    def saved_key(pname: str) -> str:
        return pname.replace(".default.", ".")

    assert set(saved) == {saved_key(k) for k in trainable}, (sorted(saved)[:4], sorted(trainable)[:4])
    for k, p in trainable.items():
        assert torch.equal(saved[saved_key(k)], p.detach()), k
    # LoRA layers keep {adapter: scale}; attention modules also have a float `scaling` (skip those).
    diag["lora_scaling"] = sorted(
        {float(v) for m in pm.modules() if isinstance(getattr(m, "scaling", None), dict) for v in m.scaling.values()}
    )

    # 4b. forward with labels -> HF loss; backward -> lora gradients.
    pm.eval()
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    loss = out.loss
    loss.backward()
    logits = out.logits.detach().float()
    assert tuple(logits.shape) == (len(SEQ_LENGTHS), T, 256)
    shift_logits = logits[:, :-1].reshape(-1, 256)
    shift_labels = labels[:, 1:].reshape(-1)
    manual_loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    num_targets = int((shift_labels != -100).sum())
    assert abs(float(manual_loss) - float(loss)) <= 1e-6 * abs(float(loss)), (float(manual_loss), float(loss))
    grads = {}
    for k, p in trainable.items():
        assert p.grad is not None, f"no gradient for {k}"
        g = p.grad.detach().to(torch.float32).contiguous().clone()
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0, f"degenerate gradient {k}"
        grads[saved_key(k)] = g
    tensors = dict(grads)
    tensors["logits0"] = logits[0].contiguous().clone()  # [T, V], sequence 0 (full length, no padding)
    save_file(tensors, os.path.join(case_dir, "grads.safetensors"))
    diag["grad_max_abs"] = max(float(g.abs().max()) for g in grads.values())
    diag["logits_std"] = float(logits[0].std())

    # float64 re-run of the same graph: the fp32 noise floor the engine's tolerances sit above.
    try:
        pm64 = copy.deepcopy(pm).to(torch.float64)
        pm64.zero_grad(set_to_none=True)
        out64 = pm64(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out64.loss.backward()
        t64 = {saved_key(k): p.grad for k, p in pm64.named_parameters() if p.requires_grad}
        worst = 0.0
        for k, g in grads.items():
            g64 = t64[k]
            worst = max(worst, float((g.double() - g64).abs().max() / g64.abs().max()))
        diag["loss_f64"] = float(out64.loss)
        diag["loss_rel_diff_f32_vs_f64"] = abs(float(loss) - float(out64.loss)) / abs(float(out64.loss))
        diag["grad_max_rel_diff_f32_vs_f64"] = worst  # max |g32-g64| / max |g64|, per tensor, worst tensor
        diag["logits0_max_abs_diff_f32_vs_f64"] = float((logits[0].double() - out64.logits[0].detach()).abs().max())
        del pm64
    except Exception as e:  # diagnostics only
        diag["f64_error"] = f"{type(e).__name__}: {e}"

    adapted_gen = greedy(pm, torch)

    expected = {
        "case": name,
        "loss": float(loss.item()),
        "num_targets": num_targets,
        "batch": {
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "labels": labels.tolist(),
            "lengths": list(SEQ_LENGTHS),
            "pad_token_id": PAD_ID,
        },
        "generate": {
            "prompt": list(GEN_PROMPT),
            "max_new_tokens": GEN_NEW_TOKENS,
            "base": base_gen["tokens"],
            "adapted": adapted_gen["tokens"],
        },
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": case["lora"]["use_rslora"],
            "target_modules": case["lora"]["target_modules"],
            "lora_B_init_std": LORA_B_STD,
        },
        "nf4": {
            "blocksize": nf4.BLOCKSIZE,
            "nested_blocksize": nf4.NESTED_BLOCKSIZE,
            "modules": sorted(dequant_sha),
            "dequant_sha256": dequant_sha,
        },
        "seed": seed,
        "versions": versions,
        "diagnostics": dict(
            diag,
            generate_base_manual=base_gen["manual"],
            generate_base_agree=base_gen["agree"],
            generate_base_top2_margins=base_gen["top2_margins"],
            generate_adapted_manual=adapted_gen["manual"],
            generate_adapted_agree=adapted_gen["agree"],
            generate_adapted_top2_margins=adapted_gen["top2_margins"],
        ),
    }
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    log(f"{name}: loss={expected['loss']!r} targets={num_targets} base={base_gen['tokens']} adapted={adapted_gen['tokens']}")
    return expected


def nf4_dry_run() -> None:
    """Local check without torch: quantize weights of every shape the cases use."""
    rng = np.random.default_rng(0)
    shapes = [(64, 64), (32, 64), (64, 64), (160, 64), (64, 160)]
    for s in shapes:
        w = rng.normal(0.0, 0.125, size=s).astype(np.float32)
        q = nf4.quantize_weight(w)
        n = w.size
        assert q["packed"].shape == ((n + 1) // 2,) and q["packed"].dtype == np.uint8
        assert q["absmax"].shape == ((n + 63) // 64,) and q["absmax"].dtype == np.uint8
        assert q["nested_absmax"].shape == ((q["absmax"].size + 255) // 256,)
        assert q["offset"].shape == (1,) and q["offset"].dtype == np.float32
        err = float(np.sqrt(np.mean((q["dequant"] - w) ** 2) / np.mean(w**2)))
        assert 0.01 < err < 0.2, err
        print(f"  {s}: packed {q['packed'].shape} absmax {q['absmax'].shape} rel_rmse {err:.4f} sha {sha256_f32(q['dequant'])[:16]}")
    print("nf4 dry run OK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "golden"))
    ap.add_argument("--nf4-only", action="store_true", help="numpy-only self test (no torch needed)")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if args.nf4_only:
        nf4_dry_run()
        return 0

    import peft
    import safetensors
    import torch
    import transformers

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)  # fixed reduction order
    assert not torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES") == "", "run on CPU"
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    log(f"versions {versions}")
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"versions": versions, "cases": {}}
    failed = []
    for name in args.cases.split(","):
        t0 = time.time()
        try:
            e = run_case(name, CASES[name], args.out, versions)
            summary["cases"][name] = {
                "loss": e["loss"],
                "generate": e["generate"],
                "diagnostics": e["diagnostics"],
                "seconds": round(time.time() - t0, 2),
            }
        except Exception:
            failed.append(name)
            tb = traceback.format_exc()
            log(f"{name} FAILED\n{tb}")
            summary["cases"][name] = {"error": tb}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    log(f"done; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
