"""Guessing the next layer's experts, and reading them from disk ahead of time.

While layer i's experts run, layer i+1's router is applied to layer i's MLP input (the hidden
state one layer early; the manifest gives each router's bytes) and its top-k are the guess.
Guesses that are not resident are *read* on a background thread into `slots` staging buffers
that the memory budget reserves; a miss then skips the disk and only builds its session.
The background does I/O only, never prepacking: on a small CPU, building sessions in the
background takes the cores the decode needs (measured: 0.77x with background builds), while a
read mostly waits on the disk. The current layer's own misses are queued too, so the second
miss of a layer is read while the first one is built.

    layer i:   stage i ─► route ─► [misses of i queued] ─► experts of i ─► mix ─► stage i+1 ...
                   └─► x_i @ R_{i+1} ─► top-k guess ─► [background] read into a staging buffer

A miss whose read is in flight waits for it (the read thread does no CPU work worth the name,
so this is not a priority inversion). A staged blob nobody asked for is dropped when a newer
guess needs its buffer.

Precision = guessed experts that layer i+1 then used / guesses; recall = used experts that were
guessed / experts used (both over every decode step, resident or not).
"""
from __future__ import annotations

import atexit
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
    loaded: int = 0              # blobs read in the background
    served: int = 0              # misses answered from the staging buffers
    wasted: int = 0              # staged blobs dropped unused
    bytes_read: int = 0          # read in the background
    background_s: float = 0.0    # background read time
    waited_s: float = 0.0        # foreground time waiting for reads in flight

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
        self.stats = stats
        self.reader = BlobReader(cache.reader.path, cache.reader.buf.size)
        self.free = [self.reader.buf] + [self.reader.buffer() for _ in range(slots - 1)]   # the reader's own is one
        self.staged: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()   # read, not yet taken
        self.busy: dict[tuple[int, int], np.ndarray] = {}                        # queued or being read
        self.cond = threading.Condition()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="edge-prefetch", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def want(self, layer: int, experts) -> None:
        """Queue reads of these experts of `layer` (those not resident, staged or queued already)."""
        with self.cond:
            for e in experts:
                key = (layer, int(e))
                if key in self.cache.cache or key in self.staged or key in self.busy:
                    continue
                if not self.free:
                    if not self.staged:
                        return                                   # every buffer is being read or lent
                    _, buf = self.staged.popitem(last=False)     # the oldest unclaimed guess
                    self.free.append(buf)
                    self.stats.wasted += 1
                self.busy[key] = self.free.pop()
                self.jobs.put(key)

    def take(self, key) -> np.ndarray | None:
        """The staging buffer holding `key`'s blob at its start if it was read ahead (waiting for a read
        in flight), else None. Hand it back with `give_back` once the session is built."""
        with self.cond:
            if key in self.busy:
                t0 = time.perf_counter()
                while key in self.busy and self.thread.is_alive():   # a closed prefetcher never hangs a miss
                    self.cond.wait(0.05)
                self.stats.waited_s += time.perf_counter() - t0
            buf = self.staged.pop(key, None)
            if buf is None:
                return None
            self.stats.served += 1
            return buf

    def give_back(self, buf: np.ndarray) -> None:
        """Return a buffer `take` lent (the session built from it has copied the weights)."""
        with self.cond:
            self.free.append(buf)

    def _work(self) -> None:
        while True:
            key = self.jobs.get()
            if key is None:
                return
            buf = self.busy[key]
            ok = False
            try:
                t0 = time.perf_counter()
                e = self.cache.entries[key]
                self.reader.read(e.offset, e.size, what=f"expert {key[0]}.{key[1]}", into=buf)
                self.stats.background_s += time.perf_counter() - t0
                self.stats.bytes_read += e.size
                ok = True
            except Exception:  # noqa: BLE001 - a failed read is the foreground's miss to report
                pass
            with self.cond:
                del self.busy[key]
                if ok:
                    self.staged[key] = buf
                    self.stats.loaded += 1
                else:
                    self.free.append(buf)
                self.cond.notify_all()

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout=30)
        with self.cond:
            self.staged.clear()
        self.reader.close()
