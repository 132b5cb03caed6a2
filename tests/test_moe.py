"""Mixture-of-Experts: tiny Mixtral equals transformers (test_tiny_models), greedy output under a
small expert cache equals the all-resident run, and the real SmolMoE-8x135M equals transformers."""
import json
import os

import numpy as np
import pytest

import edge
from edge.errors import BundleError
from edge.manifest import Routing
from edge.routing import route, route_one


def softmax(k, normalize):
    return Routing(scoring="softmax", top_k=k, normalize=normalize)


def test_routing_matches_mixtral():
    logits = np.array([[0.1, 2.0, -1.0, 1.5], [3.0, 3.0, 0.0, -2.0]], np.float32)
    ids, w = route(logits, softmax(2, True))
    assert ids.tolist() == [[1, 3], [0, 1]]               # ties go to the lower id, as torch.topk
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-6)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    _, w_raw = route(logits, softmax(2, False))
    np.testing.assert_allclose(w_raw[0], p[[1, 3]], rtol=1e-6)



def test_decode_routing_equals_route_to_the_bit():
    """route_one (decode's plain-Python path, float32 steps done in float64 and rounded) gives route's
    ids and weights exactly: ties, flat and peaked logits, k of 1..8, renormalised or not."""
    rng = np.random.default_rng(0)
    for n in range(4000):
        e = (4, 8, 60, 64)[n % 4]
        k = min(e, (1, 2, 4, 8)[n // 4 % 4])
        row = (rng.standard_normal(e) * rng.choice([1e-3, 1, 10, 60])).astype(np.float32)
        if n % 3 == 0:
            row[rng.integers(e)] = row[rng.integers(e)]                     # a tie
        if n % 5 == 0:
            row = np.round(row)                                             # many ties
        for normalize in (True, False):
            ids, w = route(row[None], softmax(k, normalize))
            ids1, w1 = route_one(row, softmax(k, normalize))
            assert ids1 == ids[0].tolist()
            assert all(type(x) is np.float32 for x in w1)
            assert np.array_equal(np.array(w1, np.float32), w[0]), (row, k, normalize)

def test_staged_experts_add_up_as_qmoe_does(tmp_path):
    """One layer, 8 int4 experts whose outputs are not negligible next to a residual stream (in the tiny
    checkpoints they are, and hide a last-bit difference in a routing weight): the staged path (one-expert QMoE graphs
    from export, MoEDecoder._mix's routing and sum) equals a QMoE node over all experts, bit for bit.
    numpy's float32 exp in the routing weights would break it."""
    from types import SimpleNamespace

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import edge.routing
    from edge.engine import default_threads, open_session, pooled_options, use_global_pool
    from edge.moe import MoEDecoder
    from export.moe import _qmoe_expert, _tensors, qmoe_attributes
    from export.onnx_graph import OPSETS
    from export.quant import QuantScheme

    use_global_pool(default_threads())       # as the runtime's sessions do (one per process)
    rng = np.random.default_rng(0)
    E, H, F, S, bs = 8, 128, 256, 48, 32
    scheme = QuantScheme(bits=4, block_size=bs)
    sessions, stacked = [], {}
    for e in range(E):
        t = {"expert.gate_up.qweight": rng.integers(0, 256, (2 * F, H // bs, bs // 2), dtype=np.uint8),
             "expert.gate_up.scales": rng.uniform(0.01, 0.03, (2 * F, H // bs)).astype(np.float32),
             "expert.down.qweight": rng.integers(0, 256, (H, F // bs, bs // 2), dtype=np.uint8),
             "expert.down.scales": rng.uniform(0.01, 0.03, (H, F // bs)).astype(np.float32)}
        g, blob = _qmoe_expert(t, H, scheme)
        (tmp_path / "experts.bin").write_bytes(blob.bytes())
        g.save(tmp_path / f"expert{e}.onnx")
        sessions.append(open_session(tmp_path / f"expert{e}.onnx", pooled_options()))
        for k, v in _tensors(g, blob.bytes()).items():
            stacked.setdefault(k, []).append(v[0])
    w = {k: numpy_helper.from_array(np.stack(v), k) for k, v in stacked.items()}
    node = helper.make_node("QMoE", ["x", "r", "expert.gate_up.qweight", "expert.gate_up.scales", "",
                                     "expert.down.qweight", "expert.down.scales"], ["y"], domain="com.microsoft",
                            **qmoe_attributes(2, scheme))
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", H]),
                                              helper.make_tensor_value_info("r", TensorProto.FLOAT, ["S", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", H])], list(w.values()))
    fused = ort.InferenceSession(helper.make_model(graph, opset_imports=OPSETS).SerializeToString(), pooled_options(),
                                 providers=["CPUExecutionProvider"])
    x = rng.standard_normal((S, H)).astype(np.float32)
    logits = rng.standard_normal((S, E)).astype(np.float32)
    logits[0, 3] = logits[0].max() + 20                        # one token's second expert weighs < 1e-8
    want = fused.run(None, {"x": x, "r": logits})[0]
    cache = SimpleNamespace(run=lambda layer, e, feeds: sessions[e].run(["y"], feeds)[0], prefetcher=None)
    decoder = SimpleNamespace(moe=SimpleNamespace(top_k=2, expert_input="x", expert_output="y"),
                              routing=softmax(2, True), _biases=[None], experts=cache)
    assert np.array_equal(MoEDecoder._mix(decoder, 0, x, logits), want)
    for t in (0, 1):                       # one token (QMoE's kernels round M = 1 and M > 1 differently)
        one = fused.run(None, {"x": x[t:t + 1], "r": logits[t:t + 1]})[0]
        assert np.array_equal(MoEDecoder._mix(decoder, 0, x[t:t + 1], logits[t:t + 1]), one)
    import unittest.mock
    with unittest.mock.patch.object(edge.routing, "_expf", np.exp):
        assert not np.array_equal(MoEDecoder._mix(decoder, 0, x, logits), want)


@pytest.mark.parametrize("arch,quant", [("mixtral", "fp32"), ("mixtral", "int4"), ("qwen2_moe", "int4"),
                                       ("qwen2_moe-mixed", "int4")])
@pytest.mark.parametrize("slots", [True, False])
def test_small_expert_cache_gives_identical_tokens(tiny_bundle, arch, quant, slots):
    b = tiny_bundle(arch, quant)
    prompts = [[5, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    full = edge.load(b, threads=1, context_length=64, expert_capacity=8)     # staged, all 8 experts resident
    want = [full.generate_ids(p, max_new_tokens=20) for p in prompts]
    small = edge.load(b, threads=1, context_length=64, expert_capacity=2, expert_slots=slots)  # a token's top-2
    assert type(small.decoder.experts).__name__ == ("SlotCache" if slots else "ExpertCache")
    assert [small.generate_ids(p, max_new_tokens=20) for p in prompts] == want
    s = small.decoder.experts.stats
    assert s.misses > 8 and s.evictions > 0 and len(small.decoder.experts.cache) <= 2


def test_session_build_ahead_guesses_are_scored_and_change_nothing(tiny_bundle):
    """The next layers' routers on the current hidden state guess their experts; on the session path
    with prefetch on, misses and guesses are read and built in the background, greedy output stays
    that of the all-resident run, and no read buffer is lost. Off by default on one thread or when the
    cache holds at least half the experts; on below half."""
    from edge.prefetch import AHEAD
    b = tiny_bundle("mixtral", "int4")
    want = edge.load(b, threads=1, context_length=64, expert_capacity=8).generate_ids([5, 17, 99, 3], max_new_tokens=16)
    n_all = len(edge.load(b, threads=1, context_length=64, expert_capacity=8).manifest.moe.experts)
    sessions = dict(threads=2, context_length=64, expert_slots=False)
    assert edge.load(b, **dict(sessions, threads=1), expert_capacity=3).decoder.experts.prefetcher is None
    assert edge.load(b, **sessions, expert_capacity=n_all // 2).decoder.experts.prefetcher is None
    assert edge.load(b, **sessions, expert_capacity=3).decoder.experts.prefetcher is not None
    for prefetch in (False, True):
        m = edge.load(b, **sessions, expert_capacity=3, prefetch=prefetch)
        assert m.manifest.moe.routers and m.decoder.guesser is not None
        assert m.generate_ids([5, 17, 99, 3], max_new_tokens=16) == want
        g = m.decoder.guesser.stats
        assert g.guessed > 0 and 0 < g.precision <= 1 and g.recall == g.precision       # top-k guesses of top-k
        pf = m.decoder.experts.prefetcher
        assert (pf is not None) == prefetch
        if prefetch:
            assert g.loaded > 0 and g.served > 0 and g.served <= g.loaded
            with pf.cond:
                slots = (1 + AHEAD) * m.manifest.moe.top_k
                assert len(pf.free) + len(pf.read) + (pf.reading is not None) == slots   # no buffer lost
                assert len(pf.ready) + len(pf.building) <= slots
            threads = pf.threads
            m.decoder.experts.close()
            assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("capacity", [2, 3, 5])
def test_slot_read_ahead_changes_nothing(tiny_bundle, capacity):
    """With slots, a reader thread reads a layer's misses and the next layers' guessed experts into
    slots while the decode runs (on by default, one thread or two); greedy output and logits stay
    those of the fused graph, the guesses are scored, and what was read ahead is counted as used or
    wasted; closing the cache stops the thread."""
    b = tiny_bundle("mixtral", "int4")
    fused = edge.load(b, threads=1, context_length=64)
    ids = [5, 17, 99, 3, 250, 7, 8, 9]
    want = fused.generate_ids(ids, max_new_tokens=16)
    m = edge.load(b, threads=1, context_length=64, expert_capacity=capacity)
    c = m.decoder.experts
    assert type(c).__name__ == "SlotCache" and c.prefetcher is not None and c.capacity == capacity
    assert m.generate_ids(ids, max_new_tokens=16) == want
    assert np.array_equal(m.logits(ids), fused.logits(ids))
    g = c.prefetcher.stats
    assert g.guessed > 0 and g.served + g.wasted <= g.loaded
    assert g.loaded == 0 if capacity == m.manifest.moe.top_k else True   # reads ahead leave a token's slots alone
    assert g.loaded > 0 or capacity < 5
    assert c.stats.misses >= g.served and (c.pins == 0).all() and not c.loading.any()
    thread = c.prefetcher.thread
    c.close()
    assert not thread.is_alive()
    off = edge.load(b, threads=1, context_length=64, expert_capacity=capacity, prefetch=False)
    assert off.decoder.experts.prefetcher is None and off.generate_ids(ids, max_new_tokens=16) == want


@pytest.mark.parametrize("arch,quant", [("mixtral", "int4"), ("mixtral", "int8"), ("qwen3_moe", "int4"), ("olmoe", "int4"),
                                       ("qwen2_moe", "int4"), ("qwen3_moe-mixed", "int4"), ("qwen2_moe-mixed", "int4")])
def test_fused_graph_matches_the_staged_pipeline(tiny_bundle, arch, quant):
    """Without a memory limit the runtime runs the fused graph (one QMoE node per layer); it must
    compute what the staged pipeline computes (olmoe: top-k weights not renormalised). Where the
    top-k weights are renormalised and k = 2 (Mixtral, SmolMoE, the tiny Qwen3-MoE) it is the same to the bit: each staged
    expert is a one-expert QMoE and the runtime weighs and adds their outputs as QMoE does."""
    b = tiny_bundle(arch, quant)
    fused = edge.load(b, threads=2, context_length=64)
    staged = edge.load(b, threads=2, context_length=64, expert_capacity=8)
    assert type(fused.decoder).__name__ == "Decoder" and type(staged.decoder).__name__ == "MoEDecoder"
    ids = [5, 17, 99, 3, 250, 7, 8, 9]
    f, s = fused.logits(ids), staged.logits(ids)
    np.testing.assert_allclose(f, s, atol=1e-4)
    moe = fused.manifest.moe
    exact = moe.routing.normalize and moe.top_k == 2
    assert exact == (arch in ("mixtral", "qwen3_moe", "qwen3_moe-mixed"))
    if exact:                                # to the bit, prompt and token by token (decode's buffers)
        assert np.array_equal(f, s)
        assert fused.generate_ids(ids, max_new_tokens=12) == staged.generate_ids(ids, max_new_tokens=12)
        fused.decoder.reset(), staged.decoder.reset()
        for t in ids:
            assert np.array_equal(fused.decoder.forward([t]), staged.decoder.forward([t]))


def test_dense_layers_among_sparse_ones(tiny_bundle):
    """mlp_only_layers / decoder_sparse_step: a dense layer's stage holds its MLP and writes the hidden
    state itself; experts are numbered by MoE layer. With one token's experts resident and build-ahead
    on, prompt and decode equal the fused graph's to the bit (the tiny Qwen3-MoE renormalises top-2)."""
    b = tiny_bundle("qwen3_moe-mixed", "int4")
    fused = edge.load(b, threads=2, context_length=64)
    moe = fused.manifest.moe
    assert ["router_logits" in st.outputs for st in moe.stages[:-1]] == [False, True, True, False]
    assert sorted({e.layer for e in moe.experts}) == [0, 1] and len(moe.routers) == 2
    small = edge.load(b, threads=2, context_length=64, expert_capacity=3, prefetch=True)
    assert small.decoder.experts.prefetcher is not None and type(small.decoder.experts).__name__ == "SlotCache"
    ids = [5, 17, 99, 3, 250, 7, 8, 9]
    assert np.array_equal(fused.logits(ids), small.logits(ids))
    assert fused.generate_ids(ids, max_new_tokens=12) == small.generate_ids(ids, max_new_tokens=12)
    assert small.decoder.experts.stats.misses > 0 and small.decoder.guesser.stats.guessed > 0
    small.decoder.experts.close()


def test_capacity_below_top_k_is_refused(tiny_bundle):
    with pytest.raises(edge.ConfigError, match="at least one token's experts"):
        edge.load(tiny_bundle("mixtral", "int4"), expert_capacity=1)


def test_truncated_expert_store_is_a_clear_error(tiny_bundle, tmp_path):
    import shutil
    b = shutil.copytree(tiny_bundle("mixtral", "int4"), tmp_path / "b")
    data = (b / "experts.bin").read_bytes()
    (b / "experts.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(edge.BundleError, match="experts.bin"):
        edge.load(b)


@pytest.fixture(scope="module")
def smolmoe_hf(workdir):
    from conftest import FIXTURE_MISSING, SHARED, smollm2_gguf
    build = SHARED / "fixtures" / "smolmoe" / "build.py"
    if not build.is_file() or smollm2_gguf() is None:
        pytest.skip(FIXTURE_MISSING)
    import subprocess
    import sys
    out = workdir / "hf" / "smolmoe"
    subprocess.run([sys.executable, str(build), str(out)], check=True, capture_output=True)
    return out


def test_smolmoe_fp32_greedy_equals_transformers(smolmoe_hf, workdir):
    import torch
    from test_smollm2 import PROMPTS, greedy, hf_greedy
    from transformers import AutoModelForCausalLM

    from export import ExportOptions, export_model
    b = export_model(str(smolmoe_hf), workdir / "smolmoe-fp32", ExportOptions(quant="fp32"), progress=False).out
    m = edge.load(b, threads=2, context_length=256)
    ref = AutoModelForCausalLM.from_pretrained(smolmoe_hf, dtype=torch.float32).eval()
    for p in PROMPTS:
        ids = m.encode(p)
        assert greedy(m, ids) == hf_greedy(ref, ids), p


def test_real_moe_with_dense_layers_matches_transformers(smolmoe_hf, smollm2_hf, workdir):
    """SmolMoE as Qwen2-MoE with every third layer SmolLM2's dense FFN (tests/mixed_moe.py): a real
    checkpoint whose dense and sparse layers alternate; fp32 greedy equals transformers'."""
    import torch
    from mixed_moe import make
    from test_smollm2 import PROMPTS, greedy, hf_greedy
    from transformers import AutoModelForCausalLM

    from export import ExportOptions, export_model
    src = make(smolmoe_hf, smollm2_hf, workdir / "hf" / "smolmoe-mixed")
    b = export_model(str(src), workdir / "smolmoe-mixed-fp32", ExportOptions(quant="fp32"), progress=False).out
    m = edge.load(b, threads=2, context_length=256)
    assert sum("router_logits" in st.outputs for st in m.manifest.moe.stages) == 20
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for p in PROMPTS:
        ids = m.encode(p)
        assert greedy(m, ids) == hf_greedy(ref, ids), p


def test_smolmoe_int4_quarter_cache_identical(smolmoe_hf, workdir):
    from test_smollm2 import greedy

    from export import ExportOptions, export_model
    b = export_model(str(smolmoe_hf), workdir / "smolmoe-int4", ExportOptions(quant="int4", method="rtn"), progress=False).out
    full = edge.load(b, threads=2, context_length=256)                          # the fused graph
    ids = full.encode("The robot picked up the box and")
    want = greedy(full, ids, 16)
    quarter = edge.load(b, threads=2, context_length=256, expert_capacity=60)   # 25% of 240 experts
    assert greedy(quarter, ids, 16) == want
    text = full.encode(" ".join(["The arm moved the red block onto the shelf, then checked the sensor."] * 12))
    assert len(text) > 128                                       # several 64-token prompt pieces
    assert np.array_equal(quarter.logits(text), full.logits(text))
    assert quarter.decoder.experts.stats.evictions > 0
    # the estimate made before any expert is loaded (device plans) is what the runtime then measures
    # for a slot in a fresh process (experts at block 64: a record is 1.18x the blob), within 10%
    import subprocess
    import sys
    from edge.experts import packed_factor
    from edge.moe import SLOT_MARGIN
    m = full.manifest
    blob = max(x.size for x in m.moe.experts)
    measured = int(subprocess.run([sys.executable, "-c", "import edge; print(edge.load(%r, threads=2, context_length=256, "
                                   "memory_budget='64GB').decoder.plan.per_expert)" % str(b)],
                                  capture_output=True, text=True, check=True).stdout.split()[-1])
    assert abs(measured / (SLOT_MARGIN * packed_factor(m) * blob) - 1) < 0.1


def test_memory_budget_sizes_the_cache_and_names_the_minimum(tiny_bundle):
    import re
    b = tiny_bundle("mixtral", "int4")
    with pytest.raises(edge.BudgetError, match=r"needs at least \d+ MB \(dense part .* per resident expert\)") as err:
        edge.load(b, threads=1, context_length=64, memory_budget="10MB")
    minimum = int(re.search(r"needs at least (\d+) MB", str(err.value)).group(1))
    roomy = edge.load(b, threads=1, context_length=64, memory_budget="64GB")
    assert roomy.decoder.plan.capacity >= len(roomy.manifest.moe.experts)
    assert type(roomy.decoder).__name__ == "Decoder"          # every expert fits: the fused graph runs
    tight = edge.load(b, threads=1, context_length=64, memory_budget=f"{minimum + 16}MB")   # the process grew meanwhile
    assert tight.decoder.plan.budget == (minimum + 16) << 20
    ids = [5, 17, 99, 3, 250]
    assert tight.generate_ids(ids, max_new_tokens=12) == roomy.generate_ids(ids, max_new_tokens=12)


def test_fused_graph_needs_no_cache_margin(tiny_bundle):
    """The fused graph holds every expert once and never evicts: it needs the dense part, the KV cache,
    every expert at its measured cost and the larger of the headroom and the load's packing peak, not
    the cache's 10% fragmentation margin, so a budget a little short of caching every expert runs it."""
    from edge.moe import CACHE_MARGIN, HEADROOM, MoEDecoder
    b = tiny_bundle("mixtral", "int4")
    d = edge.load(b, threads=1, context_length=64, expert_capacity=2).decoder
    assert isinstance(d, MoEDecoder)
    n, MB = len(d.moe.experts), 2 ** 20
    base, measured = 200 * MB, (8 * MB, 2 * MB)                 # dense part; KV cache, one expert
    d._load_transient = 0
    need = 200 * MB + 8 * MB + HEADROOM + n * 2 * MB
    plan = d._plan(need, base, measured, margin=CACHE_MARGIN, apart=2, lower=MB)
    assert plan.fused_need == need and plan.capacity < n        # the cache would not hold them all
    d._load_transient = HEADROOM + 30 * MB                      # a packing peak above the headroom counts
    assert d._plan(need, base, measured, margin=CACHE_MARGIN, apart=2, lower=MB).fused_need == need + 30 * MB


def test_memory_budget_is_refused_for_dense_models(tiny_bundle):
    with pytest.raises(edge.ConfigError, match="Mixture-of-Experts"):
        edge.load(tiny_bundle("llama"), memory_budget="1GB")


@pytest.mark.parametrize("text", ["300MB", "0.5 GB", "512mib", "2g"])
def test_budget_sizes_parse(text):
    from edge.moe import parse_bytes
    assert parse_bytes(text) in (300 << 20, 512 << 20, 2 << 30)


def test_lfu_beats_lru_on_skewed_cyclic_routing(tiny_bundle, monkeypatch):
    """Layers are visited in a cycle, so below the working set LRU evicts what comes next; LFU keeps
    each layer's frequent experts. Sessions are not built here: only the policy is exercised."""
    from edge.bundle import open_bundle
    from edge.experts import ExpertCache
    b = open_bundle(tiny_bundle("mixtral", "int4"))
    rng = np.random.default_rng(0)
    probs = np.array([0.55, 0.3, 0.1, 0.05])                       # skewed, as trained routers are
    trace = [(layer, int(e)) for _ in range(300) for layer in range(2) for e in rng.choice(4, 2, replace=False, p=probs)]
    rates = {}
    for policy in ("lru", "lfu"):
        c = ExpertCache(b, capacity=2, policy=policy)
        monkeypatch.setattr(c, "_read", lambda key: None)
        monkeypatch.setattr(c, "_build", lambda blob: object.__new__(type("Item", (), {"bound": {}})))
        for layer, e in trace:
            c._get(layer, e)
        rates[policy] = c.stats.hit_rate
        assert len(c.cache) <= 2
    assert rates["lfu"] > rates["lru"] + 0.10, rates


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_expert_read_buffer_is_free_once_the_session_exists(tiny_bundle, monkeypatch, quant):
    """Where the cache finds that the kernel reads only its packed copies (x86-64), it reuses one read
    buffer and drops the widened fp32 scales once a session exists: onnxruntime must then not read any
    tensor it was handed after prepacking."""
    import onnxruntime as ort

    from edge.bundle import open_bundle
    from edge.engine import default_threads, use_global_pool
    from edge.experts import ExpertCache
    use_global_pool(default_threads())
    handed = []                               # every array made into an initializer (kept alive here)
    real = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(lambda a, *r: handed.append(a) or real(a, *r)))
    b = open_bundle(tiny_bundle("mixtral", quant))
    c = ExpertCache(b, capacity=4, policy="lru")
    assert not c.keep_tensors
    handed.clear()                                               # the probe's own session
    x = np.random.default_rng(0).standard_normal((3, b.manifest.model.hidden_size)).astype(np.float32)
    s = c.get(0, 1)
    want = s.run(None, {b.manifest.moe.expert_input: x})[0]
    assert len(handed) == len(b.manifest.moe.expert_tensors)
    c.reader.buf[:] = 0x5A                                       # scribble over the blob it was built from
    for a in handed:
        a[...] = 3 if a.dtype == np.uint8 else np.nan            # and over the widened scales
    assert np.array_equal(s.run(None, {b.manifest.moe.expert_input: x})[0], want)
    c.get(0, 2)                                                  # the next miss overwrites it for real
    assert np.array_equal(s.run(None, {b.manifest.moe.expert_input: x})[0], want)


def test_short_expert_read_names_file_and_offset(tiny_bundle, tmp_path):
    """A bundle truncated after load (or a failing disk) is a clear error, not SIGBUS."""
    import shutil
    src = tiny_bundle("mixtral", "int4")
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    m = edge.load(dst, threads=1, context_length=32, expert_capacity=2, expert_slots=False)
    experts = dst / m.manifest.moe.expert_file
    last = max(m.manifest.moe.experts, key=lambda e: e.offset)
    os.truncate(experts, last.offset + 10)
    m.decoder.experts.reader.file_size = last.offset + last.size         # as checked when it was opened
    with pytest.raises(BundleError, match=rf"offset {last.offset}.*{experts.name}"):
        for layer in range(m.manifest.model.num_layers):
            for e in range(m.manifest.moe.num_experts):
                m.decoder.experts.get(layer, e)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_fused_expert_tensors_export_as_per_expert_ones(tiny_checkpoint, tiny_bundle, tmp_path, arch):
    """A checkpoint may hold each layer's experts fused, as transformers holds them in memory
    (mlp.experts.gate_up_proj [E, 2F, H], gate rows first; mlp.experts.down_proj [E, H, F]; Mixtral's
    router as mlp.gate): the export equals the per-expert checkpoint's, to the bit."""
    import shutil

    from safetensors.numpy import load_file, save_file
    src = tiny_checkpoint(arch)
    dst = tmp_path / "fused-src"
    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    per = {"mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2"),
           "qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")}
    per = per.get(arch, per["qwen3_moe"])
    cfg = json.loads((src / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    for i in range(cfg.get("first_k_dense_replace", 0), cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        take = lambda role, e: w.pop(p + per[role].format(e=e) + ".weight")
        gate, up, down = ([take(r, e) for e in range(experts)] for r in range(3))
        w[p + "mlp.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])   # [E, 2F, H]
        w[p + "mlp.experts.down_proj"] = np.stack(down)                                                     # [E, H, F]
        if arch == "mixtral":
            w[p + "mlp.gate.weight"] = w.pop(p + "block_sparse_moe.gate.weight")
    (dst / "model.safetensors").unlink()
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    from export import ExportOptions, export_model
    out = export_model(str(dst), tmp_path / "b", ExportOptions(quant="fp32"), progress=False).out
    ids = [5, 17, 99, 3, 250, 7]
    assert np.array_equal(edge.load(out, threads=1).logits(ids), edge.load(tiny_bundle(arch), threads=1).logits(ids))
