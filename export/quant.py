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

from edge.errors import ConfigError


@dataclass(frozen=True)
class QuantScheme:
    bits: int            # 4 or 8
    block_size: int      # 16, 32, 64, 128, 256
    symmetric: bool = True
    method: str = "rtn"  # round to nearest

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"bits must be 4 or 8, not {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"block_size must be one of 16, 32, 64, 128, 256, not {self.block_size}")
        if self.method != "rtn":
            raise ConfigError(f"unknown quantization method {self.method!r} (supported: rtn)")

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


def _quantize_rows(w: np.ndarray, scheme: QuantScheme):
    """Codes [n, n_blocks, bs], scales [n, n_blocks], zero points [n, n_blocks], squared error, max error."""
    n, k = w.shape
    bs = scheme.block_size
    nb = -(-k // bs)
    wp = np.zeros((n, nb * bs), np.float32)
    wp[:, :k] = w
    blocks = wp.reshape(n, nb, bs)                                   # [n, n_blocks, bs]
    qmax, zsym = _levels(scheme.bits)
    if scheme.symmetric:
        # the signed value of largest magnitude maps to the most negative code (as llama.cpp's
        # Q4_0 does): all 2^bits levels are used, not 2^bits - 1
        idx = np.abs(blocks).argmax(-1)[..., None]
        peak = np.take_along_axis(blocks, idx, -1)[..., 0]           # [n, n_blocks]
        scales = (peak / -zsym).astype(np.float32)
        zp = np.full_like(scales, zsym)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = ((hi - lo) / qmax).astype(np.float32)
        zp = np.clip(np.round(-lo / np.where(scales == 0, 1.0, scales)), 0, qmax)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = np.clip(np.round(blocks / safe) + zp[..., None], 0, qmax).astype(np.uint8)   # [n, n_blocks, bs]
    err = ((q.astype(np.float32) - zp[..., None]) * scales[..., None] - blocks).reshape(n, nb * bs)[:, :k]
    return q, scales, zp, float(np.square(err, dtype=np.float64).sum()), float(np.abs(err).max())


def quantize(w: np.ndarray, scheme: QuantScheme, *, rows_per_chunk: int = 2048) -> Quantized:
    """Quantize W [N, K] blockwise along K; returns the packed tensors and the error made.
    Works through `rows_per_chunk` rows at a time so temporaries stay small."""
    n, k = w.shape
    bs, bits = scheme.block_size, scheme.bits
    nb = -(-k // bs)
    packed = np.empty((n, nb, bs * bits // 8), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.uint8)
    sq_err = sq_w = 0.0
    max_err = peak = 0.0
    for r in range(0, n, rows_per_chunk):
        chunk = np.asarray(w[r:r + rows_per_chunk], dtype=np.float32)
        q, sc, zp, e2, emax = _quantize_rows(chunk, scheme)
        packed[r:r + len(chunk)] = (q[..., 0::2] | (q[..., 1::2] << 4)) if bits == 4 else q
        scales[r:r + len(chunk)] = sc
        zps[r:r + len(chunk)] = zp
        sq_err += e2
        sq_w += float(np.square(chunk, dtype=np.float64).sum())
        max_err = max(max_err, emax)
        peak = max(peak, float(np.abs(chunk).max()))
    zpq = None
    if not scheme.symmetric:
        zpq = zps
        if bits == 4:
            z = np.concatenate([zps, np.zeros((n, 1), np.uint8)], axis=1) if nb % 2 else zps
            zpq = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)     # [N, ceil(n_blocks/2)]
    return Quantized(packed, scales, zpq, scheme, k, max_err / (peak or 1.0), (sq_err / (sq_w or 1.0)) ** 0.5)


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
