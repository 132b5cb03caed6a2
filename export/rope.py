"""Rotary position tables (cos, sin) [max_context, rotary_dim / 2] as Hugging Face computes them,
including the rope_scaling variants edge supports. GroupQueryAttention reads them directly."""
from __future__ import annotations

import math

import numpy as np

from edge.errors import UnsupportedError


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    # float32 throughout, as transformers computes it, so long positions round the same way
    freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))))
    freq = freq.astype(np.float32)
    kind = rope_kind(scaling)
    if kind == "none":
        return freq
    if kind == "linear":
        return (freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    raise AssertionError(kind)


def rope_kind(scaling: dict | None) -> str:
    if not scaling:
        return "none"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return "none"
    if kind in ("linear", "llama3"):
        return kind
    raise UnsupportedError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def tables(head_dim: int, theta: float, scaling: dict | None, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: fp32 [max_context, head_dim / 2]."""
    angles = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq(head_dim, theta, scaling)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
