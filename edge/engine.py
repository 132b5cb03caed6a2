"""The decoder session: one onnxruntime session, a KV cache, and a forward() that runs S new
tokens and returns logits for the positions asked for.

In edge's own graphs the KV cache is one [1, kv_heads, context, head_dim] buffer per layer and per
K/V, bound both as GroupQueryAttention's past and present: nothing is copied between steps.
np.zeros maps the buffers lazily, so RSS grows with the tokens actually used, not with the context
length. Graphs exported by optimum take an attention mask and return past and new keys
concatenated (edge/kvcache.py: "concat"); the same forward() runs them.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .errors import BundleError, ConfigError, ContextError
from .kvcache import KVCache
from .manifest import GraphSpec
from .memory import release_file_pages


_POOL = {"threads": None}
_POOL_LOCK = threading.Lock()


def use_global_pool(threads: int) -> int:
    """Create onnxruntime's process-wide thread pool on first use; returns its size. Every session
    of the process runs on it (MoE models create hundreds of small sessions: per-session pools
    would cost memory and wake-up latency), so the first model loaded fixes the thread count."""
    with _POOL_LOCK:
        if _POOL["threads"] is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            # one CPU arena for every session too: per-session arenas each grow to the largest batch
            # that session saw (SmolMoE int4, experts at block 32: 3.55 -> 1.99 MB per cached expert, same speed)
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _POOL["threads"] = threads
        return _POOL["threads"]


def pooled_options() -> ort.SessionOptions:
    """Options for a session on the process-wide thread pool and allocator."""
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def session_options(threads: int) -> ort.SessionOptions:
    use_global_pool(threads)
    so = pooled_options()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def open_session(path, options: ort.SessionOptions, *, model: bytes | None = None) -> ort.InferenceSession:
    """A CPU session for a bundle graph (from `model`'s bytes when given, `path` naming it); onnxruntime
    refusing it (a hostile external-data path, a damaged graph) is a BundleError naming the file."""
    try:
        return ort.InferenceSession(str(path) if model is None else model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/RuntimeError types
        reason = str(e).replace("\n", " ").split("] : ", 1)[-1][:300]
        raise BundleError(f"onnxruntime cannot load {path}: {reason}") from None


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def check_context_length(context_length: int, max_context: int) -> None:
    if not isinstance(context_length, int) or context_length < 2 or context_length > max_context:
        raise ConfigError(f"context_length must be in [2, {max_context}] for this model, not {context_length}")


def step_ids(ids, position: int, context_length: int) -> tuple[np.ndarray, int]:
    """The next tokens as [1, S] int64 and the total length after them, or a clear error."""
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)                     # [1, S]
    if ids.shape[1] == 0:
        raise ConfigError("forward() needs at least one token")
    total = position + ids.shape[1]
    if total > context_length:
        raise ContextError(f"{total} tokens do not fit the context window of {context_length}")
    return ids, total


PREFILL_CHUNK = 64        # prompt tokens per forward pass (see Decoder)


def in_chunks(forward, ids: np.ndarray, size: int, all_logits: bool) -> np.ndarray:
    """forward() over `ids` [1, S] in pieces of `size` tokens: logits of every position, or the last."""
    parts = [forward(ids[:, i:i + size], all_logits=all_logits) for i in range(0, ids.shape[1], size)]
    return np.concatenate(parts) if all_logits else parts[-1]


class Decoder:
    """prefill_chunk: run prompts in pieces of this many tokens (None: whole). Every decoder takes
    PREFILL_CHUNK, the staged MoE pipeline too, so that neither a memory budget nor the prompt cache
    changes a number: the int8-activation kernels round a 512-token pass differently from eight
    64-token ones (SmolMoE int4: logits up to 1.3 apart), and a prompt cache that reuses whole pieces
    leaves the rest to run in the pieces a cold run would. 64-token pieces cost nothing measurable
    (SmolLM2 int8, 1100 tokens: 1230 tok/s against 1246 whole; the fused MoE graph alike)."""
    plan = None         # a MoE load under a budget that holds every expert keeps its MemoryPlan here

    def __init__(self, bundle: Bundle, *, threads: int, context_length: int, graph: GraphSpec | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        g = graph or bundle.manifest.graph
        self.prefill_chunk = prefill_chunk
        check_context_length(context_length, bundle.manifest.model.max_context)
        self.spec = g
        self.context_length = context_length
        self.vocab_size = bundle.manifest.model.vocab_size
        self.session = open_session(bundle.path(g.file), session_options(threads))
        self._data_files = [bundle.path(f.path) for f in bundle.manifest.files if f.path.endswith((".data", ".bin"))]
        self.release_pages()                # pages read while prepacking weights are never read again
        self.kv = KVCache(g.cache, context_length)
        self._all = range(len(g.cache))
        self._appends = self.kv.appends(self._all)
        self.io = self.session.io_binding()
        self.kv.bind(self.io, self._all)
        # one-token decode inputs live in fixed arrays bound once and updated in place
        self._ids1 = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._pos_last = np.zeros((1,), np.int64)
        self._logits1 = np.zeros((1, 1, self.vocab_size), np.float32)
        for name, arr in ((g.seqlens_k, self._seqlens), (g.total_sequence_length, self._total)):
            if name:
                self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        types = {i.name: i.type for i in self.session.get_inputs()}
        # optimum's graphs: a mask over every cached and new token, positions of the new ones
        self._mask_type = np.int32 if types.get(g.attention_mask) == "tensor(int32)" else np.int64
        self._ones = np.ones((1, context_length), self._mask_type)          # [1, context]
        self._positions = np.arange(context_length, dtype=np.int64)[None]   # [1, context]
        self._bind_step(self._ids1, self._pos_last, self._logits1)
        self.position = 0   # tokens in the cache
        self.writes = 0     # forward and rewind calls so far: a change of the cache anyone made

    def _bind_step(self, ids: np.ndarray, positions: np.ndarray, logits: np.ndarray) -> None:
        g = self.spec
        self.io.bind_ortvalue_input(g.input_ids, ort.OrtValue.ortvalue_from_numpy(ids))
        if g.logits_positions:
            self.io.bind_ortvalue_input(g.logits_positions, ort.OrtValue.ortvalue_from_numpy(positions))
        self.io.bind_ortvalue_output(g.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        self._single = ids is self._ids1

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are overwritten, not cleared)."""
        self.rewind(0)

    def release_pages(self) -> None:
        """Drop the bundle's file pages from this process's RSS: the embedding rows that gathers
        mapped in stay resident otherwise, a few MB more with every new token seen (they fault
        back from the page cache when read again)."""
        for path in self._data_files:
            release_file_pages(path)

    def rewind(self, position: int) -> None:
        """Keep the first `position` cached tokens and forget the rest (the prompt cache)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: {self.position} tokens are cached")
        self.kv.truncate(position)
        self.position = position
        self.writes += 1

    def room(self) -> int:
        return self.context_length - self.position

    def forward(self, ids, *, all_logits: bool = False) -> np.ndarray:
        """Run `ids` (the next tokens) through the model; logits [P, vocab] for the last
        position, or for every position when `all_logits`."""
        self.writes += 1                    # the cache changed (the prompt cache checks this)
        ids, total = step_ids(ids, self.position, self.context_length)
        s = ids.shape[1]
        if self.prefill_chunk and s > self.prefill_chunk:
            return in_chunks(self.forward, ids, self.prefill_chunk, all_logits)
        self._seqlens[0] = total - 1
        self._total[...] = total
        keep = self.kv.bind_step(self.io, self._all, self.position, s) if self._appends else []
        g = self.spec
        if g.attention_mask:
            keep.append(ort.OrtValue.ortvalue_from_numpy(self._ones[:, :total]))
            self.io.bind_ortvalue_input(g.attention_mask, keep[-1])
        if g.position_ids:
            keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._positions[:, self.position:total])))
            self.io.bind_ortvalue_input(g.position_ids, keep[-1])
        if s == 1 and not all_logits:
            if not self._single:
                self._bind_step(self._ids1, self._pos_last, self._logits1)
            self._ids1[0, 0] = ids[0, 0]
            self._run(total)
            return self._logits1[0]
        # a graph without logits_positions computes logits at every position
        every = all_logits or not g.logits_positions
        positions = np.arange(s, dtype=np.int64) if every else np.array([s - 1], np.int64)
        logits = np.empty((1, positions.size, self.vocab_size), np.float32)          # [1, P, vocab]
        self._bound = (np.ascontiguousarray(ids), positions, logits)   # keep alive while bound
        self._bind_step(*self._bound)
        self._run(total)
        return logits[0] if all_logits or not every else logits[0, -1:]

    def _run(self, total: int) -> None:
        self.session.run_with_iobinding(self.io)
        self.kv.stepped()
        self.position = total
