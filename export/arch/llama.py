"""Llama 1/2/3.x, SmolLM2 and other checkpoints with model_type "llama".

Quirks fixed here: optional attention/MLP biases (attention_bias, mlp_bias), llama3 rope
scaling, tied embeddings, and llama.cpp's q/k row permutation in GGUF files."""
from __future__ import annotations

import dataclasses

import numpy as np

from .common import DecoderArch, llama_family, reject


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of every head's q/k rows
    rows, rest = w.shape[0], w.shape[1:]
    w = w.reshape(n_head, rows // n_head // 2, 2, *rest)   # [heads, half, 2, ...] as stored
    return w.swapaxes(1, 2).reshape(rows, *rest)           # [heads * 2 * half, ...] HF order


def describe(cfg: dict) -> DecoderArch:
    reject(cfg, "pretraining_tp", (1, None))
    arch = llama_family(cfg, attention_bias=bool(cfg.get("attention_bias", False)),
                        mlp_bias=bool(cfg.get("mlp_bias", False)))
    heads, kv_heads = arch.spec.num_heads, arch.spec.num_kv_heads

    def gguf_fixup(name: str, a: np.ndarray) -> np.ndarray:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return _unpermute(a, heads)
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return _unpermute(a, kv_heads)
        return a

    return dataclasses.replace(arch, gguf_fixup=gguf_fixup)
