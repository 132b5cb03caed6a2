"""Speculative decoding: guess a few tokens cheaply, check them all in one forward pass.

A decode step on a CPU is bound by memory bandwidth: the model's weights are read once per
forward whether it computes one token or five. So a guesser proposes k tokens after the one just
chosen, the model runs the k + 1 as one piece, and every guess up to the first one the model
would not have produced is kept; that forward's logits at the first refusal give the next token.
The KV cache rows of refused guesses are dropped by moving the decoder's position back.

    PromptLookup(n)  what followed the latest earlier occurrence of the last n (down to 1) tokens
                     of the prompt and output: repeated JSON, code being edited, quoted text
    DraftModel(m)    a smaller model with the same tokenizer, decoding greedily on its own cache

Both guess deterministically, so one acceptance rule keeps the model's own output distribution:
greedy keeps a guess when it is the argmax; sampling keeps guess g with probability p(g) (the
model's sampling distribution at that position) and otherwise samples from p with g removed (the
speculative-sampling rule of Leviathan et al. and Chen et al. for a one-hot draft). k adapts:
+2 after a fully accepted block, -1 after a refusal (HF's assisted generation does the same), so
a guesser that keeps missing costs little. A drafted block is one prompt-sized piece for the
model, which the int8-activation kernels round differently from one-token steps: greedy output
can differ from plain decoding where two logits nearly tie.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError


class PromptLookup:
    """Guesses from n-gram matches in the sequence so far (prompt and output)."""

    def __init__(self, max_ngram: int = 3, max_tokens: int = 8):
        if not 1 <= max_ngram <= 8 or not 1 <= max_tokens <= 32:
            raise ConfigError("prompt lookup needs 1 <= n <= 8 and 1 <= draft tokens <= 32")
        self.max_ngram = max_ngram                # (how many it may guess at once: Adaptive's bound)

    def start(self, ids: list[int]) -> None:
        self._last: dict[tuple, int] = {}        # n-gram -> the position just after its latest occurrence
        self._indexed = 1

    def _index(self, seq: list[int]) -> None:
        """Record the n-grams that end before the last token (the last one must match an earlier one)."""
        for end in range(self._indexed, len(seq)):
            for n in range(1, min(self.max_ngram, end) + 1):
                self._last[tuple(seq[end - n:end])] = end
        self._indexed = max(self._indexed, len(seq))

    def propose(self, seq: list[int], k: int) -> list[int]:
        self._index(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            at = self._last.get(tuple(seq[-n:]))
            if at is not None:
                return seq[at:at + k]
        return []


class DraftModel:
    """Guesses by decoding greedily with a smaller model that shares the tokenizer. Its cache
    follows the accepted sequence (rewound to the common prefix, then fed what it lacks); it stops
    drafting early when its own top probability falls below `confidence`."""

    def __init__(self, model, target_text, *, max_tokens: int = 4, confidence: float = 0.3):
        if model.text.tok.get_vocab(with_added_tokens=True) != target_text.tok.get_vocab(with_added_tokens=True):
            raise ConfigError("the draft model's tokenizer differs from the target's: a draft must share it "
                              "(e.g. SmolLM2-135M for SmolMoE-8x135M)")
        if not 1 <= max_tokens <= 16:
            raise ConfigError("draft tokens must be in [1, 16]")
        self.model, self.decoder = model, model.decoder
        self.confidence = confidence
        self._cached: list[int] = []

    def start(self, ids: list[int]) -> None:
        pass                                      # the common-prefix rule reuses what the cache holds

    def propose(self, seq: list[int], k: int) -> list[int]:
        d = self.decoder
        n = 0
        for a, b in zip(self._cached, seq):
            if a != b:
                break
            n += 1
        n = min(n, len(seq) - 1, d.position)
        if len(seq) + k + 1 > d.context_length:
            k = d.context_length - len(seq) - 1
            if k < 1:
                return []
        d.rewind(n)
        logits = d.forward(seq[n:])[-1]
        out = []
        for i in range(k):
            t = int(np.argmax(logits))
            if i and _top_probability(logits) < self.confidence:
                break
            out.append(t)
            if i + 1 < k:
                logits = d.forward([t])[-1]
        self._cached = list(seq) + out[:-1]       # what its cache holds now
        return out


def _top_probability(logits: np.ndarray) -> float:
    x = logits - logits.max()
    return float(1.0 / np.exp(x).sum())


def accept(logits: np.ndarray, guess: int, sampler, rng) -> tuple[bool, int | None]:
    """(kept?, the token to use instead when not). Greedy: kept if it is the argmax. Sampling:
    kept with probability p(guess); else a token drawn from p without the guess."""
    idx, probs = sampler.distribution(logits)
    if probs is None:
        return idx == guess, (None if idx == guess else idx)
    where = np.flatnonzero(idx == guess)
    p = float(probs[where[0]]) if where.size else 0.0
    if rng.random() < p:
        return True, None
    rest = probs.copy()
    if where.size:
        rest[where[0]] = 0.0
    total = rest.sum()
    if total <= 0:                                # p(guess) was 1 and the draw still missed: keep it
        return True, None
    return False, int(idx[rng.choice(rest.size, p=rest / total)])


class Adaptive:
    """How many tokens to guess next: +2 after a block kept whole, -1 after a refusal."""

    def __init__(self, most: int):
        self.most, self.k = most, min(most, 2)

    def update(self, kept: int, guessed: int) -> None:
        if guessed == 0:
            return
        self.k = min(self.most, self.k + 2) if kept == guessed else max(1, self.k - 1)


def check_guesses(decoder, guesser, k: Adaptive, token: int, seq: list[int], *, sampler, rng, most: int):
    """Run `token` and up to `most` guesses after it (what `guesser` proposes after `seq`, which
    ends with `token`) through the model in one forward. Returns (the logits after the last token
    kept, the guesses kept, the token drawn in place of a refused guess or None, guesses made);
    the cache keeps `token` and the kept guesses."""
    guesses = guesser.propose(seq, min(k.k, most)) if most > 0 else []
    start = decoder.position
    out = decoder.forward([token] + guesses, all_logits=bool(guesses))
    kept, instead = 0, None
    for i, g in enumerate(guesses):
        ok, instead = accept(out[i], g, sampler, rng)
        if not ok:
            break
        kept += 1
    k.update(kept, len(guesses))
    if kept < len(guesses):
        decoder.rewind(start + 1 + kept)          # drop the refused guesses' cache rows
    forced = instead if kept < len(guesses) and sampler.p.temperature > 0 else None   # greedy: the argmax again
    return (out[kept] if guesses else out[-1]), guesses[:kept], forced, len(guesses)
