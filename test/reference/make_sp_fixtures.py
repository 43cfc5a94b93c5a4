#!/usr/bin/env python3
"""SentencePiece fixtures for common/sp-tokenizer.ts (test/formats/sp-*.test.ts).

Trains two small SentencePiece models on a generated Chinese + English corpus and records what the reference
`sentencepiece` library does with them:

  bpe.model      BPE, byte_fallback, split_digits, identity normalization, remove_extra_whitespaces=false
                 (the Llama / ChatGLM2 settings), one user-defined symbol "<br>".
  unigram.model  Unigram, default nmt_nfkc normalization (a precompiled charsmap), remove_extra_whitespaces=true,
                 no byte fallback (unknown characters become <unk>), a user-defined "<sep>" and a control "<ctrl>".
  expected.json  for each model: piece count, special ids, and for ~60 strings the ids, pieces and decode(ids);
                 decodes of random id lists (control, unknown and byte pieces included); the ChatGLM2 rules
                 (tokenization_chatglm.py, emulated below on top of the library) applied to the BPE model.

Run from the repository root with a Python that has `sentencepiece` and `protobuf` (to edit model protos):
    python3 test/reference/make_sp_fixtures.py
The committed models are the source of truth: another sentencepiece version may train slightly different
models, so regenerate models and expectations together. The version used is recorded in expected.json.
"""
import json
import os
import random
import tempfile

import sentencepiece as spm

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "sentencepiece"))

ZH_WORDS = ["你好", "世界", "我们", "今天", "天气", "很好", "学习", "机器", "模型", "训练", "数据", "问题", "回答",
            "中国", "北京", "上海", "时间", "工作", "朋友", "喜欢", "吃饭", "电脑", "程序", "语言", "文本", "分词",
            "人工智能", "深度学习", "自然语言处理", "大家", "可以", "没有", "什么", "怎么", "为什么", "因为", "所以",
            "但是", "如果", "已经", "一个", "这个", "那个", "东西", "地方", "知道", "觉得", "需要", "开始", "结束"]
EN_WORDS = ["the", "model", "is", "training", "on", "data", "hello", "world", "we", "learn", "language", "token",
            "piece", "sentence", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "of", "to", "in",
            "for", "with", "GPU", "CPU", "LoRA", "QLoRA", "adapter", "weight", "gradient", "Round", "answer",
            "question", "tokenizer", "Hello", "World", "This", "That", "I", "you", "it", "can", "not", "will"]
PUNCT_ZH = ["，", "。", "？", "！", "：", "；", "、"]


def corpus(rng: random.Random) -> list[str]:
    lines = []
    for i in range(600):
        kind = i % 6
        if kind == 0:
            lines.append("".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(PUNCT_ZH))
        elif kind == 1:
            lines.append(" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(4, 14))) + rng.choice([".", "?", "!", ","]))
        elif kind == 2:
            a = "".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(1, 4)))
            b = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(1, 4)))
            lines.append(f"{a} {b} {rng.randint(0, 99999)}{rng.choice(PUNCT_ZH)}")
        elif kind == 3:
            q = "".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(1, 5)))
            lines.append(f"[Round {rng.randint(1, 9)}] 问：{q} 答：{rng.choice(ZH_WORDS)}")
        elif kind == 4:
            lines.append(f"{rng.randint(1990, 2030)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日 {rng.choice(EN_WORDS)} = {rng.random():.4f}")
        else:
            lines.append("  ".join(rng.choice(EN_WORDS + ZH_WORDS) for _ in range(rng.randint(2, 8))) + " <br> " + rng.choice(EN_WORDS))
    return lines


CASES = [
    "", " ", "   ", "\t", "\n", "a", "Hello world", "hello  world", "  leading spaces", "trailing spaces   ",
    "multiple   inner    spaces", "tab\tseparated\tvalues", "line one\nline two\n\nline four", " x", "x ",
    "你好", "你好世界", "今天天气很好。", "我们可以学习自然语言处理！", "人工智能，深度学习、机器学习？",
    "[Round 1]\n\n问：你好\n\n答：", "[Round 2]\n\n问：什么是LoRA？\n\n答：LoRA 是一种方法。",
    "12345", "2023年10月1日", "3.14159", "v1.2.3-rc4", "0x1F 0b1010 1e-5",
    "🙂", "emoji 🙂🎉 mix 😀", "👨‍👩‍👧", "龘靐齉", "Привет мир", "مرحبا", "こんにちは", "안녕하세요",
    "ＡＢＣ１２３", "ｶﾀｶﾅ", "①②③", "ﬁ ligature", "e\u0301 combining", "\u00a0nbsp\u3000ideographic space",
    "▁already▁escaped", "<br>", "a<br>b", "<br><br>", "<sep>", "x<sep>y", "<ctrl>", "<s>", "</s>", "<unk>",
    "[gMASK]", "sop", "eop", "Aesop sop", "aaaaaaaaaaaaaaaaaaaa", "的的的的的的的的", "a" * 3 + "你" * 3 + "b" * 3,
    "https://example.com/path?q=1&r=2", "def f(x):\n    return x * 2\n", "The quick brown fox jumps over the lazy dog.",
    "QLoRA adapter weight gradient on GPU and CPU", "混合 mixed 文本 text 123 ，。",
]

CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]


def pieces_info(sp: spm.SentencePieceProcessor) -> dict:
    n = sp.get_piece_size()
    kinds = {}
    for i in range(n):
        k = "control" if sp.is_control(i) else "unknown" if sp.is_unknown(i) else "byte" if sp.is_byte(i) else "unused" if sp.is_unused(i) else None
        if k:
            kinds.setdefault(k, []).append(i)
    return {"piece_count": n, "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
            "control_ids": kinds.get("control", []), "byte_ids_first": kinds.get("byte", [])[:3],
            "some_pieces": [[i, sp.id_to_piece(i), sp.get_score(i)] for i in range(0, n, max(1, n // 40))]}


def model_cases(sp: spm.SentencePieceProcessor, rng: random.Random) -> dict:
    enc = []
    for text in CASES:
        ids = sp.encode(text)
        enc.append({"text": text, "ids": ids, "pieces": sp.encode(text, out_type=str), "decoded": sp.decode(ids),
                    # add_dummy_prefix off, as transformers' LlamaTokenizer(legacy=False) loads the model
                    "ids_no_dummy": None})
    n = sp.get_piece_size()
    dec = []
    special = sp.control_ids() if hasattr(sp, "control_ids") else []
    pool = [sp.unk_id(), sp.bos_id(), sp.eos_id()] + [i for i in range(n) if sp.is_byte(i)]
    for k in range(60):
        length = rng.randint(0, 12)
        ids = [rng.choice(pool) if rng.random() < 0.35 else rng.randrange(n) for _ in range(length)]
        dec.append({"ids": ids, "decoded": sp.decode(ids)})
    # hand-made: a lone "▁" piece first, byte pieces that do not form UTF-8, bytes that do
    space = sp.piece_to_id("▁")
    extra = [[space], [space, space], [sp.bos_id(), space, sp.piece_to_id("▁the")]]
    if sp.is_byte(sp.piece_to_id("<0xE4>")):
        b = lambda x: sp.piece_to_id(f"<0x{x:02X}>")
        extra += [[b(0xE4)], [b(0xE4), b(0xBD), b(0xA0)], [b(0xE4), b(0xBD)] + [space], [b(0x41), space, b(0xFF), b(0x80)],
                  [b(0xF0), b(0x9F), b(0x99), b(0x82)], [b(0x20), sp.piece_to_id("▁the")]]
    for ids in extra:
        dec.append({"ids": ids, "decoded": sp.decode(ids)})
    return {"encode": enc, "decode": dec}


def no_dummy_ids(model_file: str, texts: list[str]) -> list[list[int]]:
    """ids with normalizer_spec.add_dummy_prefix = False (transformers' legacy=False Llama loading)."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf; optional
    m = pb.ModelProto()
    with open(model_file, "rb") as f:
        m.ParseFromString(f.read())
    m.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    return [sp.encode(t) for t in texts]


def unused_variant(model_file: str, texts: list[str]) -> dict:
    """Marks the five most used multi-character pieces UNUSED (BPE re-splits them; unigram skips them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    sp = spm.SentencePieceProcessor(model_file=model_file)
    counts: dict[int, int] = {}
    for t in texts:
        for i in sp.encode(t):
            if len(sp.id_to_piece(i)) > 1 and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
                counts[i] = counts.get(i, 0) + 1
    ids = sorted(sorted(counts, key=lambda i: (-counts[i], i))[:5])
    m = pb.ModelProto()
    with open(model_file, "rb") as f:
        m.ParseFromString(f.read())
    for i in ids:
        m.pieces[i].type = pb.ModelProto.SentencePiece.UNUSED
    v = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    return {"unused_ids": ids, "ids": [v.encode(t) for t in texts]}


def chatglm(sp: spm.SentencePieceProcessor) -> dict:
    """tokenization_chatglm.py (ChatGLM2-6B) on top of the SP model: specials after the SP vocab, [gMASK, sop] prefix."""
    n = sp.get_piece_size()
    special = {t: n + i for i, t in enumerate(CHATGLM_SPECIALS)}
    # With transformers 4.30.2 (ChatGLM2's release) the class's eos/unk/pad properties never reach the added-token
    # trie (special_tokens_map_extended reads the unset `_eos_token` etc.), so "</s>" in text is plain text.
    split_on: list[str] = []

    def pieces(text: str) -> list[str]:
        out, i, start = [], 0, 0
        while i < len(text):
            hit = next((s for s in split_on if text.startswith(s, i)), None)
            if hit:
                if text[start:i]:
                    out += sp.encode(text[start:i], out_type=str)
                out.append(hit)
                i += len(hit)
                start = i
            else:
                i += 1
        if text[start:]:
            out += sp.encode(text[start:], out_type=str)
        return out

    def to_id(p: str) -> int:
        return special[p] if p in special else sp.piece_to_id(p)

    def build_prompt(query, history):
        prompt = ""
        for i, (q, a) in enumerate(history):
            prompt += "[Round {}]\n\n问：{}\n\n答：{}\n\n".format(i + 1, q, a)
        return prompt + "[Round {}]\n\n问：{}\n\n答：".format(len(history) + 1, query)

    prompts = [("你好", []), ("什么是LoRA？", [("你好", "你好！我是人工智能助手。")]),
               ("第三轮", [("a", "b"), ("c </s> d", "e<unk>f")])]
    texts = CASES + [build_prompt(q, h) for q, h in prompts]
    enc = []
    for t in texts:
        ids = [to_id(p) for p in pieces(t)]
        enc.append({"text": t, "ids_with_specials": [special["[gMASK]"], special["sop"]] + ids, "ids": ids})
    return {"sp_size": n, "specials": special, "prompts": [{"query": q, "history": h, "prompt": build_prompt(q, h)} for q, h in prompts],
            "encode": enc}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(1234)
    lines = corpus(rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")  # one sentence a line: no newlines inside
        os.chdir(tmp)  # the model records its input path: keep it relative so regenerated models are byte-identical
        common = dict(input="corpus.txt", num_threads=1, hard_vocab_limit=False, shuffle_input_sentence=False,
                      character_coverage=0.9995, max_sentence_length=4096)
        spm.SentencePieceTrainer.train(model_prefix=os.path.join(OUT, "bpe"), model_type="bpe", vocab_size=1000,
                                       byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                       remove_extra_whitespaces=False, user_defined_symbols=["<br>"],
                                       allow_whitespace_only_pieces=True, **common)
        spm.SentencePieceTrainer.train(model_prefix=os.path.join(OUT, "unigram"), model_type="unigram", vocab_size=600,
                                       user_defined_symbols=["<sep>"], control_symbols=["<ctrl>"], **common)
    for v in ("bpe.vocab", "unigram.vocab"):
        os.remove(os.path.join(OUT, v))
    expected = {"sentencepiece_version": spm.__version__, "models": {}}
    for name in ("bpe", "unigram"):
        mf = os.path.join(OUT, f"{name}.model")
        sp = spm.SentencePieceProcessor(model_file=mf)
        cases = model_cases(sp, random.Random(99))
        for c, ids in zip(cases["encode"], no_dummy_ids(mf, [c["text"] for c in cases["encode"]])):
            c["ids_no_dummy"] = ids
        expected["models"][name] = {"info": pieces_info(sp), **cases,
                                    "unused_variant": unused_variant(mf, [c["text"] for c in cases["encode"]])}
    expected["chatglm"] = chatglm(spm.SentencePieceProcessor(model_file=os.path.join(OUT, "bpe.model")))
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")

if __name__ == "__main__":
    main()
