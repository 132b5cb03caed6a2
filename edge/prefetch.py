"""Guessing the next layers' experts, and reading and building them ahead of time.

While layer i's experts run, the routers of layers i+1..i+AHEAD are applied to layer i's MLP input
(the residual stream changes slowly: SmolMoE's guesses are 87% right one layer ahead, 84% two) and
their top-k are the guesses. The layer's own misses and the guesses that are not resident are
queued; a reader thread reads them into buffers the budget reserves (I/O), a builder thread turns
read blobs into sessions (prepacking: CPU), and the decode takes what is ready:

    layer i:  stage i ─► route ─► want(misses of i) ─► experts of i (take: ready / build a read blob
                  │                                     itself / wait, building others meanwhile)
                  └─► x_i @ R_{i+1}, x_i @ R_{i+2} ─► want(guesses)
    reader:   queued ─► read into a free buffer ─► read
    builder:  read ─► session ─► ready (at most `builds` built and not taken)

One session build uses one core, so on two cores the decode runs onnxruntime on one thread and the
builder has the other (a pool thread spinning there made build-ahead slower than none). Wants and
built experts of layers the decode has passed are dropped (`at`).

Precision = guessed experts that layer i+1 then used / guesses; recall = used experts that were
guessed / experts used (one layer ahead, over every decode step, resident or not).
"""
from __future__ import annotations

import atexit
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .manifest import Routing
from .routing import choose
from .storage import BlobReader

AHEAD = 2          # layers guessed ahead (SmolMoE: 87% of guesses right one layer ahead, 84% two)


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
    """The experts the next layers' routers pick (edge/routing.py's choice) on the current MLP input;
    counts precision and recall (of the guesses one layer ahead). biases: each MoE layer's routing
    correction bias [E] (None without)."""

    def __init__(self, routers: list[np.ndarray], routing: Routing, biases: list, ahead: int = AHEAD):
        self.routing = routing
        self.top_k = routing.top_k
        self.experts = routers[0].shape[1]
        # for layer i, the routers of layers i+1 .. i+ahead side by side, [H, ahead * E]: one product
        self.stacked = [np.ascontiguousarray(np.concatenate(routers[i + 1:i + 1 + ahead], axis=1))
                        if i + 1 < len(routers) else None for i in range(len(routers))]
        self.biases = [np.stack(biases[i + 1:i + 1 + ahead]) if routing.bias and i + 1 < len(routers) else None
                       for i in range(len(routers))]                                     # [ahead, E]
        self.stats = PrefetchStats()
        self._pending: tuple[int, set[int]] | None = None

    def guess(self, layer: int, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """[(layer + a, the experts its router picks on x [H], layer's MLP input)] for the layers ahead
        (none after the last); the guess for layer + 1 is scored by check()."""
        routers = self.stacked[layer]
        if routers is None:
            return []
        logits = (x @ routers).reshape(-1, self.experts)                                   # [ahead, E]
        top = choose(logits, self.routing, self.biases[layer])
        self._pending = (layer + 1, set(top[0].tolist()))
        self.stats.guessed += self.top_k
        return [(layer + 1 + a, top[a]) for a in range(len(top))]

    def check(self, layer: int, used) -> None:
        """Score the guess made for `layer` against the experts it used."""
        if self._pending is not None and self._pending[0] == layer:
            self.stats.correct += len(self._pending[1] & set(int(e) for e in used))
            self.stats.used += len(used)
            self._pending = None


class Prefetcher:
    """Reads and builds experts ahead: a reader thread (I/O) fills `reads` buffers, a builder thread
    (CPU) turns read blobs into sessions, at most `builds` built or being built and not yet taken.

    The foreground asks with `take`: built -> handed over; read -> it builds it itself; only
    queued -> withdrawn (it reads and builds it itself); being read or built -> it builds other
    read blobs while it waits, so both cores build when misses pile up. Wants of layers the decode
    has left are dropped."""

    def __init__(self, cache, *, reads: int, builds: int, stats: PrefetchStats):
        self.cache = cache
        self.stats = stats
        self.builds = builds
        self.reader = BlobReader(cache.reader.path, cache.reader.buf.size)
        self.free = [self.reader.buf] + [self.reader.buffer() for _ in range(reads - 1)]
        Key = tuple[int, int]
        self.queued: deque[Key] = deque()                    # to read
        self.reading: Key | None = None
        self.read: OrderedDict[Key, np.ndarray] = OrderedDict()   # read, to build
        self.building: set[Key] = set()
        self.ready: OrderedDict[Key, object] = OrderedDict()      # built, not yet taken
        self.closed = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=f, name=f"edge-{n}", daemon=True)
                        for f, n in ((self._read_loop, "read-ahead"), (self._build_loop, "build-ahead"))]
        for t in self.threads:
            t.start()
        atexit.register(self.close)

    def at(self, layer: int) -> None:
        """The decode is at `layer`: forget wants of layers it has left or will not reach soon."""
        live = range(layer, layer + 1 + AHEAD)
        with self.cond:
            for key in [k for k in self.queued if k[0] not in live]:
                self.queued.remove(key)
            for key in [k for k in self.read if k[0] not in live]:
                self.free.append(self.read.pop(key))
                self.stats.wasted += 1
            for key in [k for k in self.ready if k[0] not in live]:
                del self.ready[key]
                self.stats.wasted += 1

    def want(self, *wants) -> None:
        """Queue (layer, experts) pairs, in order (unless resident or on their way)."""
        with self.cond:
            for layer, experts in wants:
                for e in experts:
                    key = (layer, int(e))
                    if not (key in self.cache.cache or key in self.queued or key == self.reading or key in self.read
                            or key in self.building or key in self.ready):
                        self.queued.append(key)
            self.cond.notify_all()

    def take(self, key):
        """`key`'s expert if it was built ahead (or read ahead: built now), else None (the caller
        reads and builds it)."""
        with self.cond:
            t0 = time.perf_counter()
            try:
                while True:
                    if key in self.ready:
                        self.stats.served += 1
                        self.cond.notify_all()                 # room to build another
                        return self.ready.pop(key)
                    if key in self.read:
                        item = self._build_here(key, self.read.pop(key))
                        self.stats.served += item is not None
                        return item
                    if key in self.queued:
                        self.queued.remove(key)
                        return None
                    if key != self.reading and key not in self.building or not self.alive():
                        return None
                    if self.read and self._room():             # build another blob while this one comes
                        self._build_oldest()
                    else:
                        self.cond.wait(0.05)
            finally:
                self.stats.waited_s += time.perf_counter() - t0

    def alive(self) -> bool:
        return not self.closed and all(t.is_alive() for t in self.threads)

    def _room(self) -> bool:
        return len(self.ready) + len(self.building) < self.builds

    def _build_oldest(self) -> None:
        """Build the blob read first into `ready` (lock held on entry and exit)."""
        key, buf = self.read.popitem(last=False)
        item = self._build_here(key, buf)
        if item is not None:
            self.ready[key] = item

    def _build_here(self, key, buf: np.ndarray):
        """Build `key` from its read buffer with the lock released; the buffer goes back to the reader.
        None if the build failed (the foreground's own read and build will report why)."""
        self.building.add(key)
        self.cond.release()
        item, t0 = None, time.perf_counter()
        try:
            item = self.cache._build(buf[:self.cache.entries[key].size])
        except Exception:  # noqa: BLE001
            pass
        finally:
            self.cond.acquire()
            self.building.discard(key)
            self.free.append(buf)
            self.stats.loaded += item is not None
            self.stats.background_s += time.perf_counter() - t0
            self.cond.notify_all()
        return item

    def _read_loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not (self.queued and self.free):
                    self.cond.wait()
                if self.closed:
                    return
                key, buf = self.queued.popleft(), self.free.pop()
                self.reading = key
            ok, t0, e = False, time.perf_counter(), self.cache.entries[key]
            try:
                self.reader.read(e.offset, e.size, what=f"expert {key[0]}.{key[1]}", into=buf)
                ok = True
            except Exception:  # noqa: BLE001 - a failed read is the foreground's miss to report
                pass
            with self.cond:                       # stats under the lock: the builder adds to them too
                self.reading = None
                self.stats.background_s += time.perf_counter() - t0
                if ok:
                    self.read[key] = buf
                    self.stats.bytes_read += e.size
                else:
                    self.free.append(buf)
                self.cond.notify_all()

    def _build_loop(self) -> None:
        with self.cond:
            while True:
                while not self.closed and not (self.read and self._room()):
                    self.cond.wait()
                if self.closed:
                    return
                self._build_oldest()

    def close(self) -> None:
        atexit.unregister(self.close)
        with self.cond:
            self.closed = True
            self.queued.clear()
            self.cond.notify_all()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=30)
        with self.cond:
            self.read.clear()
            self.ready.clear()
        self.reader.close()
