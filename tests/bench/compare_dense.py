#!/usr/bin/env python3
"""Side-by-side decode/prompt speed and peak RSS: edge vs llama.cpp vs onnxruntime-genai.

Same prompt token ids for every engine (N tokens cut from a fixed text with the model's
tokenizer), greedy, EOS ignored, M decoded tokens. Every measurement runs in a fresh process
(so peak RSS is that engine's alone); engines are interleaved round by round, and a round in
which other processes used the CPU is thrown away and run again.

    python tests/bench/compare_dense.py --edge BUNDLE --genai GENAI_DIR --llama Q4_0.gguf \\
        --peer-python /path/to/peers/venv/bin/python [--rounds 3] [--json out.json]

Setup of the peers: a separate venv with llama-cpp-python (`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
llama-cpp-python`) and onnxruntime-genai (with onnx, onnx-ir, torch==2.13.0 and transformers for its
model builder). Not part of the test suite: timings on a shared machine are noisy, so the
result is reported as ratios between engines measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


# ---------------------------------------------------------------------------------------------- workers
def _rss_mb() -> float:
    # VmHWM is this process image's own peak (ru_maxrss would carry the parent's across fork+exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def worker_edge(path, ids, gen, threads):
    import edge
    from edge.bench import run_once
    t0 = time.perf_counter()
    m = edge.load(path, threads=threads, context_length=len(ids) + gen)
    load_s = time.perf_counter() - t0
    return load_s, lambda n: run_once(m, ids, n)


def worker_genai(path, ids, gen, threads):
    import numpy as np
    import onnxruntime_genai as og
    cfg_path = os.path.join(path, "genai_config.json")
    cfg = json.load(open(cfg_path))
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    t0 = time.perf_counter()
    model = og.Model(path)
    load_s = time.perf_counter() - t0

    def once(n):
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        g = og.Generator(model, p)
        t0 = time.perf_counter()
        g.append_tokens(np.array(ids, dtype=np.int32))      # prefill; the first token is picked from it
        t1 = time.perf_counter()
        for _ in range(n - 1):
            g.generate_next_token()
        g.get_next_tokens()
        return t1 - t0, time.perf_counter() - t1
    return load_s, once


def worker_llama(path, ids, gen, threads):
    import numpy as np
    from llama_cpp import Llama
    t0 = time.perf_counter()
    # n_batch: llm.scores keeps n_batch rows unless logits_all, and is indexed by position below
    llm = Llama(model_path=path, n_ctx=len(ids) + gen, n_threads=threads, n_threads_batch=threads,
                n_batch=max(512, len(ids) + gen), verbose=False)
    load_s = time.perf_counter() - t0

    def once(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, time.perf_counter() - t1
    return load_s, once


def run_worker(engine, path, ids, gen, threads, repeat):
    load_s, once = {"edge": worker_edge, "genai": worker_genai, "llama": worker_llama}[engine](path, ids, gen, threads)
    once(8)                                                              # warm-up
    runs = [once(gen) for _ in range(repeat)]
    ttft = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return dict(engine=engine, load_s=load_s, prompt_tok_s=len(ids) / ttft, decode_tok_s=(gen - 1) / dec,
                peak_rss_mb=_rss_mb())


# ---------------------------------------------------------------------------------------------- driver
def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]          # all but idle and iowait


def measure(engine, path, python, ids, gen, threads, repeat, max_tries=4):
    """Run one worker process; retry when the machine was busy with something else meanwhile."""
    hz = os.sysconf("SC_CLK_TCK")
    for _ in range(max_tries):
        before = _busy_jiffies()
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        out = subprocess.run([python, HERE, "--worker", engine, path, "--ids", ",".join(map(str, ids)),
                              "--gen", str(gen), "--threads", str(threads), "--repeat", str(repeat)],
                             capture_output=True, text=True)
        wall = time.time() - t0
        if out.returncode != 0:
            raise SystemExit(f"{engine} worker failed:\n{out.stderr[-3000:]}")
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        others = (_busy_jiffies() - before) / hz - ours
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["foreign_cpu_s"] = round(others, 2)
        if others < 0.05 * wall + 0.3:
            return r
        print(f"  {engine}: other processes used {others:.1f} CPU-s during a {wall:.1f} s run; repeating", file=sys.stderr)
    r["noisy"] = True
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"))
    ap.add_argument("--ids")
    ap.add_argument("--edge", action="append", help="edge bundle (repeatable; the first is the reference)")
    ap.add_argument("--genai")
    ap.add_argument("--llama", action="append", default=[], help="GGUF file (repeatable)")
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per process (median)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per engine, interleaved")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        ids = [int(x) for x in a.ids.split(",")]
        print(json.dumps(run_worker(a.worker[0], a.worker[1], ids, a.gen, a.threads, a.repeat)))
        return

    if not a.edge:
        ap.error("--edge BUNDLE is required")
    import edge
    from edge.bench import prompt_ids
    model = edge.load(a.edge[0], threads=1, context_length=a.prompt_tokens + a.gen)
    ids = prompt_ids(model, a.prompt_tokens)
    del model
    engines = [("edge", p, sys.executable) for p in a.edge]
    if a.genai:
        engines.append(("genai", a.genai, a.peer_python))
    engines += [("llama", p, a.peer_python) for p in a.llama]
    results = {f"{e}:{os.path.basename(p.rstrip('/'))}": [] for e, p, _ in engines}
    for rnd in range(a.rounds):
        for e, p, py in engines:
            r = measure(e, p, py, ids, a.gen, a.threads, a.repeat)
            results[f"{e}:{os.path.basename(p.rstrip('/'))}"].append(r)
            print(f"round {rnd + 1} {e:6s} prompt {r['prompt_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.1f} tok/s"
                  f"  peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr)
    table = {}
    for k, rs in results.items():
        table[k] = {m: statistics.median(r[m] for r in rs) for m in ("prompt_tok_s", "decode_tok_s", "peak_rss_mb", "load_s")}
    ours = table[next(iter(table))]
    print(f"\n{a.prompt_tokens}-token prompt, {a.gen} decoded tokens, {a.threads} threads, median of {a.rounds} processes "
          f"x {a.repeat} runs\n")
    print(f"{'engine':<36} {'prompt tok/s':>12} {'decode tok/s':>12} {'peak RSS MB':>11} {'edge/it prompt':>14} {'edge/it decode':>14}")
    for k, t in table.items():
        print(f"{k:<36} {t['prompt_tok_s']:>12.1f} {t['decode_tok_s']:>12.1f} {t['peak_rss_mb']:>11.0f} "
              f"{ours['prompt_tok_s'] / t['prompt_tok_s']:>14.2f} {ours['decode_tok_s'] / t['decode_tok_s']:>14.2f}")
    if a.json:
        json.dump({"table": table, "runs": results}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
