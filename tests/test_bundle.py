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
    import export.decoder as dec
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
    with pytest.raises(UnsupportedError, match="gpt_bigcode.*supported model_types: llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        export_model(str(src), tmp_path / "out", progress=False)


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
