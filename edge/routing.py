"""Routing: which experts a MoE layer runs for a token, and with what weights, from its router
logits and the manifest's Routing (edge/manifest.py). The one implementation: the decode, prompt
pieces, the prefetch guesser and calibration all call it.

    scores  = softmax(logits) | sigmoid(logits)                          [T, E]
    choice  = scores + correction bias (choosing only)                   [T, E]
    groups  : keep the best `top_groups` of `groups` groups (scored by their best choice, or the sum
              of their two best), the rest cannot be chosen
    ids     = top_k of choice (ties: the lower expert id)                [T, k]
    weights = scores[ids] (/ their sum if normalize) x scale             [T, k]

Where onnxruntime's QMoE can route (softmax, top-k, renormalised: Routing.qmoe_exact), the weights are
computed exactly as that kernel computes them, so the staged pipeline equals the fused graph bit for
bit; elsewhere in float32 as the reference implementations do.
"""
from __future__ import annotations

import numpy as np

from .manifest import Routing

MIN_WEIGHT = np.float32(1e-8)      # QMoE skips an expert whose renormalised weight is not above this


def _load_expf():
    """C's float exp, as onnxruntime's QMoE computes routing weights with it (std::exp on floats).
    numpy's float32 exp differs from it in the last bit for ~40% of inputs; rounding a float64 exp
    (the fallback, where no C math library is found) for ~0.07%. Takes and returns a Python float
    (the argument is rounded to float32 on the way in, the result is a float32 value)."""
    import ctypes
    import ctypes.util
    for find in (lambda: "libm.so.6", lambda: ctypes.util.find_library("m")):   # the second spawns ldconfig
        try:
            f = ctypes.CDLL(find()).expf
        except (OSError, AttributeError, TypeError):
            continue
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        return f
    return lambda x: float(np.float32(np.exp(float(np.float32(x)))))


_expf1 = _load_expf()


def _expf(x: np.ndarray) -> np.ndarray:
    return np.fromiter(map(_expf1, x.ravel().tolist()), np.float32, x.size).reshape(x.shape)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _scores(logits: np.ndarray, r: Routing) -> np.ndarray:
    """softmax or sigmoid of fp32 logits [..., E], in float32."""
    if r.scoring == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    return (np.float32(1) / (np.float32(1) + np.exp(-logits))).astype(np.float32)


def choose(logits: np.ndarray, r: Routing, bias: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """The experts [T, k] each row of logits [T, E] picks (bias: [E] or [T, E], with r.bias)."""
    if r.scoring == "softmax" and r.groups == 1 and not r.bias:
        return np.argsort(-logits, axis=-1, kind="stable")[:, :r.top_k]          # softmax keeps the order
    choice = _scores(logits, r) if scores is None else scores
    if r.bias:
        choice = choice + bias
    if r.groups > 1:
        t, (n, e) = np.arange(len(choice))[:, None], choice.shape
        grouped = choice.reshape(n, r.groups, e // r.groups)
        best = grouped.max(-1) if r.group_score == "max" else np.sort(grouped, -1)[..., -2:].sum(-1)   # [T, G]
        keep = np.zeros((n, r.groups), bool)
        keep[t, np.argsort(-best, axis=-1, kind="stable")[:, :r.top_groups]] = True
        choice = np.where(np.repeat(keep, e // r.groups, axis=1), choice, -np.inf)
    return np.argsort(-choice, axis=-1, kind="stable")[:, :r.top_k]


def route(logits: np.ndarray, r: Routing, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [T, k], weights [T, k] float32) for fp32 router logits [T, E]. A weight of 0 means
    the expert is skipped (callers do not run it).

    QMoE's arithmetic (r.qmoe_exact): e_j = expf(l_j - l_0) over the top-k logits in descending order,
    summed left to right, times the sum's reciprocal; an expert whose weight is not above 1e-8 is
    skipped. Ties go to the lower expert id, as torch.topk does (QMoE's own sort takes the higher id
    on an exact tie of two fp32 logits, the one case where the fused graph can differ)."""
    t = np.arange(len(logits))[:, None]
    if r.qmoe_exact:
        ids = choose(logits, r)
        top = logits[t, ids]                                                     # [T, k], descending
        e = _expf(top - top[:, :1])                                              # e[:, 0] = expf(0) = 1
        total = e[:, 0].copy()
        for j in range(1, r.top_k):
            total += e[:, j]
        w = e * (np.float32(1) / total)[:, None]
        w[w <= MIN_WEIGHT] = 0
        return ids, w
    scores = _scores(logits, r)
    ids = choose(logits, r, bias, scores)
    w = scores[t, ids]
    if r.normalize:
        w = w / (w.sum(-1, keepdims=True) + np.float32(1e-20))
    return ids, (w * np.float32(r.scale)).astype(np.float32)


def route_one(logits: np.ndarray, r: Routing, bias: np.ndarray | None = None) -> tuple[list[int], list[np.float32]]:
    """route() for one token's logits [E] (decode): the same ids and weights to the bit. With QMoE's
    routing it runs in plain Python, as numpy's per-call overhead dominates on a handful of logits (8
    logits, k=2: 6 us against 20): float32 arithmetic is done in float64 and rounded after each step,
    which gives float32's result for a sum, product or quotient of two float32 values; expf rounds its
    argument to float32 itself."""
    if not r.qmoe_exact:
        ids, w = route(logits[None], r, bias)
        return ids[0].tolist(), list(w[0])
    row = logits.tolist()
    ids = sorted(range(len(row)), key=lambda e: -row[e])[:r.top_k]    # stable: ties keep the lower id first
    e = [_expf1(row[i] - row[ids[0]]) for i in ids]
    total = e[0]
    for x in e[1:]:
        total = _f32(total + x)
    rec = _f32(1.0 / total)
    w = [np.float32(x * rec) for x in e]                             # the product, rounded to float32
    return ids, [x if x > MIN_WEIGHT else np.float32(0) for x in w]
