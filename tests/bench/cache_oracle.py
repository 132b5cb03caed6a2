#!/usr/bin/env python3
"""How good can an expert cache be? Records the decode routing of a MoE bundle (every expert
resident), then replays that (layer, expert) stream through the runtime's own caches (reads and
sessions replaced by stubs, so only the policy runs): the session path's ExpertCache (lru, and lfu
with its admission rule: a miss used less than every resident expert runs once and is dropped) and
the slot path's SlotCache (lfu: a miss takes the least used slot), and through Belady's offline
optimum with bypass (evict the expert used furthest in the future, or do not admit the miss when
it is itself the furthest). The oracle's miss count is a floor no policy can beat.

    python tests/bench/cache_oracle.py BUNDLE [--tokens 512] [--fractions 0.5 0.25]
"""
from __future__ import annotations

import argparse

import numpy as np


def record(path: str, tokens: int) -> list[tuple[int, int]]:
    import edge
    from edge.bench import prompt_ids
    m = edge.load(path, threads=2, context_length=128 + tokens + 1, expert_capacity=1 << 30)
    cache, trace = m.decoder.experts, []
    get = cache._get
    cache._get = lambda layer, e: (trace.append((layer, e)), get(layer, e))[1]
    d = m.decoder
    d.reset()
    tok = int(np.argmax(d.forward(prompt_ids(m, 128))[-1]))
    trace.clear()                                       # decode steps only
    for _ in range(tokens):
        tok = int(np.argmax(d.forward([tok])))
    return trace


def replay(path: str, trace, capacity: int, policy: str) -> float:
    from edge.bundle import open_bundle
    from edge.experts import ExpertCache
    c = ExpertCache(open_bundle(path), capacity=capacity, policy=policy)
    c._load = lambda key: object()                      # the policy only: no reads, no sessions
    for layer, e in trace:
        c._get(layer, e)
    c.close()
    return c.stats.hit_rate


def replay_slots(path: str, trace, capacity: int, policy: str) -> float:
    from types import SimpleNamespace

    from edge.bundle import open_bundle
    from edge.experts import SlotCache
    pool = SimpleNamespace(slots=[None] * capacity, store=SimpleNamespace(header=SimpleNamespace(record_size=0)),
                           load=lambda slot, index: 0, close=lambda: None)       # the policy only: no reads
    c = SlotCache(pool, open_bundle(path).manifest.moe, policy=policy)
    for layer, e in trace:
        c._release(c._acquire((layer, e)))
    return c.stats.hit_rate


def belady(trace, capacity: int) -> float:
    nxt, last = [0] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], 1 << 62)
        last[trace[i]] = i
    cache, hits = {}, 0
    for i, key in enumerate(trace):
        if key in cache:
            hits += 1
        elif len(cache) >= capacity:
            far = max(cache, key=cache.get)
            if cache[far] <= nxt[i]:
                continue                                 # the miss itself is needed last: bypass
            del cache[far]
        cache[key] = nxt[i]
    return hits / len(trace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    a = ap.parse_args()
    trace = record(a.bundle, a.tokens)
    n = 1 + max(l for l, _ in trace)
    experts = n * (1 + max(e for _, e in trace))
    print(f"{len(trace)} expert uses over {a.tokens} decode steps ({len(trace) // a.tokens} per token)\n")
    print(f"{'experts held':>12} {'lru':>7} {'lfu':>7} {'lfu slots':>9} {'belady':>7} {'oracle misses/token':>20}")
    for f in a.fractions:
        cap = int(f * experts)
        b = belady(trace, cap)
        print(f"{f:>11.0%}  {replay(a.bundle, trace, cap, 'lru'):>7.1%} {replay(a.bundle, trace, cap, 'lfu'):>7.1%} "
              f"{replay_slots(a.bundle, trace, cap, 'lfu'):>9.1%} {b:>7.1%} {(1 - b) * len(trace) / a.tokens:>20.1f}")


if __name__ == "__main__":
    main()
