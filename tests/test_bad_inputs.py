"""Every bad input a user can give the `edge` command, what they see, and that nothing is left
broken: one line of error text, exit code 1, no traceback (unless --debug), no loadable broken
bundle. `pytest tests/test_bad_inputs.py -s` prints the table used in the reliability notes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(b: Path, change) -> Path:
    m = json.loads((b / "manifest.json").read_text())
    change(m)
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _escaping_external_data(b: Path) -> Path:
    """An ONNX graph whose external data points outside the bundle (the manifest is honest about the
    graph file, so only onnxruntime's own check stands between the graph and /etc)."""
    import onnx
    m = json.loads((b / "manifest.json").read_text())
    graph = b / m["graph"]["file"]
    g = onnx.load(graph, load_external_data=False)
    for t in g.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../../../../etc/passwd"
    onnx.save(g, graph)
    for f in m["files"]:          # keep sizes and checksums consistent: only the content is hostile
        if f["path"] == m["graph"]["file"]:
            import hashlib
            f["size"] = graph.stat().st_size
            f["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _cases(dense: Path, moe: Path, ckpt: Path, tmp: Path):
    """(what was tried, argv after `edge`, the bundle folder that must not load afterwards or None)."""
    t = tmp
    (t / "empty").mkdir()
    (t / "notes.txt").write_text("hello")
    cfg_missing = _copy(ckpt, t / "ckpt-missing")
    c = json.loads((cfg_missing / "config.json").read_text())
    del c["num_attention_heads"]
    (cfg_missing / "config.json").write_text(json.dumps(c))
    cfg_arch = _copy(ckpt, t / "ckpt-arch")
    c = json.loads((cfg_arch / "config.json").read_text())
    c["model_type"] = "gpt_bigcode"
    (cfg_arch / "config.json").write_text(json.dumps(c))
    no_weights = _copy(ckpt, t / "ckpt-noweights")
    for p in no_weights.glob("*.safetensors"):
        p.unlink()
    trunc_st = _copy(ckpt, t / "ckpt-trunc")
    _truncate(next(trunc_st.glob("*.safetensors")))
    (t / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)

    def b(name, edit=None):
        d = _copy(dense, t / name)
        if edit:
            edit(d)
        return d

    weights = lambda d: d / "model.onnx.data"                                   # noqa: E731
    long_prompt = "word " * 300
    return [
        ("bundle path that does not exist", ["run", t / "nope", "hi"], None),
        ("an empty folder as bundle", ["run", t / "empty", "hi"], None),
        ("a file as bundle", ["run", t / "notes.txt", "hi"], None),
        ("manifest.json not JSON", ["run", b("garbage", lambda d: (d / "manifest.json").write_text("{oops")), "hi"], t / "garbage"),
        ("bundle from a newer edge (format 99)", ["run", b("newer", lambda d: _edit_manifest(d, lambda m: m.update(format_version=99))), "hi"], t / "newer"),
        ("manifest with an unknown key", ["run", b("unknown", lambda d: _edit_manifest(d, lambda m: m.update(surprise=1))), "hi"], t / "unknown"),
        ("manifest missing a key", ["run", b("missing", lambda d: _edit_manifest(d, lambda m: m.pop("model"))), "hi"], t / "missing"),
        ("weights file truncated", ["run", b("trunc", lambda d: _truncate(weights(d))), "hi"], t / "trunc"),
        ("weights file deleted", ["run", b("deleted", lambda d: weights(d).unlink()), "hi"], t / "deleted"),
        ("one byte of the weights flipped (inspect --verify)", ["inspect", "--verify", b("flipped", lambda d: _flip_byte(weights(d)))], None),
        ("manifest path ../../etc/passwd", ["run", b("escape", lambda d: _edit_manifest(d, lambda m: m["tokenizer"].update(file="../../etc/passwd"))), "hi"], t / "escape"),
        ("manifest absolute path /etc/passwd", ["run", b("absolute", lambda d: _edit_manifest(d, lambda m: m["tokenizer"].update(file="/etc/passwd"))), "hi"], t / "absolute"),
        ("tokenizer.json a symlink out of the bundle", ["run", b("symlink", lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer.json").symlink_to("/etc/hostname"))), "hi"], t / "symlink"),
        ("ONNX external data pointing outside the bundle", ["run", b("extdata", _escaping_external_data), "hi"], t / "extdata"),
        ("empty prompt", ["run", dense, ""], None),
        ("prompt longer than the context", ["run", dense, long_prompt, "--context", "64"], None),
        ("context larger than the model allows", ["run", dense, "hi", "--context", "100000000"], None),
        ("temperature -1", ["run", dense, "hi", "--temperature", "-1"], None),
        ("top-p 2", ["run", dense, "hi", "--top-p", "2"], None),
        ("max-new-tokens 0", ["run", dense, "hi", "-n", "0"], None),
        ("threads 0", ["run", dense, "hi", "--threads", "0"], None),
        ("memory budget on a dense model", ["run", dense, "hi", "--memory-budget", "1GB"], None),
        ("memory budget too small (MoE)", ["run", moe, "hi", "--memory-budget", "20MB"], None),
        ("memory budget not a size", ["run", moe, "hi", "--memory-budget", "lots"], None),
        ("unknown expert policy", ["run", moe, "hi", "--expert-policy", "random"], None),
        ("export: unsupported architecture", ["export", cfg_arch, "-o", t / "x1"], t / "x1"),
        ("export: config missing a field", ["export", cfg_missing, "-o", t / "x2"], t / "x2"),
        ("export: no weight files", ["export", no_weights, "-o", t / "x3"], t / "x3"),
        ("export: truncated safetensors", ["export", trunc_st, "-o", t / "x4"], t / "x4"),
        ("export: not a real GGUF", ["export", t / "bad.gguf", "-o", t / "x5"], t / "x5"),
        ("export: unknown quantization int3", ["export", ckpt, "-o", t / "x6", "--quant", "int3"], t / "x6"),
        ("export: block size 7", ["export", ckpt, "-o", t / "x7", "--block-size", "7"], t / "x7"),
        ("export: output exists (no --force)", ["export", ckpt, "-o", dense], None),
        ("export: hub id, offline", ["export", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", t / "x8"], t / "x8"),
    ]


def _run(argv):
    return subprocess.run([sys.executable, "-m", "edge", *map(str, argv)], capture_output=True, text=True, timeout=300)


def _loads(path: Path) -> bool:
    import edge
    try:
        edge.load(path, threads=1)
        return True
    except Exception:  # noqa: BLE001 - any failure to load is what we want
        return False


def test_every_bad_input_is_one_clear_line(tiny_bundle, tiny_checkpoint, tmp_path):
    dense, moe = tiny_bundle("llama", "int4"), tiny_bundle("mixtral", "int4")
    rows, failures = [], []
    for what, argv, must_not_load in _cases(dense, moe, tiny_checkpoint("llama"), tmp_path):
        r = _run(argv)
        err = r.stderr.strip()
        rows.append((what, r.returncode, err))
        ok = (r.returncode == 1 and err.startswith("error:") and "\n" not in err and "Traceback" not in err
              and (must_not_load is None or not must_not_load.exists() or not _loads(must_not_load)))
        if not ok:
            failures.append(f"{what}: rc={r.returncode} stderr={err[-400:]!r}")
    assert edge_loads_unharmed(dense)
    print("\n| bad input | exit | what the user sees |\n|---|---|---|")
    for what, rc, err in rows:
        print(f"| {what} | {rc} | `{err.replace('|', '/')}` |")
    assert not failures, "\n".join(failures)


def edge_loads_unharmed(dense: Path) -> bool:
    """The original bundle still loads and verifies after everything above."""
    r = _run(["inspect", "--verify", dense])
    return r.returncode == 0 and _loads(dense)


def test_debug_shows_the_traceback(tmp_path):
    r = _run(["--debug", "run", tmp_path / "nope", "hi"])
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="mounting a tmpfs needs root")
def test_disk_full_during_export_leaves_nothing(tiny_checkpoint, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = _run(["export", tiny_checkpoint("llama"), "-o", disk / "out", "--quant", "fp32"])
        assert r.returncode == 1 and "disk full" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)])
