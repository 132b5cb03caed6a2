"""Calibration (`edge export --calib`): the importance it measures is what transformers' activations
say, per linear layer and, in a MoE, per expert over the tokens routed to it; the export records it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge.errors import ConfigError
from export import ExportOptions, export_model
from export.calib import collect


def _text(tmp_path, n=600):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 6))) for _ in range(n)]
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(words))
    return p


def _reference(ckpt, ids: list[int], ctx: int):
    """transformers: mean x² of each hooked module's input over the same windows."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    acc = {}

    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            s, n, gram = acc.get(name, (0.0, 0, 0.0))
            acc[name] = (s + (x * x).sum(0), n + x.shape[0], gram + x.T @ x)
        return f
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or name.endswith(".mlp"):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for i in range(0, len(ids), ctx):
            model(torch.tensor([ids[i:i + ctx]]))
    return model, acc


def _encode(ckpt, text):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_dense_importance_is_the_mean_square_of_each_linear_input(tiny_checkpoint, tmp_path):
    """... and with gram=True (what gptq needs) each input's X^T X."""
    ckpt = tiny_checkpoint("llama")
    text = _text(tmp_path)
    cal = collect(str(ckpt), str(text), max_tokens=300, gram=True, workdir=tmp_path)
    ids = _encode(ckpt, text.read_text())[:300]
    assert cal.tokens == len(ids) == 300
    _, acc = _reference(ckpt, ids, 128)                 # the tiny model's context: 128
    for i in range(2):
        for ours, theirs in (("qkv", "self_attn.q_proj"), ("o", "self_attn.o_proj"),
                             ("gate_up", "mlp.gate_proj"), ("down", "mlp.down_proj")):
            s, n, gram = acc[f"model.layers.{i}.{theirs}"]
            np.testing.assert_allclose(cal.importance[f"layers.{i}.{ours}"], (s / n).numpy(), rtol=2e-4, atol=1e-7)
            got = cal.stats[f"layers.{i}.{ours}"]
            assert got.n == n
            np.testing.assert_allclose(got.gram, gram.numpy(), rtol=1e-4, atol=1e-4 * float(gram.abs().max()))


def test_moe_expert_importance_counts_only_the_tokens_routed_to_it(tiny_checkpoint, tmp_path):
    import torch
    ckpt = tiny_checkpoint("mixtral")
    text = _text(tmp_path)
    cal = collect(str(ckpt), str(text), max_tokens=300, workdir=tmp_path)
    ids = _encode(ckpt, text.read_text())[:300]
    model, _ = _reference(ckpt, ids, 128)
    xs = {i: [] for i in range(2)}
    for i, layer in enumerate(model.model.layers):
        moe = getattr(layer, "mlp", None) or layer.block_sparse_moe     # transformers 5 / 4.x
        moe.register_forward_pre_hook(lambda mod, inp, i=i: xs[i].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        for j in range(0, len(ids), 128):
            model(torch.tensor([ids[j:j + 128]]))
    checked = 0
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(xs[i]).double()                                          # [T, H]
        top = torch.topk(x @ (getattr(layer, "mlp", None) or layer.block_sparse_moe).gate.weight.double().T, 2, dim=-1).indices   # softmax keeps the order
        for e in range(4):
            routed = x[(top == e).any(-1)]
            key = f"layers.{i}.experts.{e}.gate_up"
            if len(routed) == 0:
                assert key not in cal.importance
                continue
            np.testing.assert_allclose(cal.importance[key], (routed ** 2).mean(0).numpy(), rtol=2e-4, atol=1e-7)
            assert cal.importance[f"layers.{i}.experts.{e}.down"].shape == (96,)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe-mixed"])
def test_calibrated_export_records_it_and_runs(tiny_checkpoint, tmp_path, arch):
    import edge
    ckpt = tiny_checkpoint(arch)
    text = _text(tmp_path)
    out = export_model(str(ckpt), tmp_path / "b", ExportOptions(quant="int4", calib=str(text), calib_tokens=300),
                       progress=False).out
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["calibration"].startswith("calib.txt (sha256 ")
    cal = {t["name"]: t.get("calibrated", False) for t in m["tensors"]}
    assert cal["layers.0.qkv"] and cal["layers.1.qkv"] and cal["layers.1.o"]
    assert any(v for k, v in cal.items() if ".experts." in k)
    if arch == "qwen2_moe-mixed":      # layers 0 and 2 dense, 1 and 3 sparse: names keep the decoder layer
        assert cal["layers.0.gate_up"] and cal["layers.2.down"]
        assert any(v for k, v in cal.items() if k.startswith("layers.3.experts."))
    assert not cal["embed"]
    assert not list(tmp_path.glob(".edge-calib-*")), "the temporary fp32 copy is removed"
    model = edge.load(out, threads=2)
    assert len(model.generate_ids([1, 2, 3], max_new_tokens=4)) == 4


def test_calib_needs_a_data_aware_method_and_gptq_needs_calib(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--method mse or gptq"):
        export_model(str(tiny_checkpoint("llama")), tmp_path / "b",
                     ExportOptions(quant="int4", method="rtn", calib=str(_text(tmp_path))), progress=False)
    with pytest.raises(ConfigError, match="--calib"):
        export_model(str(tiny_checkpoint("llama")), tmp_path / "b", ExportOptions(quant="int4", method="gptq"),
                     progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_gptq_export_records_it_and_beats_mse_on_the_calibration_text(tiny_checkpoint, tmp_path, arch):
    """Every linear the text reaches but q, k, v is quantized by gptq (the manifest says so per tensor;
    q, k, v keep the mse search), and the int4 model's logits on the text are closer to fp32's than
    the mse search's."""
    import edge
    ckpt = tiny_checkpoint(arch)
    text = _text(tmp_path)
    outs = {}
    for name, opts in (("fp32", ExportOptions(quant="fp32")),
                       ("mse", ExportOptions(quant="int4", calib=str(text), calib_tokens=300)),
                       ("gptq", ExportOptions(quant="int4", method="gptq", calib=str(text), calib_tokens=300))):
        outs[name] = export_model(str(ckpt), tmp_path / name, opts, progress=False).out
    m = json.loads((outs["gptq"] / "manifest.json").read_text())
    methods = {t["name"]: t.get("method") for t in m["tensors"] if t["dtype"] == "int4"}
    qkv = {t["name"]: t.get("method") for t in m["tensors"] if t["name"].endswith(".qkv")}   # int8 in a MoE
    assert qkv and all(v == "mse" for v in qkv.values())
    assert all(v == "gptq" for k, v in methods.items() if ".experts." not in k and k not in qkv), methods
    assert any(v == "gptq" for k, v in methods.items() if ".experts." in k) or arch == "llama"
    ids = np.array(_encode(ckpt, text.read_text())[:100])
    logits = {}
    for name, out in outs.items():
        model = edge.load(out, threads=2)
        logits[name] = model.decoder.forward(ids, all_logits=True).reshape(len(ids), -1).copy()
    err = {k: float(np.sqrt(np.mean((logits[k] - logits["fp32"]) ** 2))) for k in ("mse", "gptq")}
    assert err["gptq"] < err["mse"], err


def test_moe_grams_stream_layer_by_layer(tiny_checkpoint, tmp_path):
    """An MoE's statistics are computed a stage at a time, as the export asks for them in layer order;
    computing a later layer drops the earlier layers' grams (asking again is an error, not a silent
    fallback to no gram); the temporary fp32 bundle lives until close()."""
    cal = collect(str(tiny_checkpoint("mixtral")), str(_text(tmp_path)), max_tokens=300, gram=True, workdir=tmp_path)
    assert cal.stats["layers.0.qkv"].gram is not None and cal.stats["layers.0.experts.1.down"].gram is not None
    assert list(tmp_path.glob(".edge-calib-*"))
    assert cal.stats["layers.1.o"].gram is not None
    with pytest.raises(RuntimeError, match="layer by layer"):
        cal.stats["layers.0.qkv"]
    assert cal.stats["lm_head"].gram is not None
    assert not list(tmp_path.glob(".edge-calib-*")), "removed once the last stage is done"
    cal.close()
