"""Bad bundles and bad sources give clear errors; exports are atomic."""
import json
import shutil

import pytest

import edge
from edge.errors import BundleError, EdgeError, UnsupportedError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_non_bundles(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        edge.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        edge.load(tmp_path)


def test_truncated_weights_are_detected_on_load(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle("llama", "int4"), tmp_path / "b")
    data = b / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(BundleError, match="truncated"):
        edge.load(b)


def test_corrupt_bytes_are_found_by_verify(tiny_bundle, tmp_path):
    from edge.bundle import open_bundle
    b = _copy(tiny_bundle("llama", "int4"), tmp_path / "b")
    raw = bytearray((b / "model.onnx.data").read_bytes())
    raw[5000] ^= 0xFF
    (b / "model.onnx.data").write_bytes(bytes(raw))
    assert open_bundle(b).verify() == ["model.onnx.data: sha256 mismatch"]


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../x"])
def test_paths_cannot_leave_the_bundle(tiny_bundle, tmp_path, path):
    b = _copy(tiny_bundle("llama"), tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["files"][0]["path"] = path
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unsafe path|outside"):
        edge.load(b)


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle("llama"), tmp_path / "b")
    (tmp_path / "elsewhere.json").write_text((b / "tokenizer.json").read_text())
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleError, match="outside"):
        edge.load(b)


def test_garbage_manifest(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle("llama"), tmp_path / "b")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        edge.load(b)


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import export.attention as dec
    from export import ExportOptions, export_model

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(dec, "_head_rms", boom)       # qwen3 calls it mid-graph
    monkeypatch.setattr("export.build_decoder", lambda *a, **k: boom())
    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_checkpoint("qwen3")), tmp_path / "out", ExportOptions(quant="fp32"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_without_force(tiny_checkpoint, tmp_path):
    from export import ExportOptions, export_model
    export_model(str(tiny_checkpoint("llama")), tmp_path / "out", ExportOptions(quant="int8"), progress=False)
    with pytest.raises(EdgeError, match="--force"):
        export_model(str(tiny_checkpoint("llama")), tmp_path / "out", ExportOptions(quant="int8"), progress=False)
    r = export_model(str(tiny_checkpoint("llama")), tmp_path / "out", ExportOptions(quant="int4"), force=True, progress=False)
    assert r.manifest.quant == "int4" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unsupported_architecture_is_named(tiny_checkpoint, tmp_path):
    from export import export_model
    src = _copy(tiny_checkpoint("llama"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (src / "config.json").write_text(json.dumps(cfg))
    from export import ExportOptions
    # edge's own exporter names what it has; without --via edge, optimum would try this model_type
    with pytest.raises(UnsupportedError, match="gpt_bigcode.*supported model_types: deepseek_v2, deepseek_v3, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        export_model(str(src), tmp_path / "out", ExportOptions(via="edge"), progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_config_value_is_named(tiny_checkpoint, tmp_path):
    from export import export_model
    src = _copy(tiny_checkpoint("llama"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="hidden_act='gelu'"):
        export_model(str(src), tmp_path / "out", progress=False)


def test_hub_ids_fail_clearly_offline(tmp_path):
    from export import export_model
    with pytest.raises(EdgeError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        export_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "out", progress=False)


def test_a_format_1_bundle_still_loads(tiny_bundle, tmp_path):
    """Format 1 described a GQA cache by fields and routing by a name; it loads as format 2 and runs
    the same (its graphs are unchanged)."""
    import json
    import shutil

    import numpy as np

    import edge
    src = tiny_bundle("mixtral", "int4")
    old = shutil.copytree(src, tmp_path / "old", ignore=shutil.ignore_patterns("packed"))
    m = json.loads((old / "manifest.json").read_text())

    def graph_v1(g):
        cache = g.pop("cache")
        keys, values = cache[0::2], cache[1::2]
        g.update(past_keys=[c["input"] for c in keys], present_keys=[c["output"] for c in keys],
                 past_values=[c["input"] for c in values], present_values=[c["output"] for c in values],
                 kv_num_heads=keys[0]["shape"][1], kv_head_dim=keys[0]["shape"][3], kv_dtype="float32")
        return g
    m["format_version"] = 1
    m["graph"] = graph_v1(m["graph"])
    moe = m["moe"]
    moe["fused"] = graph_v1(moe["fused"])
    routing = moe.pop("routing")
    moe.update(top_k=routing["top_k"], normalize_topk=routing["normalize"], routing="softmax_topk")
    moe.pop("router_biases")
    for st in moe["stages"]:
        idx = st.pop("cache")
        if idx:
            st["inputs"].update(past_key=f"past_key.{idx[0] // 2}", past_value=f"past_value.{idx[0] // 2}")
            st["outputs"].update(present_key=f"present_key.{idx[0] // 2}", present_value=f"present_value.{idx[0] // 2}")
    (old / "manifest.json").write_text(json.dumps(m))
    ids = [5, 17, 99, 3, 250]
    for kw in ({}, {"expert_capacity": 3}):
        a, b = edge.load(src, threads=1, context_length=64, **kw), edge.load(old, threads=1, context_length=64, **kw)
        assert b.manifest.format_version == 2 and b.manifest.graph == a.manifest.graph
        assert np.array_equal(a.logits(ids), b.logits(ids))
