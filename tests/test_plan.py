"""`edge plan` and `--device` / `--emulate`: what fits on a board, and runs inside its limits."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.bundle import open_bundle
from edge.devices import get
from edge.errors import BudgetError
from edge.plan import plan


def edge_cli(*args):
    return subprocess.run([sys.executable, "-m", "edge", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_plan_sizes_the_expert_cache_to_the_device(tiny_bundle, monkeypatch):
    import math
    import edge.plan
    monkeypatch.setattr(edge.plan, "SLOT_MARGIN", 2000.0)            # tiny experts made MB-sized
    m = open_bundle(tiny_bundle("mixtral", "int4")).manifest
    big = plan(m, get("raspberry-pi-5:8gb"), context=64)
    assert big.experts_cached == big.experts_total and big.budget_mb == big.need_all_mb
    d = get("raspberry-pi-4:1gb")
    fixed = big.dense_mb + big.kv_cache_mb + big.headroom_mb
    small = plan(m, dataclasses.replace(d, ram_mb=d.headroom_mb + math.ceil(fixed + 3.5 * big.per_expert_mb)), context=64)
    assert small.experts_cached == 3 and small.budget_mb <= small.usable_mb
    assert small.decode_tok_s[0] <= small.decode_tok_s[1]
    with pytest.raises(BudgetError, match=r"does not fit .* at least \d+ MB"):
        plan(m, dataclasses.replace(d, ram_mb=d.headroom_mb + 10), context=64)


def test_a_memory_budget_lowers_the_plan(tiny_bundle, monkeypatch):
    import edge.plan
    monkeypatch.setattr(edge.plan, "SLOT_MARGIN", 2000.0)            # tiny experts made MB-sized
    m = open_bundle(tiny_bundle("mixtral", "int4")).manifest
    d = get("raspberry-pi-5:8gb")
    full = plan(m, d, context=64)
    fixed = full.dense_mb + full.kv_cache_mb + full.headroom_mb
    half = plan(m, d, context=64, memory_budget=int((fixed + 4.5 * full.per_expert_mb) * 2 ** 20))
    assert half.experts_cached == 4 and half.budget_mb <= half.usable_mb < full.usable_mb
    assert half.decode_tok_s[1] < full.decode_tok_s[0]                # misses read from storage, staged compute
    with pytest.raises(BudgetError, match="the memory budget is"):
        plan(m, d, context=64, memory_budget=int(fixed * 2 ** 20))
    r = edge_cli("plan", tiny_bundle("mixtral", "int4"), "--device", "raspberry-pi-5:8gb", "--memory-budget", "1MB")
    assert r.returncode == 1 and "the memory budget is 1 MB" in r.stderr, r.stderr


def test_plan_cli_and_devices_list(tiny_bundle):
    r = edge_cli("devices", "list")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) >= 7, r.stderr      # header + >= 6 profiles
    r = edge_cli("plan", tiny_bundle("mixtral", "int4"), "--device", "raspberry-pi-4:1gb", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["device"] == "raspberry-pi-4:1gb:sd" and p["threads"] == 4 and p["budget_mb"] <= 512
    r = edge_cli("run", tiny_bundle("llama", "int4"), "hi", "-n", "3", "--device", "raspberry-pi-4:1gb")
    assert r.returncode == 0 and "[device raspberry-pi-4:1gb:sd" in r.stderr, r.stderr


needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or not all(Path(f"/sys/fs/cgroup/{c}").is_dir() for c in ("memory", "blkio", "cpuset")),
    reason="emulation needs root and cgroup v1 memory, blkio and cpuset controllers")


@needs_cgroups
def test_emulated_limits_are_real(tmp_path):
    """A process that allocates past the device's memory is killed and the kill is reported."""
    from edge.emulate import Emulation
    d = dataclasses.replace(get("raspberry-pi-4:1gb"), ram_mb=512 + 64)         # 64 MB usable
    with Emulation(d, tmp_path) as em:
        ok = em.run([sys.executable, "-c", "b = bytearray(16 << 20); b[::4096] = b'x' * len(b[::4096])"])
        assert ok.returncode == 0 and em.facts()["oom_kills"] == 0
        bad = em.run([sys.executable, "-c", "b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])"])
        facts = em.facts()
    assert bad.returncode != 0 and facts["oom_kills"] >= 1 and facts["memory_limit_mb"] == 64


@needs_cgroups
def test_run_emulated_moe_matches_the_unlimited_run(tiny_bundle):
    b = tiny_bundle("mixtral", "int4")
    want = edge_cli("run", b, "hello there", "-n", "6", "--temperature", "0")
    r = edge_cli("run", b, "hello there", "-n", "6", "--temperature", "0", "--emulate", "raspberry-pi-4:1gb")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout and "0 OOM kills" in r.stderr and "CPU speed is not emulated" in r.stderr


def test_export_for_a_device_keeps_the_exporter_block_sizes(tiny_checkpoint, workdir):
    """--device picks the quantization; block sizes stay the exporter's defaults for it (an explicit
    --quant int4 once took the block size the device had chosen for int8, 16)."""
    src = tiny_checkpoint("qwen3_moe")
    r = edge_cli("export", src, "-o", workdir / "dev-auto", "--device", "raspberry-pi-4:1gb")
    assert r.returncode == 0, r.stderr
    assert "fit in half" in r.stderr
    auto = {t.name: (t.dtype, t.block_size) for t in open_bundle(workdir / "dev-auto").manifest.tensors}
    assert auto["layers.0.qkv"] == auto["layers.0.experts.0.gate_up"] == ("int8", 16)
    r = edge_cli("export", src, "-o", workdir / "dev-int4", "--device", "raspberry-pi-4:1gb", "--quant", "int4")
    assert r.returncode == 0, r.stderr
    forced = {t.name: (t.dtype, t.block_size) for t in open_bundle(workdir / "dev-int4").manifest.tensors}
    assert forced["layers.0.o"] == ("int8", 32) and forced["layers.0.experts.0.gate_up"] == ("int4", 64)


def test_expert_packing_estimate_follows_the_quantization(tiny_bundle):
    """onnxruntime keeps each block of codes with an fp32 scale and an fp32 block sum; the blob has the
    codes and an fp16 scale: int4 at block 32 is 1.33x the blob, at 64 1.18x, fp32 experts 1x."""
    from edge.experts import packed_factor
    assert packed_factor(open_bundle(tiny_bundle("mixtral", "int4")).manifest) == pytest.approx(0.75 / 0.5625)
    assert packed_factor(open_bundle(tiny_bundle("qwen3_moe", "int4")).manifest) == pytest.approx(0.625 / 0.53125)
    assert packed_factor(open_bundle(tiny_bundle("mixtral", "fp32")).manifest) == 1.0
