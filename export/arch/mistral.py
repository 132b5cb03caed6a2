"""Mistral (7B v0.1-v0.3 and relatives): the Llama layout plus an optional sliding window."""
from __future__ import annotations

from .common import DecoderArch, llama_family


def describe(cfg: dict) -> DecoderArch:
    return llama_family(cfg, attention_bias=False, sliding_window=int(cfg.get("sliding_window") or 0))
