#!/usr/bin/env python3
"""A memory budget is the model's own memory: the same memory_budget, given in a fresh process and in
one that already holds N MB of unrelated arrays (a vision model, ROS), must give the same expert
cache, and each process must stay within the budget above what it held when load() began.

Each case runs in a fresh process: touch `hold` MB of arrays, note VmRSS (the baseline), load the
bundle with memory_budget=BUDGET, decode a prompt and `--gen` tokens, then report the expert cache's
size and the peak RSS above the baseline (VmHWM restarts at a budgeted load; slot pages count in
RSS while a session maps them, and every slot is mapped once used).

    python tests/bench/own_budget.py BUNDLE --budget 330MB [--hold 0 400] [--gen 64] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

HERE = __file__


def worker(path: str, budget: str, hold: int, gen: int) -> dict:
    import numpy as np
    held = np.ones(hold << 20, np.uint8)                    # touched: resident
    import edge
    from edge.bench import prompt_ids
    from edge.memory import status
    baseline = status()["VmRSS"]
    m = edge.load(path, threads=2, context_length=128 + gen, memory_budget=budget, progress=False)
    ids = prompt_ids(m, 128)
    m.generate_ids(ids, max_new_tokens=gen)
    s = status()
    d = m.decoder
    return dict(hold_mb=hold, baseline_mb=baseline / 2**20, held_mb=held.nbytes / 2**20,
                capacity=d.plan.capacity if d.plan else None, fused=type(d).__name__ == "Decoder",
                dense_mb=d.plan.base / 2**20 if d.plan else None,
                peak_above_baseline_mb=(s["VmHWM"] - baseline) / 2**20,
                rss_above_baseline_mb=(s["VmRSS"] - baseline) / 2**20, decode_tok_s=m.last_stats.decode_tok_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--hold", type=int, nargs="+", default=[0, 400], help="MB of arrays held before loading")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--worker", type=int)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.bundle, a.budget, a.worker, a.gen)))
        return
    from edge.moe import parse_bytes
    budget_mb = parse_bytes(a.budget) / 2**20
    rows = []
    for hold in a.hold:
        p = subprocess.run([sys.executable, HERE, a.bundle, "--budget", a.budget, "--gen", str(a.gen),
                            "--worker", str(hold)], capture_output=True, text=True)
        if p.returncode:
            rows.append(dict(hold_mb=hold, error=(p.stderr.strip().splitlines() or ["failed"])[-1]))
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nbudget {budget_mb:.0f} MB\n{'held MB':>8} {'baseline MB':>11} {'experts cached':>14} {'dense MB':>8} "
          f"{'peak above baseline MB':>22} {'within budget':>13} {'decode tok/s':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['hold_mb']:>8}  {r['error']}")
            continue
        print(f"{r['hold_mb']:>8} {r['baseline_mb']:>11.0f} {str(r['capacity']):>14} {r['dense_mb'] or 0:>8.0f} "
              f"{r['peak_above_baseline_mb']:>22.0f} {str(r['peak_above_baseline_mb'] <= budget_mb):>13} "
              f"{r['decode_tok_s']:>12.1f}")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
