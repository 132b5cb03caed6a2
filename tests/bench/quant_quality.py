#!/usr/bin/env python3
"""Quantization quality, edge against llama.cpp, on the same tokens and the same windows.

    python tests/bench/quant_quality.py --edge B_fp32 B_int8 B_int4 ... \
        --llama F32.gguf Q4_0.gguf Q4_K_M.gguf --peer-python PEERS/bin/python [--tokens 100000]

The held-out text (tests/bench/heldout.py) is tokenized once by the first edge bundle; llama.cpp
(llama-cpp-python, logits_all) scores the very same token ids in the very same windows (context
512, disjoint; a window's first token unscored), so perplexities are comparable across engines
and each engine's deltas are against its own unquantized model. MB is the files on disk (bundle
folder / GGUF file, tokenizer and graphs included); bits/w counts the weight tensors only: codes
and per-block scales and zero points as stored (edge: from the manifest; GGUF: each tensor's
bytes), over the model's parameters.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))


def llama_worker(path: str, tokens: str, context: int, threads: int) -> dict:
    from llama_cpp import Llama
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "..", ".."))
    from edge.evaluate import window_nll, windows         # numpy only: importable in the peers venv
    ids = np.fromfile(tokens, dtype="<u2").astype(np.int64).tolist()
    llm = Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    nll, n, t0 = 0.0, 0, time.perf_counter()
    for begin, end, first in windows(len(ids), context, context):
        llm.reset()
        llm.eval(ids[begin:end])
        nll += window_nll(llm.scores[first - 1 - begin:end - 1 - begin], ids[first:end])
        n += end - first
    return dict(nll=nll / n, tokens=n, seconds=time.perf_counter() - t0)


def gguf_weights(path: str) -> tuple[int, int]:
    """(parameters, bytes of their tensors) of a GGUF file."""
    from gguf import GGUFReader
    ts = GGUFReader(path).tensors
    return int(sum(int(t.n_elements) for t in ts)), int(sum(int(t.n_bytes) for t in ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge", nargs="+", default=[], help="bundles; the first is the reference (fp32)")
    ap.add_argument("--llama", nargs="*", default=[], help="GGUFs; the first is llama.cpp's reference (F32)")
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(llama_worker(a.worker[0], a.worker[1], a.context, a.threads)))
        return 0

    import edge
    from edge.evaluate import bits_per_weight, evaluate
    from heldout import fingerprint, heldout_text
    text = heldout_text()
    rows = []
    ids = None
    for b in a.edge:
        m = edge.load(b, threads=a.threads, context_length=a.context)
        if ids is None:
            ids = m.text.encode(text)[:a.tokens]
            if len(ids) < a.tokens:
                print(f"note: the text has only {len(ids)} tokens", file=sys.stderr)
        nll, n, secs, _ = evaluate(m, ids, context=a.context, stride=a.context)
        size = sum(f.size for f in m.manifest.files)
        rows.append(dict(engine="edge", model=b, size_mb=size / 2**20, bpw=bits_per_weight(m.manifest),
                         ppl=math.exp(nll / n), tokens=n, seconds=secs))
        print(f"  edge {b}: {rows[-1]['ppl']:.4f}", file=sys.stderr, flush=True)
        del m
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = os.path.join(tmp, "tokens.u16")
        np.asarray(ids, "<u2").tofile(tok_file)
        for g in a.llama:
            p = subprocess.run([a.peer_python, HERE, "--worker", g, tok_file, "--context", str(a.context),
                                "--threads", str(a.threads)], capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(p.stdout.strip().splitlines()[-1])
            size = os.path.getsize(g)
            params, nbytes = gguf_weights(g)
            rows.append(dict(engine="llama.cpp", model=os.path.basename(g), size_mb=size / 2**20, bpw=nbytes * 8 / params,
                             ppl=math.exp(r["nll"]), tokens=r["tokens"], seconds=r["seconds"]))
            print(f"  llama.cpp {g}: {rows[-1]['ppl']:.4f}", file=sys.stderr, flush=True)
    print(f"\nheld-out text sha256 {fingerprint(text)}; {rows[0]['tokens']} tokens scored in windows of {a.context}\n")
    print(f"{'engine':<10} {'model':<34} {'MB':>7} {'bits/w':>6} {'perplexity':>10} {'delta vs own fp':>15}")
    for eng in ("edge", "llama.cpp"):
        mine = [r for r in rows if r["engine"] == eng]
        for r in mine:
            r["delta_pct"] = 100 * (r["ppl"] / mine[0]["ppl"] - 1)
            print(f"{eng:<10} {r['model'][-34:]:<34} {r['size_mb']:>7.1f} {r['bpw']:>6.2f} {r['ppl']:>10.4f} "
                  f"{r['delta_pct']:>+14.2f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
