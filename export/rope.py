"""Rotary position tables (cos, sin) [max_context, rotary_dim / 2] as Hugging Face computes them,
including the rope_scaling variants edge supports (linear, llama3, yarn). GroupQueryAttention reads
them directly; YaRN's attention factor is folded into them, as transformers scales cos and sin."""
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
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)[0]
    raise AssertionError(kind)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, sc: dict) -> tuple[np.ndarray, float]:
    """(inv_freq, attention factor) of YaRN: each frequency interpolated by `factor` or kept, with a
    linear ramp between the dimensions that turn beta_fast and beta_slow times over the original context."""
    factor = float(sc["factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    attention = sc.get("attention_factor")
    if attention is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attention = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    fast, slow = float(sc.get("beta_fast") or 32), float(sc.get("beta_slow") or 1)

    def turns_dim(turns: float) -> float:
        return dim * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = turns_dim(fast), turns_dim(slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolate = (1.0 / pos).astype(np.float32)
    interpolate = (1.0 / (np.float32(factor) * pos)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolate * (1 - keep) + extrapolate * keep).astype(np.float32), float(attention)


def rope_kind(scaling: dict | None) -> str:
    if not scaling:
        return "none"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return "none"
    if kind in ("linear", "llama3", "yarn"):
        return kind
    raise UnsupportedError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def tables(head_dim: int, theta: float, scaling: dict | None, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: fp32 [max_context, head_dim / 2] (times YaRN's attention factor)."""
    angles = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq(head_dim, theta, scaling)[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    if rope_kind(scaling) == "yarn":
        attention = np.float32(_yarn(head_dim, theta, scaling)[1])
        cos, sin = cos * attention, sin * attention
    return cos, sin
