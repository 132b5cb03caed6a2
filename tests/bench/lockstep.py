#!/usr/bin/env python3
"""Decode speed of two or more engines taking turns, token block by token block, on one machine.

On a shared host the speed of a memory-bound decode drifts by ±20% from one minute to the next
(other tenants' memory traffic), more than the differences we want to see, so separate runs a
minute apart compare noise. Here every engine loads once in its own process, runs the same prompt,
and then the engines decode in turns of --turn tokens each, one at a time (the others wait on a
pipe), for --turns rounds: each pair of neighbouring turns sees nearly the same machine. A turn
starts --gap seconds after the previous one ended: right after another engine's turn, its thread
pool still spins (onnxruntime, ggml) and took 20-25% from whoever went next (measured with no gap:
the first engine of each round was the fastest, whichever it was). Reported:
each engine's decode tok/s over all turns, and per round the ratio to the first engine, with its
median and spread. The KV cache grows through the run as in a normal generation (context = prompt
+ turns x turn); greedy, EOS ignored.

    python tests/bench/lockstep.py --edge BUNDLE [--edge B2] [--llama Q4_0.gguf --peer-python PY]
        [--prompt-tokens 16] [--turn 32] [--turns 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def _edge(path: str, context: int, threads: int):
    import numpy as np
    import edge
    d = edge.load(path, threads=threads, context_length=context).decoder
    return (lambda ids: int(np.argmax(d.forward(ids)[-1]))), d.reset


def _llama(path: str, context: int, threads: int):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                n_batch=max(512, context), verbose=False)

    def step(ids):
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return step, llm.reset


def worker(kind: str, path: str, ids: list[int], context: int, threads: int) -> None:
    """Prompt once, then per line 'N' on stdin decode N tokens and print the seconds they took."""
    step, reset = {"edge": _edge, "llama": _llama}[kind](path, context, threads)
    reset()
    tok = step(ids)
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = step([tok])
        print(f"{time.perf_counter() - t0:.6f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"))
    ap.add_argument("--ids")
    ap.add_argument("--context", type=int)
    ap.add_argument("--edge", action="append", default=[], help="edge bundle (repeatable; the first is the reference)")
    ap.add_argument("--llama", action="append", default=[], help="GGUF file (repeatable)")
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--turn", type=int, default=32, help="tokens an engine decodes per turn")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds of quiet before each turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], [int(x) for x in a.ids.split(",")], a.context, a.threads)
        return
    if not a.edge:
        ap.error("--edge BUNDLE is required")
    import edge
    from edge.bench import prompt_ids
    ids = prompt_ids(edge.load(a.edge[0], threads=1, context_length=a.prompt_tokens + 8), a.prompt_tokens)
    context = a.prompt_tokens + (a.warmup + a.turns) * a.turn + 1
    engines = [(f"edge:{os.path.basename(p.rstrip('/'))}", "edge", p, sys.executable) for p in a.edge]
    engines += [(f"llama:{os.path.basename(p)}", "llama", p, a.peer_python) for p in a.llama]
    procs = {}
    for name, kind, path, py in engines:               # loaded one after the other, then all wait
        p = procs[name] = subprocess.Popen([py, HERE, "--worker", kind, path, "--ids", ",".join(map(str, ids)),
                              "--context", str(context), "--threads", str(a.threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name} worker failed to start")
    secs = {name: [] for name, *_ in engines}
    for rnd in range(a.warmup + a.turns):
        order = engines if rnd % 2 == 0 else engines[::-1]           # neither always goes first
        for name, *_ in order:
            p = procs[name]
            time.sleep(a.gap)
            p.stdin.write(f"{a.turn}\n")
            p.stdin.flush()
            s = float(p.stdout.readline())
            if rnd >= a.warmup:
                secs[name].append(s)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    ref = engines[0][0]
    print(f"{a.prompt_tokens}-token prompt, then {a.turns} rounds of {a.turn} tokens per engine in turns "
          f"({a.threads} threads, context up to {context})\n")
    print(f"{'engine':<36} {'decode tok/s':>12} {'ratio to first':>14} {'per-round ratio: median':>24} {'[min, max]':>14}")
    rows = {}
    for name, *_ in engines:
        tok_s = a.turns * a.turn / sum(secs[name])
        per = [r / s for r, s in zip(secs[ref], secs[name])]        # >1: this engine is faster than the first
        rows[name] = dict(decode_tok_s=tok_s, per_round=per, seconds=secs[name])
        print(f"{name:<36} {tok_s:>12.1f} {sum(secs[ref]) / sum(secs[name]):>14.3f} "
              f"{statistics.median(per):>24.3f} {f'[{min(per):.2f}, {max(per):.2f}]':>14}")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
