"""`edge eval`: perplexity with a sliding window, and side-by-side comparison of bundles.

Windows of `context` tokens start every `stride` tokens; each window is a fresh sequence and
scores only the tokens no earlier window scored (the first window scores all but its first
token), as Hugging Face's perplexity guide does; a window's own first token is never scored. stride == context: disjoint windows (fastest);
a smaller stride gives every scored token more left context.

    [0 ............ context)                       scores 1 .. context-1
            [stride ........... stride+context)    scores context .. stride+context-1
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class EvalResult:
    bundle: str
    quant: str
    size_mb: float                 # bundle files on disk
    bits_per_weight: float         # stored bits (codes + scales + zero points) per weight, all weights
    perplexity: float
    nll: float                     # mean negative log-likelihood, nats per token
    tokens_scored: int
    tok_s: float                   # tokens through the model per second (overlap counted)
    context: int
    stride: int
    top1_agreement: float | None = None     # vs the first bundle of a comparison
    delta_pct: float | None = None          # perplexity vs the first bundle, percent

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for n tokens."""
    if context < 2 or not 0 < stride <= context:
        raise ConfigError(f"need context >= 2 and 0 < stride <= context, not context={context}, stride={stride}")
    out, scored_to = [], 1
    for begin in range(0, max(1, n - 1), stride):
        end = min(begin + context, n)
        if end - begin < 2 or end <= scored_to:
            break
        out.append((begin, end, max(scored_to, begin + 1)))   # a window's first token has no context here
        scored_to = end
        if end == n:
            break
    return out


def bits_per_weight(manifest) -> float:
    """Bits stored per weight over every tensor the manifest lists: codes, plus each block's scale
    (16 or 32 bits, as stored) and (asymmetric) zero point."""
    bits = n = 0
    for t in manifest.tensors:
        size = int(np.prod(t.shape))
        n += size
        if t.dtype == "float32":
            bits += 32 * size
            continue
        code = {"int8": 8, "int4": 4}[t.dtype]
        blocks = size / t.block_size
        scale = 16 if t.scale_dtype == "float16" else 32
        bits += code * size + blocks * (scale + (0 if t.symmetric else code))
    return bits / n if n else 0.0


def evaluate(model, ids: list[int], *, context: int, stride: int,
             keep_top1: bool = False) -> tuple[float, int, float, np.ndarray | None]:
    """(total nll, tokens scored, seconds, top-1 predictions of the scored positions or None)."""
    if len(ids) < 2:
        raise ConfigError("need at least 2 tokens to evaluate")
    total, scored, preds = 0.0, 0, []
    t0 = time.perf_counter()
    for begin, end, first in windows(len(ids), context, stride):
        lo, hi = first - 1 - begin, end - 1 - begin          # window positions whose next token is scored
        for at, logits in model.logits_pieces(ids[begin:end]):       # logits [piece, V] from position `at`
            a, b = max(lo, at), min(hi, at + len(logits))
            if a < b:
                rows = logits[a - at:b - at]                                             # [m, V]
                total += window_nll(rows, ids[begin + a + 1:begin + b + 1])
                if keep_top1:
                    preds.append(rows.argmax(-1).astype(np.int32))
        scored += end - first
    return total, scored, time.perf_counter() - t0, (np.concatenate(preds) if keep_top1 else None)


def window_nll(logits: np.ndarray, targets, rows: int = 16) -> float:
    """Sum of -log softmax(logits)[target] over the rows; logits [m, V] predict targets [m]. In float64,
    `rows` rows at a time (a budget's headroom holds 16 x 49k doubles, not a window's)."""
    targets, total = np.asarray(targets), 0.0
    for i in range(0, len(logits), rows):
        x = np.asarray(logits[i:i + rows], np.float64)                                   # [r, V]
        top = x.max(-1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(x - top).sum(-1))
        total += float((lse - x[np.arange(len(x)), targets[i:i + rows]]).sum())
    return total


def read_tokens(text: str | None, tokens: str | None, model) -> list[int]:
    if (text is None) == (tokens is None):
        raise ConfigError("give exactly one of --text FILE and --tokens FILE.u16")
    if tokens is not None:
        a = np.fromfile(tokens, dtype="<u2")
        if a.size and int(a.max()) >= model.manifest.model.vocab_size:
            raise ConfigError(f"{tokens} holds token id {int(a.max())}, beyond this model's vocabulary")
        return a.astype(np.int64).tolist()
    return model.text.encode(Path(text).read_text(encoding="utf-8"))


def compare(bundles: list[str], *, text: str | None = None, tokens: str | None = None, context: int = 512,
            stride: int | None = None, max_tokens: int | None = None, threads: int | None = None,
            memory_budget=None, progress=None) -> list[EvalResult]:
    """Evaluate each bundle in turn on the same tokens (tokenized by the first bundle)."""
    from .model import load
    stride = stride or context
    results, ref_top1, ids = [], None, None
    for i, b in enumerate(bundles):
        budget = memory_budget if memory_budget is not None and _is_moe(b) else None
        m = load(b, threads=threads, context_length=context, memory_budget=budget)
        if ids is None:
            ids = read_tokens(text, tokens, m)[:max_tokens]
        nll, n, secs, top1 = evaluate(m, ids, context=context, stride=stride, keep_top1=len(bundles) > 1)
        agree = delta = None
        ppl = math.exp(nll / n)
        if i == 0:
            ref_top1 = top1
        else:
            agree = float((top1 == ref_top1).mean())
            delta = 100 * (ppl / results[0].perplexity - 1)
        through = sum(e - s for s, e, _ in windows(len(ids), context, stride))
        results.append(EvalResult(bundle=str(b), quant=m.manifest.quant,
                                  size_mb=sum(f.size for f in m.manifest.files) / 2**20,
                                  bits_per_weight=bits_per_weight(m.manifest), perplexity=ppl, nll=nll / n,
                                  tokens_scored=n, tok_s=through / secs, context=context, stride=stride,
                                  top1_agreement=agree, delta_pct=delta))
        if progress:
            progress(results[-1])
        del m
    return results


def _is_moe(path) -> bool:
    from .bundle import open_bundle
    return open_bundle(path).manifest.moe is not None
