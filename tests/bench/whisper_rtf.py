#!/usr/bin/env python3
"""Whisper's real-time factor on a whisper-tiny-shaped model (random weights, exported through optimum).

Builds a random checkpoint with whisper-tiny's shapes (d_model 384, 4 encoder and 4 decoder layers,
6 heads, FFN 1536, 80 mel bins, vocabulary 51865), exports it at each quantization, and times a 30 s
clip: the log-mel features, the encoder, and a fixed number of decoded tokens (random weights never
say <|endoftext|> when a real model would; a 30 s clip of speech is ~60-120 tokens). The real-time
factor is the total over 30 s: below 1 is faster than real time.

    python tests/bench/whisper_rtf.py [--quants fp32,int8,int4] [--tokens 100] [--threads 2] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="fp32,int8,int4")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import tiny
    import edge
    from export import ExportOptions, export_model
    work = Path(tempfile.mkdtemp(prefix="whisper-rtf-"))
    src = tiny.make_whisper(work / "hf", **tiny.WHISPER_TINY)
    t = np.arange(30 * 16000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
    rows = []
    for quant in args.quants.split(","):
        report = export_model(str(src), work / quant, ExportOptions(quant=quant), progress=False)
        model = edge.load(report.out, threads=args.threads)
        s = model.spec
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            features = model.features(clip)
            t1 = time.perf_counter()
            model.encoder.run([s.encoder_output], {s.encoder_input: features})
            t2 = time.perf_counter()
            ids = model.generate_ids(features, language="en", max_new_tokens=args.tokens)   # encoder again inside
            t3 = time.perf_counter()
            decode = (t3 - t2) - (t2 - t1)
            run = dict(features_s=t1 - t0, encoder_s=t2 - t1, decode_s=decode, tokens=len(ids))
            if best is None or sum(run[k] for k in ("features_s", "encoder_s", "decode_s")) < \
                    sum(best[k] for k in ("features_s", "encoder_s", "decode_s")):
                best = run
        total = best["features_s"] + best["encoder_s"] + best["decode_s"]
        rows.append(dict(quant=quant, bundle_mb=round(report.bundle_mb, 1), features_ms=round(best["features_s"] * 1e3, 1),
                         encoder_ms=round(best["encoder_s"] * 1e3, 1), tokens=best["tokens"],
                         ms_per_token=round(best["decode_s"] * 1e3 / max(best["tokens"], 1), 2),
                         total_s=round(total, 3), real_time_factor=round(total / 30, 4)))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"whisper-tiny shape, 30 s clip, {args.threads} threads, best of {args.repeat}")
    print(f"{'quant':<6} {'MB':>6} {'features ms':>11} {'encoder ms':>10} {'tokens':>6} {'ms/token':>8} {'total s':>7} {'RTF':>6}")
    for r in rows:
        print(f"{r['quant']:<6} {r['bundle_mb']:>6.1f} {r['features_ms']:>11.1f} {r['encoder_ms']:>10.1f} {r['tokens']:>6} "
              f"{r['ms_per_token']:>8.2f} {r['total_s']:>7.3f} {r['real_time_factor']:>6.3f}")


if __name__ == "__main__":
    main()
