#!/usr/bin/env python3
"""Run edge (and llama.cpp) inside Linux memory cgroups whose limit is the memory budget.

For each budget (the process's footprint before loading + the dense part + a fraction of the experts
+ the runtime's fixed costs), the engine runs in a fresh process placed in a cgroup v1 memory group
with memory.limit_in_bytes = budget (swap off); edge is given the whole-process view (the cgroup
limit minus what its process holds before load). Reports decode and prompt tok/s, peak RSS, the
cgroup's own peak (memory.max_usage_in_bytes: page cache and shared memory included), how the run
ended (ok, OOM-killed, or still thrashing at the 900 s timeout), and for edge the expert hit rate,
the decode's time per token split into reading (the decode reading a miss itself), waiting (for a
read in flight in the background) and computing (the rest), MB read per token, the floor those
reads put on a token (misses x record size / this disk's O_DIRECT read speed, measured here first)
and greedy agreement with the first run. `--sessions` runs the session path (a session built per
miss, expert_slots=False) at every budget below all experts too, in the same run. Needs root and the
cgroup v1 memory controller at /sys/fs/cgroup/memory.

    python tests/bench/moe_budget.py --edge BUNDLE [--llama Q4_0.gguf --peer-python PY]
        [--fractions 1.0 0.5 0.25] [--sessions] [--gen 128] [--policy lfu] [--prefetch auto|on|off]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CG = "/sys/fs/cgroup/memory"
HERE = os.path.abspath(__file__)


def worker_edge(path, ids, gen, budget, policy, prefetch, slots):
    import numpy as np
    import edge
    from edge.memory import status
    budget = int(budget) - status()["VmRSS"]                    # the cgroup bounds the whole process
    m = edge.load(path, threads=2, context_length=len(ids) + gen, memory_budget=budget, expert_policy=policy,
                  prefetch={"auto": None, "on": True, "off": False}[prefetch], expert_slots=slots == "slots",
                  progress=False)
    from edge.experts import CacheStats
    from edge.prefetch import PrefetchStats
    d = m.decoder
    c = getattr(d, "experts", None)       # None: the budget holds every expert, in the fused graph
    st = c.stats if c else CacheStats(hits=1)
    pf = c.prefetcher.stats if c and c.prefetcher else PrefetchStats()

    def generate(n):
        """(prompt seconds, decode seconds, greedy tokens, stats deltas over the decode)."""
        d.reset()
        t0 = time.perf_counter()
        tok = int(np.argmax(d.forward(ids)[-1]))
        t1 = time.perf_counter()
        before = (st.hits, st.misses, st.bytes_read, st.read_s, st.build_s, pf.bytes_read, pf.waited_s)
        tokens = [tok]
        for _ in range(n - 1):
            tok = int(np.argmax(d.forward([tok])))
            tokens.append(tok)
        t2 = time.perf_counter()
        after = (st.hits, st.misses, st.bytes_read, st.read_s, st.build_s, pf.bytes_read, pf.waited_s)
        d.reset()
        return t1 - t0, t2 - t1, tokens, [b - a for a, b in zip(before, after)]
    generate(8)                                                    # warm-up
    prompt_s, decode_s, tokens, (hits, misses, fg, read_s, build_s, bg, waited_s) = generate(gen)
    steps = gen - 1
    ms = lambda s: 1e3 * s / steps
    return dict(path="fused" if c is None else "slots" if type(c).__name__ == "SlotCache" else "sessions",
                prompt_tok_s=len(ids) / prompt_s, decode_tok_s=steps / decode_s, peak_rss_mb=status()["VmHWM"] / 2**20,
                hit_rate=hits / max(1, hits + misses), misses_per_token=misses / steps,
                mb_read_per_token=(fg + bg) / 2**20 / steps, ms_per_token=ms(decode_s),
                read_ms=ms(read_s), build_ms=ms(build_s), wait_ms=ms(waited_s),
                compute_ms=ms(decode_s - read_s - build_s - waited_s),
                record_mb=getattr(c, "record_size", 0) / 2**20,
                capacity=c.capacity if c else len(m.manifest.moe.experts), prefetch=bool(c and c.prefetcher),
                tokens=tokens)


def disk_speed(path) -> tuple[float, int]:
    """(MB/s, record bytes) reading 128 random records of the packed store one at a time with O_DIRECT."""
    import random
    from edge.bundle import open_bundle
    from edge.slots import PAGE
    from edge.storage import BlobReader
    from edge.store import default_location, open_store
    b = open_bundle(path)
    store, why = open_store(b, default_location(b))
    if store is None:
        raise SystemExit(f"no packed store for {path} ({why}): run `edge prepare {path}` first")
    size = store.header.record_size
    r = BlobReader(store.records, size)
    n = store.header.experts
    t0 = time.perf_counter()
    for i in random.Random(0).sample(range(n), min(128, n)):
        r.read(store.record_offset(i), size)
    return min(128, n) * size / 2**20 / (time.perf_counter() - t0), size


def worker_llama(path, ids, gen):
    sys.path.insert(0, os.path.dirname(HERE))
    from compare_dense import _rss_mb, worker_llama as llama_session
    _, once = llama_session(path, ids, gen, 2)
    once(8)
    ttft, dec = once(gen)
    return dict(prompt_tok_s=len(ids) / ttft, decode_tok_s=(gen - 1) / dec, peak_rss_mb=_rss_mb())


def in_cgroup(name: str, limit: int, argv: list[str], timeout: int) -> tuple[dict | None, dict]:
    """Run argv in a fresh memory cgroup limited to `limit` bytes; (worker result or None, cgroup facts)."""
    path = os.path.join(CG, name)
    if os.path.isdir(path):
        os.rmdir(path)
    os.mkdir(path)
    try:
        for f, v in (("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit), ("memory.swappiness", 0)):
            try:
                open(os.path.join(path, f), "w").write(str(v))
            except OSError:
                pass
        subprocess.run(["sync"])
        open("/proc/sys/vm/drop_caches", "w").write("3")     # every run starts with a cold page cache
        pre = f"echo $$ > {path}/cgroup.procs && exec \"$@\""
        try:
            p = subprocess.run(["sh", "-c", pre, "sh", *argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:        # thrashing, not killed: subprocess.run has killed it now
            p = None
        facts = {"max_usage_mb": int(open(os.path.join(path, "memory.max_usage_in_bytes")).read()) / 2**20,
                 "oom_kills": _oom_kills(path), "returncode": p.returncode if p else None, "timed_out": p is None}
        out = json.loads(p.stdout.strip().splitlines()[-1]) if p and p.returncode == 0 and p.stdout.strip() else None
        if out is None and p is not None:
            facts["stderr"] = p.stderr[-500:]
        return out, facts
    finally:
        time.sleep(0.2)
        os.rmdir(path)


def _oom_kills(path: str) -> int:
    try:
        for line in open(os.path.join(path, "memory.oom_control")):
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--edge")
    ap.add_argument("--llama")
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--policy", default="lfu")
    ap.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                    help="build experts ahead (auto: when the cache holds under half of them)")
    ap.add_argument("--sessions", action="store_true", help="also run the session path (a session built per miss) "
                    "at every budget below all experts")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        kind, path, ids = a.worker[0], a.worker[1], [int(x) for x in a.worker[2].split(",")]
        r = worker_edge(path, ids, a.gen, a.worker[3], a.policy, a.prefetch, a.worker[4]) if kind == "edge" \
            else worker_llama(path, ids, a.gen)
        print(json.dumps(r))
        return
    import edge
    from edge.bench import prompt_ids
    from edge.bundle import open_bundle
    m = edge.load(a.edge, threads=1, context_length=a.prompt_tokens + a.gen, expert_capacity=2, progress=False)
    ids = prompt_ids(m, a.prompt_tokens)
    del m
    n_experts = len(open_bundle(a.edge).manifest.moe.experts)
    mb_s, record = disk_speed(a.edge)
    print(f"disk: {mb_s:.0f} MB/s reading {record / 2**20:.2f} MB records with O_DIRECT, one at a time", file=sys.stderr)
    # the planner's own measurements in a fresh process, like the workers: what the process holds before
    # loading, the model's fixed costs and the resident cost of one expert; budget(f) holds a fraction f
    out = subprocess.run([sys.executable, "-c", "from edge.memory import status; base = status()['VmRSS']; "
                          "import edge, json; m = edge.load(%r, threads=2, context_length=%d, memory_budget=1 << 40); "
                          "p = m.decoder.plan; print(json.dumps([base, p.minimum, p.per_expert, p.floor]))"
                          % (a.edge, a.prompt_tokens + a.gen)], capture_output=True, text=True, check=True)
    base, minimum, per_expert, floor = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"planner: process {base / 2**20:.0f} MB before load, fixed costs {minimum / 2**20:.0f} MB with {floor} "
          f"experts, {per_expert / 2**20:.2f} MB per resident expert", file=sys.stderr)
    rows = []
    ref = None
    for frac in sorted(a.fractions, reverse=True):
        # + 2 experts: workers measure a little more; the all-resident row gets 2% more, as an error of 1%
        # in the per-expert cost is 2-3 experts over 240 and one expert short runs the staged path
        slack = 2 + (0.02 * n_experts if frac >= 1 else 0)
        budget = int(base + minimum + (frac * n_experts - floor + slack) * per_expert)
        ids_s = ",".join(map(str, ids))
        for path in ("slots", "sessions") if a.sessions and frac < 1 else ("slots",):
            res, facts = in_cgroup("edge_bench", budget, [sys.executable, HERE, "--worker", "edge", a.edge, ids_s,
                                                          str(budget), path, "--gen", str(a.gen), "--policy", a.policy,
                                                          "--prefetch", a.prefetch], 900)
            row = dict(engine="edge", fraction=frac, budget_mb=budget / 2**20, **facts, **(res or {}))
            if res and ref is None:
                ref = res["tokens"]
            if res:
                row["same_tokens_as_first"] = res["tokens"] == ref
                row["floor_ms"] = res["misses_per_token"] * record / 2**20 / mb_s * 1e3
                row.pop("tokens")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        if a.llama:
            res, facts = in_cgroup("llama_bench", budget, [a.peer_python, HERE, "--worker", "llama", a.llama, ids_s,
                                                           "x", "--gen", str(a.gen)], 900)
            row = dict(engine="llama.cpp", fraction=frac, budget_mb=budget / 2**20, **facts, **(res or {}))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\n{'engine':<10} {'path':<8} {'experts':>7} {'budget MB':>9} {'cgroup peak':>11} {'ended':>8} "
          f"{'decode tok/s':>12} {'prompt tok/s':>12} {'hit rate':>8} {'MB read/tok':>11} "
          f"{'ms/tok: read':>12} {'wait':>6} {'build':>6} {'compute':>7} {'floor':>6} {'same greedy':>11}")
    for r in rows:
        ended = ("ok" if r.get("decode_tok_s") is not None else "timeout" if r.get("timed_out")
                 else "OOM" if r.get("oom_kills", 0) > 0 else "failed")
        f = lambda k, w=6: f"{r[k]:>{w}.1f}" if k in r else " " * w
        print(f"{r['engine']:<10} {r.get('path', ''):<8} {r['fraction']:>7.0%} {r['budget_mb']:>9.0f} "
              f"{r['max_usage_mb']:>11.0f} {ended:>8} {r.get('decode_tok_s', 0):>12.1f} {r.get('prompt_tok_s', 0):>12.1f} "
              f"{r.get('hit_rate', float('nan')):>8.2f} {r.get('mb_read_per_token', float('nan')):>11.1f} "
              f"{f('read_ms', 12)} {f('wait_ms')} {f('build_ms')} {f('compute_ms', 7)} {f('floor_ms')} "
              f"{str(r.get('same_tokens_as_first', '')):>11}")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
