"""Models edge has no graphs of its own for, exported through optimum: decoders (phi3, gemma, gpt2)
against transformers' logits and greedy tokens, embeddings against transformers' pooled output,
Whisper against transformers' greedy generate; and the runtime without optimum, torch or transformers."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge
from edge.bundle import open_bundle
from edge.errors import EdgeError, UnsupportedError

pytest.importorskip("optimum.exporters.onnx", reason="the optimum path needs optimum-onnx (pip install 'edge[optimum]')")

from test_tiny_models import ours, reference  # noqa: E402

OPTIMUM_ARCHS = ["phi3", "gemma", "gpt2"]


@pytest.mark.parametrize("arch", OPTIMUM_ARCHS)
def test_fp32_logits_and_greedy_tokens_equal_transformers(arch, tiny_checkpoint, tiny_bundle):
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 256, 12)]
    ref, tokens = reference(tiny_checkpoint(arch), ids, 8)
    b = tiny_bundle(arch)
    m = open_bundle(b).manifest
    assert m.source.format == "hf-safetensors" and m.graph.attention_mask and m.graph.cache[0].update == "concat"
    got = ours(b, ids, tokens[:-1])
    err = max(float(np.abs(a - r).max()) for a, r in zip(got, ref))
    assert err < 1e-3, f"{arch}: max abs logit error {err}"
    greedy = [int(g[-1].argmax()) for g in got]
    assert greedy == tokens, (greedy, tokens)


@pytest.mark.parametrize("arch", OPTIMUM_ARCHS)
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_exports_verify_and_generate(arch, quant, tiny_checkpoint, tiny_bundle):
    b = tiny_bundle(arch, quant)
    bundle = open_bundle(b)
    assert bundle.verify() == []
    linear = [t for t in bundle.manifest.tensors if t.dtype == quant]
    assert len(linear) >= 2 * 2 + 1 and all(0 < t.rms_rel_err < (0.02 if quant == "int8" else 0.2) for t in linear)
    ids = [int(i) for i in np.random.default_rng(2).integers(0, 256, 10)]
    ref, _ = reference(tiny_checkpoint(arch), ids, 0)
    model = edge.load(b, threads=1, context_length=64)
    assert np.abs(model.logits(ids) - ref[0]).max() < (0.05 if quant == "int8" else 0.5)
    out = model.generate_ids(ids, max_new_tokens=6, temperature=0)
    assert len(out) == 6
    again = model.generate_ids(ids, max_new_tokens=6, temperature=0)   # the prompt cache rewinds a concat cache
    assert again == out
    sampled = model.generate_ids(ids, max_new_tokens=6, temperature=0.8, seed=3)
    assert len(sampled) == 6


def test_via_optimum_on_an_architecture_edge_has(tiny_checkpoint, tiny_bundle):
    """--via optimum on llama gives the same logits as edge's own graph (which stays the default)."""
    own, via = tiny_bundle("llama"), tiny_bundle("llama", via="optimum")
    assert open_bundle(own).manifest.graph.seqlens_k and open_bundle(via).manifest.graph.attention_mask
    ids = [5, 17, 99, 3, 250, 7, 42]
    a = edge.load(own, threads=1).logits(ids)
    b = edge.load(via, threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-4


def test_speculative_prompt_lookup_on_a_concat_cache(tiny_bundle):
    """Rejected guesses roll back the concatenated cache: the text equals plain greedy decoding."""
    b = tiny_bundle("phi3")
    ids = [5, 17, 99, 3, 5, 17, 99, 3, 5, 17]
    plain = edge.load(b, threads=1).generate_ids(ids, max_new_tokens=12, temperature=0)
    spec = edge.load(b, threads=1, prompt_lookup=2, draft_tokens=4).generate_ids(ids, max_new_tokens=12, temperature=0)
    assert spec == plain


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("bert")
    return tiny.make_bert(root / "plain"), tiny.make_bert(root / "st", sentence_transformers=True)


def _export(src, out, quant, **opts):
    from export import ExportOptions, export_model
    return export_model(str(src), out, ExportOptions(quant=quant, **opts), progress=False).out


TEXTS = ["w5 w6 w7", "w10 w11 w12 w13 w14 w15 w99", "w4",
         " ".join(f"w{i}" for i in range(20, 60))]            # 40 words: truncated to the model's length


def _reference_embeddings(src, pooling, normalize, max_length):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(src).eval()
    tok = Tokenizer.from_file(str(Path(src) / "tokenizer.json"))
    tok.enable_truncation(max_length)
    out = []
    for text in TEXTS:
        with torch.no_grad():
            h = hf(torch.tensor([tok.encode(text).ids])).last_hidden_state[0].numpy()
        v = {"mean": h.mean(0), "cls": h[0]}[pooling]
        out.append(v / np.linalg.norm(v) if normalize else v)
    return np.array(out)


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("kind,pooling,max_length", [("plain", "mean", 64), ("st", "cls", 32)])
def test_embeddings_equal_transformers_pooled_output(kind, pooling, max_length, bert_dirs, tmp_path):
    src = bert_dirs[0] if kind == "plain" else bert_dirs[1]
    ref = _reference_embeddings(src, pooling, True, max_length)
    fp32 = edge.load(_export(src, tmp_path / "fp32", "fp32"), threads=1)
    assert fp32.spec.pooling == pooling and fp32.spec.normalize and fp32.spec.max_length == max_length
    got = fp32.embed(TEXTS, batch_size=3)                       # padded batches of different lengths
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32
    assert _cosines(got, ref).min() > 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    int8 = edge.load(_export(src, tmp_path / "int8", "int8"), threads=1)
    assert _cosines(int8.embed(TEXTS), ref).min() > 0.99
    assert np.array_equal(fp32.embed(TEXTS[0]), fp32.embed([TEXTS[0]]))
    with pytest.raises(EdgeError, match="string"):
        fp32.embed([])


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("whisper")
    src = tiny.make_whisper(root / "hf")
    return src, _export(src, root / "fp32", "fp32"), _export(src, root / "int8", "int8")


def _clip(seconds=7.0, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("language", ["en", "de", None])
def test_whisper_tokens_equal_transformers_generate(language, whisper):
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    src, fp32, _ = whisper
    features = WhisperFeatureExtractor.from_pretrained(src)(_clip(), sampling_rate=16000, return_tensors="np").input_features
    hf = WhisperForConditionalGeneration.from_pretrained(src).eval()
    with torch.no_grad():
        kw = dict(language=language) if language else {}
        want = hf.generate(torch.tensor(features), task="transcribe", max_new_tokens=40, **kw)[0].tolist()
    model = edge.load(fp32, threads=1)
    assert np.abs(model.features(_clip()) - features).max() < 1e-4          # numpy log-mel = the extractor's
    got = model.generate_ids(features, language=language, max_new_tokens=40)
    assert got == want


def test_whisper_reads_wav_files_and_chunks_long_audio(whisper, tmp_path):
    import wave
    _, fp32, int8 = whisper
    rate = 44100
    t = np.arange(int(rate * 35)) / rate                                       # 35 s: two 30 s windows
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.stack([pcm, pcm], 1).tobytes())
    model = edge.load(fp32, threads=1)
    samples = model.load_audio(path)
    assert abs(samples.size - 35 * 16000) <= 1 and np.abs(samples).max() < 0.31
    windows = list(model.stream(path, language="en"))
    assert len(windows) == 2
    assert model.transcribe(path, language="en") == " ".join(w for w in windows if w)
    assert isinstance(edge.load(int8, threads=1).transcribe(_clip(), language="en"), str)
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(EdgeError, match="not a WAV"):
        model.transcribe(tmp_path / "bad.wav")
    with pytest.raises(EdgeError, match="unknown language"):
        model.transcribe(_clip(), language="xx")


def test_cli_embed_and_transcribe(bert_dirs, whisper, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], capture_output=True, text=True,
                              timeout=300)
    emb = _export(bert_dirs[1], tmp_path / "emb", "int8")
    r = cli("embed", emb, "w5 w6", "w7 w8", "--json")
    assert r.returncode == 0, r.stderr
    assert np.array(json.loads(r.stdout)["embeddings"]).shape == (2, 64)
    r = cli("run", emb, "hello")
    assert r.returncode == 1 and "feature-extraction bundle" in r.stderr and "edge embed" in r.stderr
    import wave
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((_clip() * 32767).astype("<i2").tobytes())
    r = cli("transcribe", whisper[2], path, "--language", "en", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert abs(out["audio_s"] - 7.0) < 0.01 and out["real_time_factor"] > 0 and isinstance(out["text"], str)


def test_an_architecture_optimum_cannot_export_is_a_clear_error(tiny_checkpoint, tmp_path):
    import shutil
    src = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "not-a-model"}))
    with pytest.raises(UnsupportedError, match="optimum cannot export 'not-a-model'.*it exports .*gpt2"):
        _export(src, tmp_path / "b", "int8")
    with pytest.raises(EdgeError, match="unknown task"):
        _export(tiny_checkpoint("phi3"), tmp_path / "c", "int8", task="summarization")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'onnx'):
            raise ImportError(f'{name} is blocked: the runtime must not need it')
sys.meta_path.insert(0, Block())
import edge, numpy as np
dec, emb, asr = sys.argv[1:4]
print(len(edge.load(dec, threads=1).generate_ids([5, 6, 7], max_new_tokens=4, temperature=0)))
print(edge.load(emb, threads=1).embed(['w5 w6']).shape[1])
print(type(edge.load(asr, threads=1).transcribe(np.zeros(16000, np.float32), language='en')).__name__)
"""


def test_the_runtime_runs_these_bundles_without_optimum_torch_or_transformers(tiny_bundle, bert_dirs, whisper, tmp_path):
    emb = _export(bert_dirs[0], tmp_path / "emb", "int8")
    r = subprocess.run([sys.executable, "-c", BLOCKER, str(tiny_bundle("gpt2", "int4")), str(emb), str(whisper[2])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4", "64", "str"]
