"""Offline block quantization into onnxruntime's MatMulNBits / GatherBlockQuantized layout.

A weight W [N, K] (a Hugging Face Linear weight: N outputs, K inputs) is cut along K into
blocks of `block_size`; each block gets one fp32 scale (and a zero point when asymmetric).

    B            uint8 [N, n_blocks, block_size * bits / 8]   int4: element k in the low nibble when k is even
    scales       fp32  [N, n_blocks]   (with scale_dtype float16 the values are fp16-exact: the bundle
                                        stores 16 bits per block, as llama.cpp's Q4_0/Q8_0 do)
    zero_points  uint8 [N, ceil(n_blocks / 2)] (int4, nibble-packed) or [N, n_blocks] (int8); absent when
                 symmetric (onnxruntime then assumes 8 for int4 and 128 for int8)

Methods (QuantScheme.method, recorded per tensor in the manifest):
  rtn  round to nearest: the block's largest-magnitude value maps to the extreme code
  mse  data-free search per block (in the spirit of llama.cpp's make_qx_quants): try a grid of
       scales around round-to-nearest's, round, refit the scale by weighted least squares to the
       codes chosen, keep the one with the smallest weighted error. The weight of an element is
       sqrt(mean(w^2) + w^2) of its row (large weights matter more: an unweighted search clips
       the outliers that carry the model), times the per-input-channel importance when given.
       Same size and speed as rtn; export takes a few times longer.
  gptq GPTQ (Frantar et al. 2022) with a calibration's X^T X = H: columns are quantized left to right
       and each one's rounding error, scaled by the Cholesky factor of H^-1, is taken out of the
       columns not yet quantized, so the layer's output error X (W - Q)^T is what gets minimised,
       not the weight error. Each block's scale comes from mse's search on the block as updated so
       far. H is damped by DAMP x its mean diagonal: MoE experts see a few hundred to a few thousand
       calibration tokens, and on 48 real SmolMoE expert matrices (3 layers, 8192 calibration tokens)
       the held-out output error was lowest at 0.3 (relative to mse at block 32: 0.81x at 0.01,
       0.64x at 0.1, 0.61x at 0.3, 0.62x at 1.0). Falls back to
       mse for a tensor the calibration gave no H (its manifest entry then says mse).

The reader is onnxruntime itself; `dequantize` here mirrors it and gives the reported error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError


METHODS = ("rtn", "mse", "gptq")
DAMP = 0.3                                 # gptq: H + DAMP * mean(diag H) * I
SCALE_DTYPES = ("float16", "float32")
_GRID = np.linspace(-1.0, 1.0, 21)         # mse: candidate |code| the block's peak maps to, minus nominal


@dataclass(frozen=True)
class QuantScheme:
    bits: int            # 4 or 8
    block_size: int      # 16, 32, 64, 128, 256
    symmetric: bool = True
    method: str = "rtn"  # round to nearest
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"bits must be 4 or 8, not {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"block_size must be one of 16, 32, 64, 128, 256, not {self.block_size}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r} (supported: {', '.join(METHODS)})")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, not {self.scale_dtype!r}")

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


def _row_mean_square(blocks: np.ndarray, k: int) -> np.ndarray:
    return np.square(blocks).sum((1, 2), keepdims=True) / k                    # [n, 1, 1]


def _padded(importance: np.ndarray, width: int) -> np.ndarray:
    imp = np.zeros(width, np.float32)                                          # padded input channels: 0
    imp[:len(importance)] = importance
    return imp


def _weights(blocks: np.ndarray, sigma2: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """mse's per-element weights [n, nb, bs] for blocks [n, nb, bs]: sqrt(sigma2 + w^2) x importance,
    sigma2 the row's mean square [n, 1, 1] and `importance` the blocks' input channels [nb * bs], padded."""
    wt = np.sqrt(sigma2 + np.square(blocks))
    return wt if importance is None else wt * importance.reshape(1, *blocks.shape[1:])


def _half(scales: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    return scales.astype(np.float16).astype(np.float32) if scheme.scale_dtype == "float16" else scales


def _quantize_rows(w: np.ndarray, scheme: QuantScheme, importance: np.ndarray | None = None,
                   u: np.ndarray | None = None):
    """Codes [n, n_blocks, bs], scales [n, n_blocks], zero points [n, n_blocks], squared error, max error.
    `u` (gptq): the upper Cholesky factor of the damped H^-1, padded to n_blocks * bs."""
    n, k = w.shape
    bs = scheme.block_size
    nb = -(-k // bs)
    wp = np.zeros((n, nb * bs), np.float32)
    wp[:, :k] = w
    blocks = wp.reshape(n, nb, bs)                                   # [n, n_blocks, bs]
    qmax, zsym = _levels(scheme.bits)
    q = None                                   # codes: rounded below from the scales unless the search chose them
    if u is not None:
        q, scales, zp = _gptq(wp.copy(), u, scheme, importance, k)     # the error is measured against wp
    elif scheme.method == "mse":
        imp = None if importance is None else _padded(importance, nb * bs)
        wt = _weights(blocks, _row_mean_square(blocks, k), imp)
        q, scales, zp = (_mse_symmetric if scheme.symmetric else _mse_asymmetric)(blocks, wt, qmax, zsym)
        if scheme.scale_dtype == "float16":
            scales, q = _half(scales, scheme), None              # codes for the scale as stored
    elif scheme.symmetric:
        # the signed value of largest magnitude maps to the most negative code (as llama.cpp's
        # Q4_0 does): all 2^bits levels are used, not 2^bits - 1
        idx = np.abs(blocks).argmax(-1)[..., None]
        peak = np.take_along_axis(blocks, idx, -1)[..., 0]           # [n, n_blocks]
        scales = _half((peak / -zsym).astype(np.float32), scheme)
        zp = np.full_like(scales, zsym)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = _half(((hi - lo) / qmax).astype(np.float32), scheme)
        zp = np.clip(np.round(-lo / np.where(scales == 0, 1.0, scales)), 0, qmax)
    if q is None:
        safe = np.where(scales == 0, 1.0, scales)[..., None]
        q = np.clip(np.round(blocks / safe) + zp[..., None], 0, qmax).astype(np.uint8)   # [n, n_blocks, bs]
    err = ((q.astype(np.float32) - zp[..., None]) * scales[..., None] - blocks).reshape(n, nb * bs)[:, :k]
    return q, scales, zp, float(np.square(err, dtype=np.float64).sum()), float(np.abs(err).max())


def _mse_symmetric(blocks: np.ndarray, wt: np.ndarray, qmax: int, zsym: int):
    """Codes centred on zsym: for each candidate g, the block's signed peak maps to -(zsym + g) (g = 0 is
    round to nearest; g > 0 clips the peak a little, g < 0 leaves the top code unused), round, then the
    weighted least-squares scale for those codes; keep the best per block."""
    idx = np.abs(blocks).argmax(-1)[..., None]
    peak = np.take_along_axis(blocks, idx, -1)                       # [n, nb, 1]
    safe_peak = np.where(peak == 0, 1.0, peak)
    best_err = np.full(blocks.shape[:2], np.inf, np.float32)
    best_q = np.zeros(blocks.shape, np.int16)
    best_s = np.zeros(blocks.shape[:2], np.float32)
    for target in -(zsym + _GRID):
        q = np.clip(np.round(blocks * (target / safe_peak)), -zsym, qmax - zsym)       # [n, nb, bs]
        qq = (wt * np.square(q)).sum(-1)
        s = np.where(qq > 0, (wt * blocks * q).sum(-1) / np.where(qq > 0, qq, 1.0), 0.0)
        e = (wt * np.square(blocks - s[..., None] * q)).sum(-1)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best_s = np.where(better, s, best_s)
        best_q = np.where(better[..., None], q, best_q)
    zp = np.full(best_s.shape, zsym, np.float32)
    return (best_q + zsym).astype(np.uint8), best_s.astype(np.float32), zp


def _gptq(wp: np.ndarray, u: np.ndarray, scheme: QuantScheme, importance: np.ndarray, k: int):
    """GPTQ over padded rows wp [n, n_blocks * bs] (updated in place): codes, scales, zero points."""
    n = wp.shape[0]
    bs = scheme.block_size
    nb = wp.shape[1] // bs
    qmax, zsym = _levels(scheme.bits)
    search = _mse_symmetric if scheme.symmetric else _mse_asymmetric
    sigma2 = _row_mean_square(wp[:, None], k)                    # [n, 1, 1], of the rows as they came in
    imp = _padded(importance, nb * bs)
    codes = np.empty((n, nb, bs), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.float32)
    for b in range(nb):
        j = b * bs
        blk = wp[:, None, j:j + bs]                                                     # [n, 1, bs]
        _, s, zp = search(blk, _weights(blk, sigma2, imp[j:j + bs]), qmax, zsym)
        s, zp = _half(s[:, 0], scheme), zp[:, 0]                                         # [n]
        safe = np.where(s == 0, 1.0, s)
        err = np.empty((n, bs), np.float32)
        for c in range(bs):                     # one column at a time; its error moves right within the block
            col = wp[:, j + c]
            qc = np.clip(np.round(col / safe) + zp, 0, qmax)
            codes[:, b, c] = qc
            err[:, c] = (col - (qc - zp) * s) / u[j + c, j + c]
            wp[:, j + c + 1:j + bs] -= np.outer(err[:, c], u[j + c, j + c + 1:j + bs])
        wp[:, j + bs:] -= err @ u[j:j + bs, j + bs:]                                    # then past the block
        scales[:, b], zps[:, b] = s, zp
    return codes, scales, zps


def _hinv_factor(gram: np.ndarray, kp: int) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1, U^T U = H^-1, padded to kp columns (identity)."""
    k = gram.shape[0]
    h = np.eye(kp, dtype=np.float64)
    h[:k, :k] = gram
    d = np.diag(h)[:k]
    h[np.arange(k), np.arange(k)] += DAMP * float(d.mean() or 1.0) + (d == 0)        # dead inputs: stay defined
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def _mse_asymmetric(blocks: np.ndarray, wt: np.ndarray, qmax: int, zsym: int):
    """Shrink [min, max] towards its centre by each candidate factor, quantize, keep the best per block."""
    lo0, hi0 = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    best_err = np.full(blocks.shape[:2], np.inf, np.float32)
    best = None
    for f in np.linspace(1.0, 0.7, 13):
        lo, hi = lo0 * f, hi0 * f
        s = ((hi - lo) / qmax).astype(np.float32)
        safe = np.where(s == 0, 1.0, s)
        zp = np.clip(np.round(-lo / safe), 0, qmax)
        q = np.clip(np.round(blocks / safe[..., None]) + zp[..., None], 0, qmax)
        e = (wt * np.square((q - zp[..., None]) * s[..., None] - blocks)).sum(-1)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best = (q, s, zp) if best is None else tuple(np.where(better[..., None] if a.ndim == 3 else better, a, b)
                                                     for a, b in zip((q, s, zp), best))
    q, s, zp = best
    return q.astype(np.uint8), s.astype(np.float32), zp


def quantize(w: np.ndarray, scheme: QuantScheme, *, importance: np.ndarray | None = None,
             gram: np.ndarray | None = None, rows_per_chunk: int = 2048) -> Quantized:
    """Quantize W [N, K] blockwise along K; returns the packed tensors and the error made.
    `importance` [K] (mse, gptq): how much each input channel matters, e.g. mean squared activations.
    `gram` [K, K] (gptq): X^T X of the layer's calibration inputs; without it gptq is mse.
    Works through `rows_per_chunk` rows at a time so temporaries stay small (GPTQ treats rows apart)."""
    n, k = w.shape
    bs, bits = scheme.block_size, scheme.bits
    nb = -(-k // bs)
    u = None
    if scheme.method == "gptq":
        if gram is None:
            scheme = dataclasses.replace(scheme, method="mse")
        else:
            u = _hinv_factor(gram, nb * bs)
            importance = np.diag(gram).astype(np.float32) if importance is None else importance
    packed = np.empty((n, nb, bs * bits // 8), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.uint8)
    sq_err = sq_w = 0.0
    max_err = peak = 0.0
    for r in range(0, n, rows_per_chunk):
        chunk = np.asarray(w[r:r + rows_per_chunk], dtype=np.float32)
        q, sc, zp, e2, emax = _quantize_rows(chunk, scheme, importance, u)
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
