#!/usr/bin/env python3
"""Run edge (and llama.cpp) inside Linux memory cgroups whose limit is the memory budget.

For each budget (the dense part + a fraction of the expert bytes + the runtime's fixed costs),
the engine runs in a fresh process placed in a cgroup v1 memory group with
memory.limit_in_bytes = budget (swap off). Reports decode tok/s, prompt tok/s, peak RSS, the
cgroup's own peak (memory.max_usage_in_bytes, page cache included), how the run ended (ok,
OOM-killed, or still thrashing at the 900 s timeout), and for edge the expert hit rate, bytes read
per token and greedy agreement with the unlimited run. Needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory.

    python tests/bench/moe_budget.py --edge BUNDLE [--llama Q4_0.gguf --peer-python PY]
        [--fractions 1.0 0.5 0.25] [--policy lfu] [--prefetch auto|on|off]
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


def worker_edge(path, ids, gen, budget, policy, prefetch):
    import numpy as np
    import edge
    from edge.bench import run_once
    from edge.memory import status
    m = edge.load(path, threads=2, context_length=len(ids) + gen, memory_budget=budget, expert_policy=policy,
                  prefetch={"auto": None, "on": True, "off": False}[prefetch])
    run_once(m, ids, 8)
    from edge.experts import CacheStats
    c = getattr(m.decoder, "experts", None)       # None: the budget holds every expert, in the fused graph
    st = c.stats if c else CacheStats(hits=1)
    pf = c.prefetcher.stats if c and c.prefetcher else None           # experts read in the background
    h0, m0, b0, p0 = st.hits, st.misses, st.bytes_read, pf.bytes_read if pf else 0
    ttft, dec = run_once(m, ids, gen)
    # per generated token, the prompt's misses included (as edge bench counts them)
    hits, misses = st.hits - h0 or 1, st.misses - m0
    read = st.bytes_read - b0 + (pf.bytes_read - p0 if pf else 0)
    d = m.decoder
    d.reset()
    tok = int(np.argmax(d.forward(ids)[-1]))
    tokens = [tok]
    for _ in range(31):
        tok = int(np.argmax(d.forward([tok])))
        tokens.append(tok)
    return dict(fused=c is None, prompt_tok_s=len(ids) / ttft, decode_tok_s=(gen - 1) / dec, peak_rss_mb=status()["VmHWM"] / 2**20,
                hit_rate=hits / max(1, hits + misses), mb_read_per_token=read / 2**20 / gen,
                capacity=c.capacity if c else len(m.manifest.moe.experts), prefetch=bool(c and c.prefetcher),
                stall_s_per_token=(st.read_s + st.build_s) / max(1, st.misses) * (misses / gen), tokens=tokens)


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
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        kind, path, ids = a.worker[0], a.worker[1], [int(x) for x in a.worker[2].split(",")]
        r = worker_edge(path, ids, a.gen, a.worker[3], a.policy, a.prefetch) if kind == "edge" else worker_llama(path, ids, a.gen)
        print(json.dumps(r))
        return
    import edge
    from edge.bench import prompt_ids
    from edge.bundle import open_bundle
    m = edge.load(a.edge, threads=1, context_length=a.prompt_tokens + a.gen, expert_capacity=2)
    ids = prompt_ids(m, a.prompt_tokens)
    del m
    n_experts = len(open_bundle(a.edge).manifest.moe.experts)
    # the planner's own measurements (in a fresh process, like the workers): fixed costs and the
    # resident cost of one expert; budget(f) = what holds a fraction f of all experts
    out = subprocess.run([sys.executable, "-c", "import edge, json; m = edge.load(%r, threads=2, context_length=%d, "
                          "memory_budget=1 << 40); p = m.decoder.plan; print(json.dumps([p.minimum, p.per_expert]))"
                          % (a.edge, a.prompt_tokens + a.gen)], capture_output=True, text=True, check=True)
    minimum, per_expert = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"planner: fixed costs {minimum / 2**20:.0f} MB, {per_expert / 2**20:.2f} MB per resident expert", file=sys.stderr)
    rows = []
    ref = None
    for frac in sorted(a.fractions, reverse=True):
        # + 2 experts: workers measure a little more; the all-resident row gets 2% more, as an error of 1%
        # in the per-expert cost is 2-3 experts over 240 and one expert short runs the staged path
        slack = 2 + (0.02 * n_experts if frac >= 1 else 0)
        budget = int(minimum + (frac * n_experts + slack) * per_expert)
        ids_s = ",".join(map(str, ids))
        res, facts = in_cgroup("edge_bench", budget, [sys.executable, HERE, "--worker", "edge", a.edge, ids_s,
                                                      str(budget), "--gen", str(a.gen), "--policy", a.policy,
                                                      "--prefetch", a.prefetch], 900)
        row = dict(engine="edge", fraction=frac, budget_mb=budget / 2**20, **facts, **(res or {}))
        if res and ref is None:
            ref = res["tokens"]
        if res:
            row["same_tokens_as_first"] = res["tokens"] == ref
            row.pop("tokens")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if a.llama:
            res, facts = in_cgroup("llama_bench", budget, [a.peer_python, HERE, "--worker", "llama", a.llama, ids_s,
                                                           "x", "--gen", str(a.gen)], 900)
            row = dict(engine="llama.cpp", fraction=frac, budget_mb=budget / 2**20, **facts, **(res or {}))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\n{'engine':<10} {'experts':>7} {'budget MB':>9} {'cgroup peak':>11} {'ended':>8} {'decode tok/s':>12} "
          f"{'prompt tok/s':>12} {'hit rate':>8} {'MB read/tok':>11} {'same greedy':>11}")
    for r in rows:
        ended = ("ok" if r.get("decode_tok_s") is not None else "timeout" if r.get("timed_out")
                 else "OOM" if r.get("oom_kills", 0) > 0 else "failed")
        print(f"{r['engine']:<10} {r['fraction']:>7.0%} {r['budget_mb']:>9.0f} {r['max_usage_mb']:>11.0f} "
              f"{ended:>8} {r.get('decode_tok_s', 0):>12.1f} {r.get('prompt_tok_s', 0):>12.1f} "
              f"{r.get('hit_rate', float('nan')):>8.2f} {r.get('mb_read_per_token', float('nan')):>11.1f} "
              f"{str(r.get('same_tokens_as_first', '')):>11}")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
