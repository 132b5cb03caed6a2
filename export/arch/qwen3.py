"""Qwen3 (dense): the Llama layout with RMSNorm on each head's q and k before rotary, and an
explicit head_dim that need not be hidden_size / heads."""
from __future__ import annotations

from .common import DecoderArch, llama_family, reject


def describe(cfg: dict) -> DecoderArch:
    reject(cfg, "use_sliding_window", (False,), " (per-layer sliding windows are not implemented)")
    return llama_family(cfg, attention_bias=bool(cfg.get("attention_bias", False)), qk_norm="head")
