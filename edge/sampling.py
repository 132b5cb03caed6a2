"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off (Hugging Face semantics)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"invalid sampling parameter: {msg}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, not {v!r}")
        for name in ("max_new_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an integer, not {v!r}")
        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p < 1:
            bad(f"min_p must be in [0, 1), not {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, not {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray | None = None) -> int:
        """Pick the next token from logits [vocab]; `history` holds the ids seen so far."""
        idx, probs = self.distribution(logits, history)
        if probs is None:
            return int(idx)
        return int(idx[self.rng.choice(probs.size, p=probs)])

    def distribution(self, logits: np.ndarray, history: np.ndarray | None = None):
        """What __call__ samples from: (token ids, their probabilities), or (the argmax, None) when
        greedy. Speculative decoding weighs a guess by it."""
        p = self.p
        if p.repetition_penalty != 1.0 and history is not None and len(history):
            logits = logits.copy()
            seen = np.unique(history)
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits)), None
        x = logits.astype(np.float64) / p.temperature
        idx = np.arange(x.size)
        if 0 < p.top_k < x.size:
            idx = np.argpartition(-x, p.top_k - 1)[: p.top_k]
            x = x[idx]
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.min_p > 0:
            keep = probs >= p.min_p * probs.max()
            idx, probs = idx[keep], probs[keep]
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            n = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1   # smallest set reaching top_p
            order = order[:n]
            idx, probs = idx[order], probs[order]
        return idx, probs / probs.sum()
