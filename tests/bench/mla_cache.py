#!/usr/bin/env python3
"""MLA's KV cache and decode speed against context length, on a DeepSeek-V2-Lite-shaped model.

Builds a random checkpoint with transformers' DeepseekV2 classes whose layers have V2-Lite's shapes
(hidden 2048, 16 heads, kv_lora_rank 512, rope 64 + nope 128 per query/key head, v 128, experts of
1408, 2 shared, the first layer dense with 10944, yarn x40) but few layers, few experts and a small
vocabulary, so it exports in a minute. Exports it (int4 by default), then reports:

  - the KV cache's bytes per token and layer from the bundle's cache buffers, against the cache the
    same attention would need without MLA (keys and values per head: 16 x (192 + 128) values);
  - decode tok/s with the cache filled to 128 and to 2048 tokens, and the time per token and layer
    that the longer context adds (the attention over the cache; multiply by 27 layers for V2-Lite).

    python tests/bench/mla_cache.py [--layers 2] [--experts 8] [--quant int4] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

V2_LITE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, moe_intermediate_size=1408,
               intermediate_size=10944, n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
               routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 0.707, "mscale_all_dim": 0.707})


def make_checkpoint(out: Path, *, layers: int, experts: int, vocab: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import tiny                                   # tests/tiny.py: the byte-level tokenizer
    cfg = AutoConfig.for_model("deepseek_v2", **V2_LITE, num_hidden_layers=layers, n_routed_experts=experts,
                               num_experts_per_tok=min(6, experts), vocab_size=vocab, bos_token_id=256,
                               eos_token_id=257, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    (out / "tokenizer.json").write_text(tiny.tokenizer_json())
    return out


def decode_speed(model, context: int, gen: int) -> float:
    """Seconds per decoded token with the cache holding `context` tokens at the start."""
    import numpy as np
    d = model.decoder
    d.reset()
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, context)]
    tok = int(np.argmax(d.forward(ids)[-1]))
    t0 = time.perf_counter()
    for _ in range(gen):
        tok = int(np.argmax(d.forward([tok])))
    return (time.perf_counter() - t0) / gen


def main() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import edge
    from export import ExportOptions, export_model
    with tempfile.TemporaryDirectory() as tmp:
        src = make_checkpoint(Path(tmp) / "hf", layers=a.layers, experts=a.experts, vocab=a.vocab)
        bundle = export_model(str(src), Path(tmp) / "bundle", ExportOptions(quant=a.quant), progress=False).out
        m = edge.load(bundle, threads=a.threads, context_length=max(a.contexts) + a.gen + 1, progress=False)
        per_token = sum(c.bytes_per_token() for c in m.manifest.graph.cache)
        heads, qk, v = V2_LITE["num_attention_heads"], V2_LITE["qk_rope_head_dim"] + V2_LITE["qk_nope_head_dim"], \
            V2_LITE["v_head_dim"]
        without_mla = heads * (qk + v) * 4                        # fp32 keys and values, as a GQA layer caches them
        seconds = {c: decode_speed(m, c, a.gen) for c in a.contexts}
    lo, hi = min(a.contexts), max(a.contexts)
    r = dict(layers=a.layers, experts=a.experts, quant=a.quant, threads=a.threads,
             kv_bytes_per_token_layer=per_token // a.layers, kv_bytes_per_token_layer_without_mla=without_mla,
             kv_ratio=without_mla / (per_token / a.layers),
             decode_tok_s={str(c): 1 / s for c, s in seconds.items()},
             added_ms_per_token_layer=(seconds[hi] - seconds[lo]) * 1000 / a.layers)
    if a.json:
        print(json.dumps(r))
        return
    print(f"KV cache per token and layer: {r['kv_bytes_per_token_layer']} B with MLA, "
          f"{without_mla} B as keys and values per head ({r['kv_ratio']:.1f}x)")
    for c in a.contexts:
        print(f"decode at context {c:>5}: {r['decode_tok_s'][str(c)]:6.1f} tok/s")
    print(f"context {hi} instead of {lo} adds {r['added_ms_per_token_layer']:.2f} ms per token and layer")


if __name__ == "__main__":
    main()
