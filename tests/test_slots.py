"""Expert slots and the packed expert store: made once per machine and onnxruntime, a miss is one read
into a slot, outputs equal the unlimited run's to the bit, every failure of the mechanism falls back
to building a session per miss (and says so once), and a budget is the model's own memory."""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edge
from edge.bundle import open_bundle
from edge.errors import BundleError, StoreError


@pytest.fixture()
def bundle(tiny_bundle, tmp_path):
    """A private copy of the tiny int4 Mixtral bundle, without the packed store other tests made in it."""
    return shutil.copytree(tiny_bundle("mixtral", "int4"), tmp_path / "b", ignore=shutil.ignore_patterns("packed"))


IDS = [5, 17, 99, 3, 250, 7, 8, 9]


def test_prepare_makes_the_store_once_and_again_for_another_onnxruntime(bundle):
    first = edge.prepare(bundle, progress=False)
    assert first.built and first.reason == "there is none yet" and first.store.root == bundle / "packed"
    h = first.store.header
    assert h.experts == len(open_bundle(bundle).manifest.moe.experts) and h.record_size % 4096 == 0
    assert (bundle / "packed" / "records.bin").stat().st_size == h.experts * h.record_size
    again = edge.prepare(bundle, progress=False)
    assert not again.built and again.store.header == h                     # a no-op
    header = json.loads((bundle / "packed" / "store.json").read_text())
    header["onnxruntime"] = "1.0.0"
    (bundle / "packed" / "store.json").write_text(json.dumps(header))
    rebuilt = edge.prepare(bundle, progress=False)
    assert rebuilt.built and "onnxruntime" in rebuilt.reason and rebuilt.store.header == h
    (bundle / "packed" / "store.json").write_text("{not json")
    assert edge.prepare(bundle, progress=False).reason.startswith("its header is unreadable")
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []    # no temporary folders left


def test_read_only_bundle_keeps_its_store_in_the_user_cache(bundle, tmp_path, monkeypatch):
    from edge.store import default_location
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(bundle) else real(p, mode))
    where = default_location(open_bundle(bundle))
    assert where.parent == tmp_path / "cache" / "edge" / "packed"
    m = edge.load(bundle, threads=1, context_length=64, expert_capacity=3, progress=False)
    assert type(m.decoder.experts).__name__ == "SlotCache" and (where / "records.bin").is_file()
    assert not (bundle / "packed").exists()


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(bundle, monkeypatch):
    import errno

    import edge.store
    real, calls = edge.store._save_packed, []

    def save(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(edge.store, "_save_packed", save)
    with pytest.raises(StoreError, match="full.*free some space or point expert_store"):
        edge.prepare(bundle, progress=False)
    assert not (bundle / "packed").exists() and not [p for p in bundle.iterdir() if p.name.startswith(".")]
    calls.clear()
    with pytest.raises(StoreError, match="full"):                # a budgeted load says the same, no fallback
        edge.load(bundle, threads=1, context_length=64, expert_capacity=3, progress=False)


def test_slots_equal_sessions_and_the_fused_graph(bundle):
    """Prompt logits and greedy tokens with 3 of 8 experts in slots, with 3 in sessions, and all in the
    fused graph: the same to the bit."""
    fused = edge.load(bundle, threads=2, context_length=64)
    want_logits, want = fused.logits(IDS), fused.generate_ids(IDS, max_new_tokens=16)
    for slots in (True, False):
        m = edge.load(bundle, threads=2, context_length=64, expert_capacity=3, expert_slots=slots, progress=False)
        assert type(m.decoder.experts).__name__ == ("SlotCache" if slots else "ExpertCache")
        assert np.array_equal(m.logits(IDS), want_logits)
        assert m.generate_ids(IDS, max_new_tokens=16) == want
        assert m.decoder.experts.stats.evictions > 0


def test_a_damaged_record_fails_the_self_test_and_the_runtime_falls_back(bundle, caplog):
    """The self-test swaps two experts into a slot and compares them with sessions built from the
    bundle: a wrong record (here: the first expert's holds the second's bytes) is caught, logged in one
    line, and the model runs on the session path with the same outputs."""
    store = edge.prepare(bundle, progress=False).store
    with open(store.records, "r+b") as f:
        f.seek(store.record_offset(1))
        second = f.read(store.header.record_size)
        f.seek(store.record_offset(0))
        f.write(second)
    want = edge.load(bundle, threads=1, context_length=64).generate_ids(IDS, max_new_tokens=12)
    with caplog.at_level(logging.WARNING, logger="edge"):
        m = edge.load(bundle, threads=1, context_length=64, expert_capacity=3, progress=False)
    assert [r.message for r in caplog.records if "expert slots cannot work here" in r.message] != []
    assert len([r for r in caplog.records if r.name == "edge"]) == 1
    assert type(m.decoder.experts).__name__ == "ExpertCache"
    assert m.generate_ids(IDS, max_new_tokens=12) == want


def test_weights_onnxruntime_copies_instead_of_mapping_mean_the_session_path(bundle, monkeypatch, caplog):
    """Where onnxruntime does not map the saved packed weights (another version, a blob that does not
    match its kernel), slots cannot work: the check notices and the runtime falls back."""
    import edge.slots
    edge.prepare(bundle, progress=False)
    monkeypatch.setattr(edge.slots, "new_session_mappings", lambda path, make: (make(), []))
    with caplog.at_level(logging.WARNING, logger="edge"):
        m = edge.load(bundle, threads=1, context_length=64, expert_capacity=3, progress=False)
    assert "did not map" in caplog.text and type(m.decoder.experts).__name__ == "ExpertCache"


def test_a_store_truncated_while_in_use_names_the_file_and_offset(bundle):
    m = edge.load(bundle, threads=1, context_length=64, expert_capacity=2, prefetch=False, progress=False)
    store = m.decoder.experts.pool.store
    os.truncate(store.records, store.record_offset(3))
    m.decoder.experts.pool.reader.file_size = store.record_offset(3)       # as checked when it was opened
    with pytest.raises(BundleError, match=r"records.bin"):
        for _ in range(4):
            m.generate_ids(IDS[::-1], max_new_tokens=8)
            m.generate_ids(IDS, max_new_tokens=8)


def test_slot_memory_is_shared_and_counted_once(bundle):
    """A slot's record pages are shared memory, mapped once (where onnxruntime reads them): RssShmem
    grows by what the slots hold, not twice."""
    from edge.memory import status
    m = edge.load(bundle, threads=1, context_length=64, expert_capacity=4, prefetch=False, progress=False)
    c = m.decoder.experts
    before = status()["RssShmem"]
    m.generate_ids(IDS, max_new_tokens=8)
    grown = status()["RssShmem"] - before
    assert 0 < grown <= c.capacity * c.record_size


def test_process_budget_is_the_total_less_what_the_process_holds():
    from edge.memory import status
    held = status()["VmRSS"]
    assert abs(edge.process_budget(held + (300 << 20)) - (300 << 20)) < (8 << 20)
    with pytest.raises(edge.BudgetError, match="too small: this process holds"):
        edge.process_budget("1MB")


_HOLD_AND_LOAD = """
import json, sys, numpy as np
held = np.ones(int(sys.argv[2]) << 20, np.uint8)              # unrelated memory the process holds, touched
import edge
from edge.memory import status
base = status()["VmRSS"]
if sys.argv[3] == "minimum":
    try:
        edge.load(sys.argv[1], threads=1, context_length=64, memory_budget="1MB", progress=False)
    except edge.BudgetError as e:
        print(json.dumps(dict(minimum=int(str(e).split("at least ")[1].split(" MB")[0]) << 20)))
    sys.exit()
m = edge.load(sys.argv[1], threads=1, context_length=64, memory_budget=int(sys.argv[3]), progress=False)
m.generate_ids([5, 17, 99, 3, 250, 7], max_new_tokens=16)
p = m.decoder.plan
print(json.dumps(dict(dense=p.base, per_expert=p.per_expert, base=base, rss=status()["VmRSS"])))
"""


def test_a_budget_is_the_models_own_memory(bundle):
    """A process holding 300 MB of other arrays sees the same dense part and per-expert cost as a fresh
    one, so the same budget buys the same expert cache, and it stays within that budget above what it
    held. (The tiny model's experts are ~0.1 MB: the cache's size itself swings with a MB of noise.)"""
    edge.prepare(bundle, progress=False)
    run = lambda held, budget: json.loads(subprocess.run(
        [sys.executable, "-c", _HOLD_AND_LOAD, str(bundle), str(held), str(budget)],
        capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    budget = run(0, "minimum")["minimum"] + (8 << 20)              # a fresh process's least budget, and some
    runs = [run(held, budget) for held in (0, 300)]
    fresh, holding = runs
    assert holding["base"] > fresh["base"] + (290 << 20)
    assert abs(holding["dense"] - fresh["dense"]) < (4 << 20), runs
    # a slot's measured cost is 30-55 KB here and moves by ~25 KB between two fresh runs (heap pages
    # the first runs touch); what this guards against is the held arrays counted as experts (MBs)
    assert abs(holding["per_expert"] - fresh["per_expert"]) <= max(0.2 * fresh["per_expert"], 48 << 10), runs
    for r in runs:
        assert r["rss"] <= r["base"] + budget, r


def test_cli_prepare_reports_and_is_a_no_op_the_second_time(bundle):
    run = lambda: subprocess.run([sys.executable, "-m", "edge", "prepare", str(bundle), "--json"],
                                 capture_output=True, text=True, check=True)
    first, second = json.loads(run().stdout), json.loads(run().stdout)
    assert first["built"] and not second["built"] and first["store"] == str(bundle / "packed")
    assert second["experts"] == len(open_bundle(bundle).manifest.moe.experts) and second["disk_mb"] > 0
    r = subprocess.run([sys.executable, "-m", "edge", "prepare", str(bundle).replace("/b", "/nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "does not exist" in r.stderr


def test_a_session_keeps_the_tensors_its_kernel_reads(tmp_path):
    """An expert session must own every tensor its kernel reads at run time (the blob it came from is
    the reader's buffer, overwritten by the next read). Where prepacking copies them all (a MatMul's
    weight), the copies can go; where the kernel reads a tensor itself (an Add's operand here; a
    Cortex-A72's int4 kernel reads its scales) they must stay."""
    import onnx
    from onnx import TensorProto, helper
    from types import SimpleNamespace
    from edge.engine import use_global_pool
    from edge.experts import build_session, kernel_reads_tensors
    from edge.manifest import ExpertTensor
    use_global_pool(1)
    H = 16
    w = np.arange(H * H, dtype=np.float32).reshape(H, H) / (H * H)
    for op, shape in (("MatMul", (H, H)), ("Add", (1, H))):
        g = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "e",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor("w", TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel())])
        path = tmp_path / f"{op}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        moe = SimpleNamespace(expert_tensors=(ExpertTensor("w", "float32", shape, 0),), expert_input="x", expert_output="y")
        blob = np.frombuffer(w[:shape[0]].tobytes(), np.uint8).copy()
        reads = kernel_reads_tensors(moe, str(path), blob, H)
        assert reads == (op == "Add")
        item = build_session(moe, str(path), blob, keep_tensors=reads)
        x = np.ones((2, H), np.float32)
        want = item.session.run(["y"], {"x": x})[0]
        blob[:] = 0xFF                                        # the next read overwrites the buffer
        assert np.array_equal(item.session.run(["y"], {"x": x})[0], want)
