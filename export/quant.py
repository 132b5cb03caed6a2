"""Offline block quantization into onnxruntime's MatMulNBits / GatherBlockQuantized layout.

A weight W [N, K] (a Hugging Face Linear weight: N outputs, K inputs) is cut along K into
blocks of `block_size`; each block gets one fp32 scale (and a zero point when asymmetric).

    B            uint8 [N, n_blocks, block_size * bits / 8]   int4: element k in the low nibble when k is even
    scales       fp32  [N, n_blocks]
    zero_points  uint8 [N, ceil(n_blocks / 2)] (int4, nibble-packed) or [N, n_blocks] (int8); absent when
                 symmetric (onnxruntime then assumes 8 for int4 and 128 for int8)

The reader is onnxruntime itself; `dequantize` here mirrors it and gives the reported error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantScheme:
    bits: int            # 4 or 8
    block_size: int      # 16, 32, 64, 128, 256
    symmetric: bool = True
    method: str = "rtn"  # round to nearest

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be one of 16, 32, 64, 128, 256, not {self.block_size}")
        if self.method != "rtn":
            raise ValueError(f"unknown quantization method {self.method!r} (supported: rtn)")

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class Quantized:
    packed: np.ndarray               # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray               # fp32  [N, n_blocks]
    zero_points: np.ndarray | None   # uint8, see module docstring
    scheme: QuantScheme
    k: int                           # unpadded input size
    max_rel_err: float
    rms_rel_err: float


def _levels(bits: int) -> tuple[int, int]:
    return (1 << bits) - 1, 1 << (bits - 1)   # (max code, implied symmetric zero point)


def quantize(w: np.ndarray, scheme: QuantScheme) -> Quantized:
    """Quantize W [N, K] blockwise along K; returns the packed tensors and the error made."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    bs = scheme.block_size
    nb = -(-k // bs)
    wp = np.zeros((n, nb * bs), np.float32)
    wp[:, :k] = w
    blocks = wp.reshape(n, nb, bs)                                   # [N, n_blocks, bs]
    qmax, zsym = _levels(scheme.bits)
    if scheme.symmetric:
        # the signed value of largest magnitude maps to the most negative code (as llama.cpp's
        # Q4_0 does): all 2^bits levels are used, not 2^bits - 1
        idx = np.abs(blocks).argmax(-1)[..., None]
        peak = np.take_along_axis(blocks, idx, -1)[..., 0]           # [N, n_blocks]
        scales = (peak / -zsym).astype(np.float32)
        zp = np.full_like(scales, zsym)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = ((hi - lo) / qmax).astype(np.float32)
        safe = np.where(scales == 0, 1.0, scales)
        zp = np.clip(np.round(-lo / safe), 0, qmax)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = np.clip(np.round(blocks / safe) + zp[..., None], 0, qmax).astype(np.uint8)   # [N, n_blocks, bs]

    deq = ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(n, nb * bs)[:, :k]
    err = deq - w
    peak_abs = float(np.abs(w).max()) or 1.0
    norm = float(np.linalg.norm(w)) or 1.0
    max_rel = float(np.abs(err).max()) / peak_abs
    rms_rel = float(np.linalg.norm(err)) / norm

    if scheme.bits == 4:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)   # [N, n_blocks, bs/2]
        zpq = None
        if not scheme.symmetric:
            z = zp.astype(np.uint8)
            if nb % 2:
                z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
            zpq = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)     # [N, ceil(n_blocks/2)]
    else:
        packed = q
        zpq = None if scheme.symmetric else zp.astype(np.uint8)
    return Quantized(packed, scales, zpq, scheme, k, max_rel, rms_rel)


def dequantize(qt: Quantized) -> np.ndarray:
    """W [N, K] back from the packed form (what onnxruntime computes with)."""
    n, nb, _ = qt.packed.shape
    bs, bits = qt.scheme.block_size, qt.scheme.bits
    if bits == 4:
        q = np.empty((n, nb, bs), np.uint8)
        q[..., 0::2] = qt.packed & 0x0F
        q[..., 1::2] = qt.packed >> 4
    else:
        q = qt.packed
    if qt.zero_points is None:
        zp = np.full((n, nb), _levels(bits)[1], np.float32)
    elif bits == 4:
        z = np.empty((n, qt.zero_points.shape[1] * 2), np.uint8)
        z[:, 0::2] = qt.zero_points & 0x0F
        z[:, 1::2] = qt.zero_points >> 4
        zp = z[:, :nb].astype(np.float32)
    else:
        zp = qt.zero_points.astype(np.float32)
    w = (q.astype(np.float32) - zp[..., None]) * qt.scales[..., None]
    return w.reshape(n, nb * bs)[:, :qt.k]
