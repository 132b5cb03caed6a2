"""Sentence embeddings: `edge.load(bundle).embed(texts)` -> float32 [N, hidden].

A feature-extraction bundle (exported through optimum: BERT, sentence-transformers models) maps
tokens to hidden states; the pooling its manifest names turns them into one vector per text:

    mean  sum of the unmasked tokens' states / their count      (sentence-transformers' default)
    cls   the first token's state
    max   the largest value per dimension over unmasked tokens
    last  the last unmasked token's state                       (decoder-based embedders)

then L2 normalisation when the checkpoint's modules.json has a Normalize step (or by default).
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from .bundle import Bundle
from .engine import open_session, session_options
from .errors import ConfigError


class Embedder:
    def __init__(self, bundle: Bundle, *, threads: int):
        self.manifest = bundle.manifest
        self.spec = spec = bundle.manifest.embedding
        self.session = open_session(bundle.path(spec.file), session_options(threads))
        self.tokenizer = Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer.file)))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)
        self.dimensions = bundle.manifest.model.hidden_size

    def embed(self, texts, *, batch_size: int = 16) -> np.ndarray:
        """One vector per text, float32 [len(texts), hidden] (a single string: [1, hidden]). Texts
        longer than the model's max_length tokens are truncated to it."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError("embed() takes a string or a non-empty list of strings")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self._batch([e.ids for e in self.tokenizer.encode_batch(texts[i:i + batch_size])]))
        return np.concatenate(out)

    def _batch(self, encoded: list[list[int]]) -> np.ndarray:
        s = self.spec
        width = max(1, max(len(ids) for ids in encoded))
        ids = np.zeros((len(encoded), width), np.int64)           # [B, S]: padding is masked out
        mask = np.zeros((len(encoded), width), np.int64)          # [B, S]: 1 for real tokens
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = e
            mask[row, :len(e)] = 1
        feeds = {s.input_ids: ids, s.attention_mask: mask}
        if s.token_type_ids:
            feeds[s.token_type_ids] = np.zeros_like(ids)
        hidden = self.session.run([s.output], feeds)[0]           # [B, S, H]
        m = mask[..., None].astype(np.float32)                    # [B, S, 1]
        if s.pooling == "mean":
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        elif s.pooling == "cls":
            pooled = hidden[:, 0]
        elif s.pooling == "max":
            pooled = np.where(m > 0, hidden, -np.inf).max(1)
        else:                                                     # "last": right-padded, so at length - 1
            pooled = hidden[np.arange(len(encoded)), np.maximum(mask.sum(1) - 1, 0)]
        if s.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)
