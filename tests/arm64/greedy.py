"""Greedy-decode a fixed prompt with a bundle and print one JSON line (run by tests/arm64/check.sh).

    python greedy.py BUNDLE [--tokens 32] [--threads 2] [--expert-capacity N]

Prints {"machine", "python", "onnxruntime", "prompt_ids", "tokens", "margins", "decode_tok_s",
"finish_reason"}; with --expert-capacity (a Mixture-of-Experts bundle) also "experts": how this
machine loaded experts under that cache ("slots", or "sessions" where the slot self-test failed and
the runtime fell back) and whether its greedy tokens equal the unlimited run's on this machine, on
that path and on the session path (a session built per miss). Both the x86 host and the emulated arm64 root run this file, so the token lists can
be compared directly. margins[k]: top-1 minus top-2 logit at generated step k (the sequence re-scored
in one pass): where two machines' tokens first differ, a small margin there means a near-tie that
their kernels' rounding broke differently, not a broken port.
Needs only the runtime (`import edge`); nothing from the exporter.
"""
import argparse
import json
import platform

import numpy as np
import onnxruntime

import edge

PROMPT = "The three laws of robotics are"

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--expert-capacity", type=int, default=None)
args = ap.parse_args()

model = edge.load(args.bundle, threads=args.threads)
ids = model.encode(PROMPT)
out = model.generate_ids(ids, max_new_tokens=args.tokens, temperature=0.0)
experts = None
if args.expert_capacity:
    for slots in (True, False):                 # expert slots (or their fallback), then the session path
        small = edge.load(args.bundle, threads=args.threads, expert_capacity=args.expert_capacity,
                          expert_slots=slots, progress=False)
        cache = small.decoder.experts
        same = small.generate_ids(ids, max_new_tokens=args.tokens, temperature=0.0) == out
        if slots:
            experts = dict(path="slots" if type(cache).__name__ == "SlotCache" else "sessions",
                           capacity=cache.capacity, same_as_unlimited=same, misses=cache.stats.misses)
        else:
            experts["sessions_same_as_unlimited"] = same
        small.decoder.close()
s = model.last_stats
rows = model.logits(ids + out)[len(ids) - 1:len(ids) - 1 + len(out)]     # row k predicts out[k]
top2 = np.partition(rows, -2, axis=-1)[:, -2:]
margins = [round(float(m), 3) for m in np.abs(top2[:, 1] - top2[:, 0])]
print(json.dumps(dict(machine=platform.machine(), python=platform.python_version(),
                      onnxruntime=onnxruntime.__version__, prompt_ids=ids, tokens=out, margins=margins,
                      decode_tok_s=round(s.decode_tok_s, 2), finish_reason=s.finish_reason, experts=experts)))
