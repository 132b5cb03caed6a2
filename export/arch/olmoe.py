"""OLMoE: Llama-style attention whose q and k projections are each RMS-normalised over their full
width (not per head), optional qkv clipping (refused), and a sparse MLP in every layer
(softmax router, top-k, renormalised only when norm_topk_prob)."""
from __future__ import annotations

from .common import DecoderArch, llama_family, reject, sparse_moe


def describe(cfg: dict) -> DecoderArch:
    reject(cfg, "clip_qkv", (None,), " (clamping q/k/v is not implemented)")
    arch = llama_family(cfg, attention_bias=bool(cfg.get("attention_bias", False)), qk_norm="full")
    return sparse_moe(arch, cfg, ffn_key="intermediate_size",
                      normalize=bool(cfg.get("norm_topk_prob", False)))
