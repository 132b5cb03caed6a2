"""Guessing the next layer's experts, and loading the guesses in the background.

While layer i's experts run, layer i+1's router is applied to layer i's MLP input (the hidden
state one layer early; the manifest gives each router's bytes) and its top-k are the guess.
Guesses that are not resident are read and built into sessions on a background thread at the
lowest CPU priority, into at most `slots` staging places that the memory budget reserves. A miss
on a staged expert takes it from there instead of reading and prepacking it; a guess still being
built is loaded by the foreground as any miss; a staged guess nobody asked for is dropped when a
newer one needs its place.

    layer i:   stage i ─► route ─► experts of i (main thread) ─► mix ─► stage i+1 ...
                   └─► x_i @ R_{i+1} ─► top-k guess ─► [background] read + build ─► staged

Precision = guessed experts that layer i+1 then used / guesses; recall = used experts that were
guessed / experts used (both over every decode step, resident or not).
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .storage import BlobReader


@dataclass
class PrefetchStats:
    guessed: int = 0             # (layer, expert) guesses made
    correct: int = 0             # guesses the next layer used
    used: int = 0                # experts the guessed layers used
    loaded: int = 0              # guesses read and built in the background
    served: int = 0              # misses answered from the staging places
    wasted: int = 0              # staged guesses dropped unused
    background_s: float = 0.0    # background read + build time

    @property
    def precision(self) -> float:
        return self.correct / self.guessed if self.guessed else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else 0.0


def load_routers(path, offsets: tuple[int, ...], hidden: int, experts: int) -> list[np.ndarray]:
    """Each layer's router as stored for its MatMul: fp32 [H, E]."""
    return [np.fromfile(path, np.float32, hidden * experts, offset=o).reshape(hidden, experts) for o in offsets]


class Guesser:
    """Top-k of the next layer's router on the current MLP input; counts precision and recall."""

    def __init__(self, routers: list[np.ndarray], top_k: int):
        self.routers = routers
        self.top_k = top_k
        self.stats = PrefetchStats()
        self._pending: tuple[int, set[int]] | None = None

    def guess(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """Experts layer+1 will likely use, from x [H] (layer's MLP input); None after the last layer."""
        if layer + 1 >= len(self.routers):
            return None
        logits = x @ self.routers[layer + 1]                                  # [E]
        top = np.argpartition(-logits, self.top_k - 1)[:self.top_k]
        self._pending = (layer + 1, set(int(e) for e in top))
        self.stats.guessed += self.top_k
        return top

    def check(self, layer: int, used) -> None:
        """Score the guess made for `layer` against the experts it used."""
        if self._pending is not None and self._pending[0] == layer:
            self.stats.correct += len(self._pending[1] & set(int(e) for e in used))
            self.stats.used += len(used)
            self._pending = None


class Prefetcher:
    def __init__(self, cache, *, slots: int, stats: PrefetchStats):
        self.cache = cache
        self.slots = slots
        self.stats = stats
        self.reader = BlobReader(cache.reader.path, cache.reader.buf.size)
        self.staged: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.busy: set[tuple[int, int]] = set()
        self.cond = threading.Condition()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="edge-prefetch", daemon=True)
        self.thread.start()
        # a daemon thread killed inside onnxruntime's session constructor at exit aborts the process
        atexit.register(self.close)

    def want(self, layer: int, experts) -> None:
        with self.cond:
            for e in experts:
                key = (layer, int(e))
                if key in self.cache.cache or key in self.staged or key in self.busy:
                    continue
                self.busy.add(key)
                self.jobs.put(key)

    def take(self, key):
        """The staged session of `key`, or None. A guess still being built is not waited for: the
        background thread runs at the lowest priority, and waiting on it would hand the decode's
        speed to whatever else the device runs (priority inversion); the caller loads it itself."""
        with self.cond:
            item = self.staged.pop(key, None)
            if item is not None:
                self.stats.served += 1
            return item

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)   # never slow the decode
        except (OSError, AttributeError):
            pass
        while True:
            key = self.jobs.get()
            if key is None:
                return
            item = None
            try:
                if key not in self.cache.cache:
                    t0 = time.perf_counter()
                    e = self.cache.entries[key]
                    item = self.cache._build(self.reader.read(e.offset, e.size, what=f"expert {key[0]}.{key[1]}"))
                    self.stats.background_s += time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - a failed guess is the foreground's miss to report
                item = None
            with self.cond:
                self.busy.discard(key)
                if item is not None and key in self.cache.cache:      # the foreground got there first
                    item = None
                    self.stats.wasted += 1
                if item is not None:
                    self.staged[key] = item
                    self.stats.loaded += 1
                    while len(self.staged) > self.slots:
                        self.staged.popitem(last=False)
                        self.stats.wasted += 1
                self.cond.notify_all()

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout=30)
        with self.cond:
            self.staged.clear()
        self.reader.close()
