"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v (not on o)."""
from __future__ import annotations

from .common import DecoderArch, llama_family, reject


def describe(cfg: dict) -> DecoderArch:
    reject(cfg, "use_sliding_window", (False,), " (per-layer sliding windows are not implemented)")
    return llama_family(cfg, attention_bias=True, o_bias=False)
