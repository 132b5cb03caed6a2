"""`edge eval`: sliding windows score every token once; perplexity equals a direct computation."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import edge
from edge.errors import ConfigError
from edge.evaluate import bits_per_weight, evaluate, windows


@pytest.mark.parametrize("n,context,stride", [(1000, 128, 128), (1000, 128, 32), (130, 128, 64), (50, 128, 128)])
def test_windows_score_each_token_once(n, context, stride):
    scored = [p for _, end, first in windows(n, context, stride) for p in range(first, end)]
    assert len(scored) == len(set(scored)) and set(scored) <= set(range(1, n))
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first < end
    if stride < context:                                     # overlapping windows leave no token out
        assert set(scored) == set(range(1, n))
    with pytest.raises(ConfigError):
        windows(n, context, context + 1)


def test_perplexity_matches_a_direct_computation(tiny_bundle):
    m = edge.load(tiny_bundle("llama"), threads=1, context_length=64)
    ids = list(np.random.default_rng(0).integers(3, 200, 150))
    nll, n, _, _ = evaluate(m, ids, context=64, stride=32)
    want, count = 0.0, 0
    for begin, end, first in windows(len(ids), 64, 32):
        lg = m.logits(ids[begin:end]).astype(np.float64)
        for p in range(first, end):
            row = lg[p - 1 - begin]
            want += np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[p]]
            count += 1
    assert n == count and nll == pytest.approx(want, rel=1e-9)
    assert bits_per_weight(m.manifest) == 32.0


def test_eval_cli_compares_bundles(tiny_bundle, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The robot picked up the red box and put it on the shelf. " * 30)
    ref, q = tiny_bundle("llama"), tiny_bundle("llama", "int8")
    r = subprocess.run([sys.executable, "-m", "edge", "eval", str(ref), "--text", str(text), "--context", "64",
                        "--compare", str(q), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(r.stdout)
    assert a["tokens_scored"] == b["tokens_scored"] > 100 and a["delta_pct"] is None
    assert b["delta_pct"] == pytest.approx(100 * (b["perplexity"] / a["perplexity"] - 1))
    assert 0.5 < b["top1_agreement"] <= 1 and 8 < b["bits_per_weight"] < 10 and math.isfinite(b["perplexity"])
    ids = np.asarray(edge.load(ref, threads=1).text.encode(text.read_text()), "<u2")
    ids.tofile(tmp_path / "t.u16")
    r2 = subprocess.run([sys.executable, "-m", "edge", "eval", str(ref), "--tokens", str(tmp_path / "t.u16"),
                         "--context", "64", "--json"], capture_output=True, text=True, timeout=300)
    assert json.loads(r2.stdout)[0]["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)


def test_moe_eval_under_a_small_cache_equals_all_resident(tiny_bundle):
    """The same perplexity, to the bit, with 2 of 8 experts resident as with all of them in the fused
    graph; windows longer than a prompt piece (64 tokens), so both run several pieces per window."""
    b = tiny_bundle("mixtral", "int4")
    ids = list(np.random.default_rng(1).integers(3, 200, 300))
    full = edge.load(b, threads=1, context_length=128)
    assert type(full.decoder).__name__ == "Decoder"                        # the fused graph
    a, n, _, _ = evaluate(full, ids, context=128, stride=128)
    for prefetch in (False, True):                                         # experts built ahead or on demand
        small = edge.load(b, threads=2, context_length=128, expert_capacity=2, prefetch=prefetch)
        assert (small.decoder.experts.prefetcher is not None) == prefetch
        c, m, _, _ = evaluate(small, ids, context=128, stride=128)
        assert n == m and small.decoder.experts.stats.evictions > 0
        assert c == a
