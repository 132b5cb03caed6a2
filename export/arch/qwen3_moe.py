"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention (per-head q/k RMSNorm, explicit head_dim) and a
sparse MLP: softmax router, top-k, renormalised when norm_topk_prob; layers in mlp_only_layers or
off decoder_sparse_step are dense."""
from __future__ import annotations

from . import qwen3
from .common import DecoderArch, sparse_moe


def describe(cfg: dict) -> DecoderArch:
    return sparse_moe(qwen3.describe(cfg), cfg, ffn_key="moe_intermediate_size",
                      normalize=bool(cfg.get("norm_topk_prob", False)))
