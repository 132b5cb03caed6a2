#!/usr/bin/env python3
"""llama.cpp's prompt-lookup decoding on the prompts of tests/bench/speculative.py, for a side-by-side
ratio. Runs in a venv with llama-cpp-python (not edge's): the prompts come rendered, as text, from
`python tests/bench/speculative.py TARGET --write-prompts FILE`.

    python tests/bench/speculative_llama.py MODEL.gguf PROMPTS.json [--tokens 160] [--rounds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def decode_speed(llm, tokens: list[int], n: int) -> tuple[float, int]:
    """(decode tok/s after the first token, tokens generated), greedy."""
    llm.reset()
    t_first, count = None, 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count == n:
            break
    return (count - 1) / (time.perf_counter() - t_first) if count > 1 else 0.0, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("prompts")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    kw = dict(n_threads=a.threads, n_threads_batch=a.threads, n_ctx=4096, verbose=False)
    engines = {"plain": Llama(a.gguf, **kw),
               # a draft needs every position's logits kept (logits_all), as llama-cpp-python documents
               "prompt lookup": Llama(a.gguf, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=8), logits_all=True,
                                      **kw)}
    rows = []
    for name, text in json.load(open(a.prompts)).items():
        speeds = {k: [] for k in engines}
        for _ in range(a.rounds):
            for k, llm in engines.items():
                tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
                speeds[k].append(decode_speed(llm, tokens, a.tokens)[0])
        base = statistics.median(speeds["plain"])
        rows += [dict(prompt=name, mode=k, tok_s=statistics.median(v), ratio=statistics.median(v) / base)
                 for k, v in speeds.items()]
    if a.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['prompt']:<12} {r['mode']:<14} {r['tok_s']:>7.1f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
