"""Soak: decode many tokens from one loaded model and show that memory and file descriptors stay
flat after warm-up (no leak per generation, per token or per expert-cache miss).

    python tests/bench/soak.py BUNDLE --memory-budget 460MB --tokens 20000 [--json]

Generations of --gen tokens each (sampled, a different seed and prompt each time, so routing keeps
changing and the expert cache keeps evicting) run back to back until --tokens are decoded. After
each one it records RSS, open file descriptors and threads. Warm-up is the first --warmup tokens;
the verdict compares the largest RSS after warm-up with the RSS at its end (bar: < 2% growth, no
fd growth). Not part of CI: 20k tokens under a tight budget take tens of minutes here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import edge                                        # noqa: E402
from edge.memory import status                     # noqa: E402
from heldout import heldout_text                   # noqa: E402


def _sample(model, tokens: int, t0: float) -> dict:
    s = status()
    experts = getattr(model.decoder, "experts", None)
    return dict(tokens=tokens, seconds=round(time.perf_counter() - t0, 1), rss_mb=round(s.get("VmRSS", 0) / 2**20, 1),
                peak_mb=round(s.get("VmHWM", 0) / 2**20, 1), fds=len(os.listdir("/proc/self/fd")),
                threads=threading.active_count(), os_threads=len(os.listdir("/proc/self/task")),
                hit_rate=round(experts.stats.hit_rate, 3) if experts else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--gen", type=int, default=400, help="tokens per generation")
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    model = edge.load(a.bundle, threads=a.threads, context_length=1024, memory_budget=a.memory_budget)
    words = heldout_text().split()
    t0 = time.perf_counter()
    samples, done, i = [_sample(model, 0, t0)], 0, 0
    while done < a.tokens:
        start = (i * 97) % (len(words) - 64)
        prompt = " ".join(words[start:start + 48])          # a different 48-word prompt each time
        n = min(a.gen, a.tokens - done)
        ids = model.generate_ids(model.encode(prompt), max_new_tokens=n, temperature=0.8, top_p=0.95, seed=i)
        done += len(ids)
        i += 1
        samples.append(_sample(model, done, t0))
        if not a.json:
            s = samples[-1]
            print(f"{s['tokens']:>7} tokens {s['seconds']:>7.0f} s  RSS {s['rss_mb']:>7.1f} MB  peak {s['peak_mb']:>7.1f}"
                  f"  fds {s['fds']:>3}  threads {s['os_threads']:>3}  hit {s['hit_rate']}", flush=True)
    warm = next(s for s in samples if s["tokens"] >= min(a.warmup, done))
    after = [s for s in samples if s["tokens"] >= warm["tokens"]]
    growth = (max(s["rss_mb"] for s in after) - warm["rss_mb"]) / warm["rss_mb"]
    verdict = dict(bundle=a.bundle, memory_budget=a.memory_budget, tokens=done, generations=i,
                   warm_rss_mb=warm["rss_mb"], max_rss_after_warmup_mb=max(s["rss_mb"] for s in after),
                   final_rss_mb=samples[-1]["rss_mb"], rss_growth_pct=round(100 * growth, 2),
                   peak_rss_mb=samples[-1]["peak_mb"], fds_warm=warm["fds"], fds_final=samples[-1]["fds"],
                   os_threads_warm=warm["os_threads"], os_threads_final=samples[-1]["os_threads"],
                   seconds=samples[-1]["seconds"], ok=growth < 0.02 and samples[-1]["fds"] <= warm["fds"])
    print(json.dumps(dict(verdict, samples=samples) if a.json else verdict, indent=None if a.json else 1))
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
