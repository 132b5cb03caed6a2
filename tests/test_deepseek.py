"""DeepSeek-V2/V3: routing equals transformers' routers, tiny random checkpoints (MLA with and without
the q LoRA, groups, shared experts, dense first layers, YaRN) give transformers' greedy tokens, export
and generate in int8 and int4, and stream their experts under a small cache with the unlimited run's
logits. (fp32 logits against transformers: tests/test_tiny_models.py.)"""
import json
import shutil

import numpy as np
import pytest

import edge
from edge.errors import BundleError
from edge.manifest import Routing
from edge.routing import route, route_one
from test_tiny_models import ours, reference

ARCHS = ["deepseek_v2", "deepseek_v2-groups", "deepseek_v3", "deepseek_v3-plain"]


def _hf_router(model_type: str, **cfg):
    import torch
    from transformers import AutoConfig
    c = AutoConfig.for_model(model_type, hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, **cfg)
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    # transformers 5: DeepseekV2TopkRouter; 4.x: DeepseekV2MoEGate (both v3's: DeepseekV3TopkRouter)
    Router = getattr(v2, "DeepseekV2TopkRouter", None) or v2.DeepseekV2MoEGate if model_type == "deepseek_v2" \
        else v3.DeepseekV3TopkRouter
    torch.manual_seed(0)
    r = Router(c)
    with torch.no_grad():
        r.weight.normal_()
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.normal_(0, 0.1)
    return r


def _route(r, x):
    """(router logits, weights, expert ids) from either version's router (4.x returns ids, weights)."""
    import torch
    out = r(x[None] if type(r).__name__ == "DeepseekV2MoEGate" else x)
    if len(out) == 3:
        return out
    ids, w = out
    return torch.nn.functional.linear(x.float(), r.weight.float()), w, ids


@pytest.mark.parametrize("model_type,cfg,routing", [
    ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=1.0),
     Routing(scoring="softmax", top_k=4, normalize=False)),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5),
     Routing(scoring="softmax", top_k=4, normalize=False, scale=1.5, groups=4, top_groups=2, group_score="max")),
    ("deepseek_v3", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
     Routing(scoring="sigmoid", top_k=4, normalize=True, scale=2.5, groups=4, top_groups=2, group_score="top2_sum",
             bias=True)),
    ("deepseek_v3", dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
     Routing(scoring="sigmoid", top_k=4, normalize=False, groups=1, top_groups=1, group_score="top2_sum", bias=True)),
])
def test_routing_equals_transformers_routers(model_type, cfg, routing):
    import torch
    r = _hf_router(model_type, **cfg)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, w, ids = _route(r, x)
    bias = r.e_score_correction_bias.numpy() if routing.bias else None
    got_ids, got_w = route(logits.numpy(), routing, bias)
    order = np.argsort(ids.numpy(), -1)                        # transformers' top-k is unsorted
    want_ids = np.take_along_axis(ids.numpy(), order, -1)
    want_w = np.take_along_axis(w.numpy(), order, -1)
    mine = np.argsort(got_ids, -1)
    assert np.array_equal(np.take_along_axis(got_ids, mine, -1), want_ids)
    np.testing.assert_allclose(np.take_along_axis(got_w, mine, -1), want_w, rtol=1e-6, atol=1e-7)
    for t in range(8):                                         # decode's one-token path: the same to the bit
        one_ids, one_w = route_one(logits[t].numpy(), routing, bias)
        assert one_ids == got_ids[t].tolist() and np.array_equal(np.array(one_w, np.float32), got_w[t])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_transformers(arch, tiny_checkpoint, tiny_bundle):
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 256, 10)]
    _, tokens = reference(tiny_checkpoint(arch), ids, 12)
    d = edge.load(tiny_bundle(arch), threads=1, context_length=64).decoder
    got = [int(np.argmax(d.forward(ids)))]                     # greedy past the tiny tokenizer's eos too
    while len(got) < len(tokens):
        got.append(int(np.argmax(d.forward([got[-1]]))))
    assert got == tokens


@pytest.mark.parametrize("arch", ["deepseek_v2-groups", "deepseek_v3"])
@pytest.mark.parametrize("quant,tol", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_exports_generate(arch, quant, tol, tiny_bundle):
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 256, 16)]
    exact = edge.load(tiny_bundle(arch), threads=1, context_length=64)
    approx = edge.load(tiny_bundle(arch, quant), threads=1, context_length=64)
    a, b = approx.logits(ids), exact.logits(ids)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol
    assert 1 <= len(approx.generate_ids(ids, max_new_tokens=8, temperature=0.0)) <= 8
    kinds = {t.name: t.dtype for t in approx.manifest.tensors}
    assert kinds["layers.1.kv_a"] == "int8" and kinds["layers.1.kv_b.k"] == "float32"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["fp32", "int4"])
@pytest.mark.parametrize("slots", [True, False])
def test_a_small_expert_cache_gives_the_unlimited_logits(arch, quant, slots, tiny_bundle):
    b = tiny_bundle(arch, quant)
    ids = [int(i) for i in np.random.default_rng(6).integers(0, 256, 12)]
    full = edge.load(b, threads=1, context_length=64)
    r = full.manifest.moe.routing        # a fused graph only where QMoE routes alike (DeepSeek-V2's plain softmax)
    assert (full.manifest.moe.fused is not None) == (quant == "int4" and r.groups == 1 and r.scoring == "softmax"
                                                     and r.scale == 1.0)
    want = ours(b, ids, list(range(40, 48)))
    top_k = full.manifest.moe.top_k
    small = edge.load(b, threads=1, context_length=64, expert_capacity=top_k, expert_slots=slots)
    assert type(small.decoder.experts).__name__ == ("SlotCache" if slots else "ExpertCache")
    got = ours(b, ids, list(range(40, 48)), expert_capacity=top_k, expert_slots=slots)
    assert max(float(np.abs(x - y).max()) for x, y in zip(got, want)) < 1e-4
    assert small.generate_ids(ids, max_new_tokens=16, temperature=0.0) == \
        full.generate_ids(ids, max_new_tokens=16, temperature=0.0)
    assert small.decoder.experts.stats.misses > 0


def test_the_cache_holds_the_latent(tiny_bundle):
    """One buffer a layer: the compressed latent and the rotary key, [1, tokens, kv_lora_rank + rope]."""
    m = edge.load(tiny_bundle("deepseek_v3"), threads=1, context_length=64).manifest
    assert [(c.shape, c.update) for c in m.graph.cache] == [((1, -1, 16 + 8), "append")] * 3
    assert m.graph.cache_bytes(100) == 3 * 24 * 4 * 100
    assert [st.cache for st in m.moe.stages] == [(0,), (1,), (2,), ()]


def test_an_unknown_routing_is_an_error_at_load(tiny_bundle, tmp_path):
    b = shutil.copytree(tiny_bundle("deepseek_v3"), tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["moe"]["routing"]["scoring"] = "relu"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unknown routing scoring 'relu'"):
        edge.load(b)
    m["moe"]["routing"].update(scoring="sigmoid", kind="noaux")
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unknown field"):
        edge.load(b)


def _fp8_blocks(w, block: int):
    """DeepSeek's FP8 layout of one weight: e4m3 values and one fp32 scale per block x block tile,
    chosen so the tile's largest magnitude maps to e4m3's largest (448)."""
    import torch
    rows, cols = -(-w.shape[-2] // block), -(-w.shape[-1] // block)
    padded = torch.zeros(*w.shape[:-2], rows * block, cols * block)
    padded[..., :w.shape[-2], :w.shape[-1]] = w
    tiles = padded.unflatten(-1, (cols, block)).unflatten(-3, (rows, block))      # [..., R, b, C, b]
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0             # [..., R, C]
    expanded = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :w.shape[-2], :w.shape[-1]]
    q = (w / expanded).to(torch.float8_e4m3fn)
    return q, scale, q.float() * expanded


def test_an_fp8_checkpoint_exports_as_its_dequantized_twin(tiny_checkpoint, tmp_path):
    """Bar: FP8 e4m3 weights with block scales (16x16 here, ragged at the edges; DeepSeek uses
    128x128) give the fp32 export of the twin that holds the same weights dequantized."""
    import torch
    from safetensors.torch import load_file, save_file
    from export import ExportOptions, export_model
    src = tiny_checkpoint("deepseek_v3")
    fp8_dir, twin_dir = tmp_path / "fp8", tmp_path / "twin"
    fp8, twin = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if ".layers." in name and name.endswith("proj.weight") or "proj_with_mqa" in name:
            fp8[name], fp8[name + "_scale_inv"], twin[name] = _fp8_blocks(w, 16)
        else:
            fp8[name] = twin[name] = w
    assert sum(v.dtype == torch.float8_e4m3fn for v in fp8.values()) > 30
    for d, tensors in ((fp8_dir, fp8), (twin_dir, twin)):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, d / "model.safetensors")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 256, 10)]
    logits = []
    for d in (fp8_dir, twin_dir):
        b = export_model(str(d), tmp_path / f"{d.name}-bundle", ExportOptions(quant="fp32"), progress=False).out
        logits.append(ours(b, ids, [1, 2, 3, 4]))
    for a, b in zip(*logits):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_fp8_tensors_are_dequantized_in_blocks(tmp_path):
    """The reader against torch's own e4m3 conversion, for a fused [experts, out, in] tensor with
    ragged blocks; a weight without its scale is a clear error."""
    import torch
    from safetensors.torch import save_file
    from export.sources import HFFolder
    w = torch.randn(3, 40, 20, generator=torch.Generator().manual_seed(0))
    q, scale, want = _fp8_blocks(w, 16)
    save_file({"w": q, "w_scale_inv": scale, "lonely": q.clone()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [16, 16]}}))
    src = HFFolder(tmp_path)
    assert np.array_equal(src.get("w"), want.numpy())
    with pytest.raises(edge.EdgeError, match="lonely has no lonely_scale_inv"):
        src.get("lonely")


def test_the_classic_rope_scaling_spelling_exports_alike(tiny_checkpoint, tiny_bundle, tmp_path):
    """DeepSeek's published config.json files say rope_theta + rope_scaling {"type": "yarn", ...};
    transformers 5 saves rope_parameters. Both give the same bundle logits."""
    from export import ExportOptions, export_model
    src = shutil.copytree(tiny_checkpoint("deepseek_v2-groups"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    if "rope_parameters" in cfg:                  # transformers 4.x saved the classic spelling already
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    else:
        cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if k != "rope_type"}
    assert cfg["rope_scaling"]["type"] == "yarn"
    (src / "config.json").write_text(json.dumps(cfg))
    out = export_model(str(src), tmp_path / "b", ExportOptions(quant="fp32"), progress=False).out
    ids = [5, 17, 99, 3, 250, 7]
    assert np.array_equal(edge.load(out, threads=1).logits(ids),
                          edge.load(tiny_bundle("deepseek_v2-groups"), threads=1).logits(ids))
