#!/usr/bin/env python3
"""Perplexity of edge bundles on the held-out text (non-overlapping windows), side by side.

    python tests/bench/perplexity.py BUNDLE [BUNDLE ...] [--window 512] [--tokens 20000]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=20000, help="evaluate the first N tokens of the text")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import edge
    from edge.evaluate import evaluate
    from heldout import fingerprint, heldout_text
    text = heldout_text()
    rows = []
    for b in a.bundles:
        m = edge.load(b, threads=a.threads, context_length=a.window)
        ids = m.text.encode(text)[:a.tokens]
        nll, n, _, _ = evaluate(m, ids, context=a.window, stride=a.window)   # disjoint windows
        size = sum(f.size for f in m.manifest.files) / 2**20
        rows.append((b, m.manifest.quant, size, math.exp(nll / n), n))
    base = rows[0][3]
    print(f"held-out text sha256 {fingerprint(text)}, {rows[0][4]} tokens scored, windows of {a.window}\n")
    print(f"{'bundle':<40} {'quant':<6} {'MB':>7} {'perplexity':>10} {'vs first':>9}")
    for b, q, size, ppl, _ in rows:
        print(f"{b:<40} {q:<6} {size:>7.1f} {ppl:>10.3f} {100 * (ppl / base - 1):>+8.2f}%")


if __name__ == "__main__":
    main()
