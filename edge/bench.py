"""`edge bench`: load time, time to first token, prompt and decode speed, peak RSS."""
from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from .model import Model, load

# Deterministic prompt material: the bench cuts exactly N tokens out of it.
_TEXT = ("The robot arm paused above the conveyor, its camera tracking a box that had slipped half off the belt. "
         "Engineers had trained the controller for months, yet every new warehouse brought surprises: glossy "
         "tape that confused the depth sensor, pallets stacked at odd angles, a forklift parked where no map "
         "said it should be. def plan_grasp(points, gripper):\n    best = None\n    for p in points:\n"
         "        score = gripper.reach(p) - 0.1 * p.height\n        if best is None or score > best[0]:\n"
         "            best = (score, p)\n    return best\n")


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM where Linux has it (ru_maxrss carries a parent's peak across fork+exec)."""
    from .memory import status
    hwm = status().get("VmHWM")
    return hwm / 2**20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class BenchResult:
    bundle: str
    quant: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    ttft_s: float            # median: prompt in -> first token out
    prompt_tok_s: float      # median
    decode_tok_s: float      # median
    peak_rss_mb: float
    experts: dict | None = None    # MoE: capacity, total, policy, hit_rate, mb_read_per_token, stall_ms_per_token
    speculation: dict | None = None    # draft / prompt lookup: guesses drafted, acceptance, tokens per forward

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_ids(model: Model, n: int) -> list[int]:
    ids = model.text.encode(_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_once(model: Model, ids: list[int], gen: int) -> tuple[float, float]:
    """(seconds to first token, seconds for the gen-1 one-token steps after it); greedy, EOS ignored
    (with speculative decoding the generation's own loop runs, to EOS: seconds per token x (gen-1))."""
    if model.speculation is not None:
        model.generate_ids(ids, max_new_tokens=gen, temperature=0.0)
        s = model.last_stats
        return s.prefill_s, s.decode_s / max(1, s.decode_steps + s.accepted) * (gen - 1)
    d = model.decoder
    d.reset()
    t0 = time.perf_counter()
    token = int(np.argmax(d.forward(ids)[-1]))
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        token = int(np.argmax(d.forward([token])))
    t2 = time.perf_counter()
    d.reset()
    return t1 - t0, t2 - t1


def bench(path: str, *, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 128,
          repeat: int = 3, memory_budget=None, expert_policy: str = "lfu", prefetch: bool | None = None,
          expert_store=None, expert_slots: bool = True, draft=None, draft_tokens: int = 4,
          prompt_lookup: int | None = None) -> BenchResult:
    t0 = time.perf_counter()
    model = load(path, threads=threads, context_length=prompt_tokens + gen_tokens, memory_budget=memory_budget,
                 expert_policy=expert_policy, prefetch=prefetch, expert_store=expert_store, expert_slots=expert_slots,
                 draft=draft, draft_tokens=draft_tokens, prompt_lookup=prompt_lookup)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(model, prompt_tokens)
    run_once(model, ids, min(gen_tokens, 8))           # warm-up
    cache = getattr(model.decoder, "experts", None)
    before = dataclasses.replace(cache.stats) if cache else None
    guesser = getattr(model.decoder, "guesser", None)
    pf = cache.prefetcher if cache else None
    g = pf.stats if pf else guesser.stats if guesser else None           # one object when both exist
    g0 = dataclasses.replace(g) if g else None
    drafted = accepted = forwards = 0
    runs = []
    for _ in range(repeat):
        runs.append(run_once(model, ids, gen_tokens))
        st = model.last_stats
        drafted, accepted, forwards = drafted + st.drafted, accepted + st.accepted, forwards + st.decode_steps
    speculation = dict(kind="draft model" if draft is not None else "prompt lookup", drafted=drafted,
                       acceptance=accepted / drafted if drafted else 0.0,
                       tokens_per_forward=(forwards + accepted) / forwards if forwards else 0.0) \
        if model.speculation is not None else None
    experts = None
    if cache:
        s, n = cache.stats, repeat * gen_tokens
        hits, misses = s.hits - before.hits, s.misses - before.misses
        read = s.bytes_read - before.bytes_read + (g.bytes_read - g0.bytes_read if pf else 0)
        waited = g.waited_s - g0.waited_s if pf else 0.0
        # per generated token; the prompts' misses are included (each run is prompt + generation)
        experts = dict(capacity=cache.capacity, total=len(cache.entries), policy=cache.policy,
                       path="slots (a miss is one read)" if type(cache).__name__ == "SlotCache"
                       else "a session built per miss",
                       hit_rate=hits / max(1, hits + misses), mb_read_per_token=read / 2**20 / n,
                       read_ms_per_token=1e3 * (s.read_s - before.read_s) / n,
                       build_ms_per_token=1e3 * (s.build_s - before.build_s) / n,
                       wait_ms_per_token=1e3 * waited / n,         # for experts being read (or built) ahead
                       stall_ms_per_token=1e3 * (s.read_s + s.build_s - before.read_s - before.build_s + waited) / n)
        if g:
            tp, guessed, used = g.correct - g0.correct, g.guessed - g0.guessed, g.used - g0.used
            experts.update(prefetch=pf is not None,
                           prefetch_precision=tp / guessed if guessed else 0.0, prefetch_recall=tp / used if used else 0.0,
                           prefetch_served=g.served - g0.served, prefetch_wasted=g.wasted - g0.wasted)
    elif model.manifest.moe is not None:           # every expert resident, in the fused graph
        n = len(model.manifest.moe.experts)
        experts = dict(capacity=n, total=n, policy="all resident (fused graph)", path="fused graph", hit_rate=1.0,
                       mb_read_per_token=0.0,
                       read_ms_per_token=0.0, build_ms_per_token=0.0, wait_ms_per_token=0.0, stall_ms_per_token=0.0)
    ttft = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return BenchResult(bundle=str(path), quant=model.manifest.quant, threads=model.threads, prompt_tokens=prompt_tokens,
                       gen_tokens=gen_tokens, load_s=load_s, ttft_s=ttft, prompt_tok_s=prompt_tokens / ttft,
                       decode_tok_s=(gen_tokens - 1) / dec if gen_tokens > 1 else 0.0, peak_rss_mb=peak_rss_mb(),
                       experts=experts, speculation=speculation)


def sweep(path: str, budgets: list[str], *, threads: int | None, prompt_tokens: int, gen_tokens: int,
          repeat: int, expert_policy: str) -> list[dict]:
    """`edge bench` at each budget, each in a fresh process (a process's memory is the budget's
    subject: earlier loads in the same process would count against later ones)."""
    import json
    import subprocess
    import sys
    from .bundle import open_bundle
    from .errors import ConfigError
    if open_bundle(path).manifest.moe is None:
        raise ConfigError("--sweep runs Mixture-of-Experts budgets; a dense model loads whole (use edge bench "
                          "without --sweep)")
    rows = []
    for b in budgets:
        cmd = [sys.executable, "-m", "edge", "bench", str(path), "--json", "--memory-budget", b,
               "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--repeat", str(repeat),
               "--expert-policy", expert_policy] + (["--threads", str(threads)] if threads else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        row = {"budget": b}
        if p.returncode == 0:
            row.update(json.loads(p.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = (p.stderr.strip().splitlines() or ["failed"])[-1]
        rows.append(row)
    return rows


def plot_sweep(rows: list[dict], out: str) -> None:
    """tok/s and expert hit rate against budget, as a PNG (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "decode_tok_s" in r and r.get("experts")]
    x = [parse_mb(r["budget"]) for r in ok]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [r["decode_tok_s"] for r in ok], "o-", color="tab:blue", label="decode tok/s")
    ax.set_xlabel("memory budget (MB)")
    ax.set_ylabel("decode tok/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [100 * r["experts"]["hit_rate"] for r in ok], "s--", color="tab:orange", label="expert hit rate")
    ax2.set_ylabel("expert hit rate (%)", color="tab:orange")
    ax2.set_ylim(0, 100)
    ax.set_title(f"{ok[0]['bundle'] if ok else ''}: speed vs memory budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def parse_mb(text: str) -> float:
    from .moe import parse_bytes
    return parse_bytes(text) / 2**20
