"""The expert cache: experts the router picks, at most `capacity` at once, and which one a miss
replaces.

Policies:
  lru  one least-recently-used list over all layers (the baseline). Layers are visited in a
       cycle, so once the capacity is below the working set it evicts exactly what comes next.
  lfu  (default) keeps the experts used most, counted per layer with exponential decay (0.995 a
       use of the layer: recent use weighs more; every layer is visited equally often, so counts
       compare across layers), so layers whose routing is flatter get more of the cache. On the
       session path a miss used less than every resident expert runs once and is dropped; a slot
       must take a miss, and the least used slot goes. Replaying SmolMoE's routing
       (tests/bench/cache_oracle.py, 512 decode steps of the int4 bundle): at half the experts lru
       hits 80.0%, lfu 86.4% (slots 86.2%), Belady's optimum 91.3%; at a quarter 38.0%, 61.9%
       (slots 61.2%) and 67.9%. A decay of 0.98 gave 85.5% and 61.3%, and 8% fewer misses made
       decode at half 8% faster.

This module is the session path: a miss reads the expert's blob and makes a session from the
bundle's expert graph with the expert's tensors handed over by SessionOptions.add_initializer (views
into the blob just read), so the runtime needs no ONNX tooling; onnxruntime prepacks them (~3 ms for
a SmolMoE expert). Expert slots (edge/slots.py) replace that with one read of a prepacked record; the
policies above decide for both. All sessions share onnxruntime's global thread pool: per-session
pools would cost memory and wake-up latency for hundreds of small sessions.
"""
from __future__ import annotations

import atexit
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .engine import open_session, pooled_options
from .errors import ConfigError
from .manifest import Manifest
from .prefetch import PrefetchStats
from .storage import BlobReader


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_s: float = 0.0          # time reading experts from disk (the decode waiting on it)
    build_s: float = 0.0         # time creating sessions (prepacking; the session path only)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


POLICIES = ("lfu", "lru")


class CachePolicy:
    """How much each (layer, expert) is worth keeping: lfu, a use count per layer decayed at each use of
    that layer; lru, the time of the last use. The cache replaces the resident expert worth least."""

    def __init__(self, name: str, layers: int, experts: int, decay: float = 0.995):
        if name not in POLICIES:
            raise ConfigError(f"unknown expert cache policy {name!r} (choose from {', '.join(POLICIES)})")
        self.name = name
        self.decay = decay
        self.score = np.zeros((layers, experts), np.float64)       # [layer, expert]
        self.clock = 0

    def use(self, layer: int, expert: int) -> None:
        if self.name == "lfu":
            row = self.score[layer]
            row *= self.decay
            row[expert] += 1.0
        else:
            self.clock += 1
            self.score[layer, expert] = self.clock

    def admits(self, new: tuple[int, int], victim: tuple[int, int]) -> bool:
        """Should `new` replace `victim`? lfu keeps the victim when it is used at least as much (the
        newcomer runs once and is dropped); lru always replaces."""
        return self.name == "lru" or self.score[new] > self.score[victim]


class _Expert:
    __slots__ = ("session", "keep", "bound")

    def __init__(self, session, keep):
        self.session = session
        self.keep = keep          # the session options and initializer OrtValues
        self.bound = {}           # (x buffer id, y buffer id) -> IOBinding for one-token steps


def binding(session, bindings: dict, key, moe, x: ort.OrtValue, y: ort.OrtValue) -> ort.IOBinding:
    """`session`'s IOBinding reading `x` and writing `y`, made once per buffer `key` (kept in `bindings`)."""
    io = bindings.get(key)
    if io is None:
        io = session.io_binding()
        io.bind_ortvalue_input(moe.expert_input, x)
        io.bind_ortvalue_output(moe.expert_output, y)
        bindings[key] = io
    return io


def packed_factor(m: Manifest) -> float:
    """Resident bytes of a cached expert per byte of its blob, estimated from the quantization the
    manifest records, for before any expert is built (the MoE planner then measures it): onnxruntime
    keeps each block of codes with an fp32 scale and an fp32 block sum where the blob has the codes and
    the stored scale. int4 with fp16 scales: (0.5 + 8/32) / (0.5 + 2/32) = 1.33 at block 32, 1.18 at
    block 64 (SmolMoE measured 1.34 and 1.16; a slot's packed record is 1.18x the blob)."""
    e = next((t for t in m.tensors if ".experts." in t.name), None)
    if e is None or not e.block_size or e.dtype not in ("int4", "int8"):
        return 1.0
    code = 0.5 if e.dtype == "int4" else 1.0
    stored = 2 if e.scale_dtype == "float16" else 4
    return (code + 8 / e.block_size) / (code + stored / e.block_size)


def expert_values(moe, blob: np.ndarray, *, copy: bool = False) -> tuple[list[str], list[ort.OrtValue], list[np.ndarray]]:
    """The expert graph's initializers from one expert's stored blob: (names, OrtValues, the arrays
    behind them, to keep alive at least until a session exists): views of the blob, or copies with
    `copy`; fp16-stored scales are widened to the graph's fp32 (new arrays either way)."""
    names, values, arrays = [], [], []
    for t in moe.expert_tensors:
        nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
        view = blob[t.offset:t.offset + nbytes].view(t.dtype).reshape(t.shape)
        if t.load_as:
            view = view.astype(t.load_as)
        elif copy:
            view = view.copy()
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(view))
        arrays.append(view)
    return names, values, arrays


def build_session(moe, graph_path: str, blob: np.ndarray, *, keep_tensors: bool = True) -> _Expert:
    """An expert's session from its blob (the session path, and the reference slots are tested against).
    keep_tensors: the session keeps its own copy of the tensors (the blob is the reader's buffer, which
    the next read overwrites). False is right only where onnxruntime's prepacking copied everything the
    kernel reads, scales included (x86-64, ARM with dot-product instructions; not a Cortex-A72, whose
    kernel reads the scales tensor at every run): kernel_reads_tensors() checks it."""
    so = pooled_options()
    names, values, arrays = expert_values(moe, blob, copy=keep_tensors)
    for name, value in zip(names, values):
        so.add_initializer(name, value)
    session = open_session(graph_path, so)
    keep = [so] + (values + arrays if keep_tensors else
                   [v for v, t in zip(values, moe.expert_tensors) if not t.load_as])
    return _Expert(session, keep)


def kernel_reads_tensors(moe, graph_path: str, blob: np.ndarray, hidden: int) -> bool:
    """Does this CPU's expert kernel read the tensors handed to its session at run time, or only the
    packed copies it made of them? Measured: a session's output on a probe, then again with every
    tensor it was given overwritten."""
    item = build_session(moe, graph_path, blob, keep_tensors=True)
    x = {moe.expert_input: np.linspace(-1, 1, 3 * hidden, dtype=np.float32).reshape(3, hidden)}
    before = item.session.run([moe.expert_output], x)[0]
    for array in item.keep[1 + len(moe.expert_tensors):]:
        array.view(np.uint8)[...] = 0x7F
    after = item.session.run([moe.expert_output], x)[0]
    return not np.array_equal(before, after, equal_nan=True)


class ExpertCache:
    def __init__(self, bundle: Bundle, *, capacity: int, policy: str = "lfu", decay: float = 0.995):
        moe = bundle.manifest.moe
        self.moe = moe
        self.graph_path = str(bundle.path(moe.expert_graph))
        self.entries = {(x.layer, x.expert): x for x in moe.experts}
        self.reader = BlobReader(bundle.path(moe.expert_file), max(x.size for x in moe.experts))
        first = moe.experts[0]
        self.keep_tensors = kernel_reads_tensors(moe, self.graph_path, self.reader.read(first.offset, first.size),
                                                 bundle.manifest.model.hidden_size)
        layers = 1 + max(x.layer for x in moe.experts)
        self.rank = CachePolicy(policy, layers, moe.num_experts, decay)
        self.policy = policy
        self.capacity = capacity                  # experts held at once
        self.cache: OrderedDict[tuple[int, int], _Expert] = OrderedDict()
        self.resident = np.zeros((layers, moe.num_experts), bool)
        self.stats = CacheStats()
        self.prefetcher = None                    # edge.prefetch.Prefetcher (builds ahead), set by the decoder
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        self.cache.clear()
        self.reader.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read(self, key) -> np.ndarray:
        """The expert's blob, read from disk now into the reader's buffer (reused by the next read)."""
        e = self.entries[key]
        t0 = time.perf_counter()
        blob = self.reader.read(e.offset, e.size, what=f"expert {key[0]}.{key[1]}")
        self.stats.read_s += time.perf_counter() - t0
        self.stats.bytes_read += e.size
        return blob

    def _build(self, blob: np.ndarray) -> _Expert:
        return build_session(self.moe, self.graph_path, blob, keep_tensors=self.keep_tensors)

    def run(self, layer: int, expert: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The expert's output for `feeds` (a prompt piece's rows routed to it)."""
        return self._get(layer, expert).session.run([self.moe.expert_output], feeds)[0]

    def run_bound(self, layer: int, expert: int, x: ort.OrtValue, y: ort.OrtValue, key: tuple) -> None:
        """One-token step: run the expert reading `x` and writing `y` (bound once per session)."""
        item = self._get(layer, expert)
        item.session.run_with_iobinding(binding(item.session, item.bound, key, self.moe, x, y))

    def get(self, layer: int, expert: int):
        """The session of expert `expert` of `layer` (resident, or loaded now)."""
        return self._get(layer, expert).session

    def _get(self, layer: int, expert: int) -> _Expert:
        key = (layer, expert)
        with self._lock:
            self.rank.use(layer, expert)
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                self.stats.hits += 1
                return hit
            self.stats.misses += 1
            if len(self.cache) >= self.capacity:
                if self.policy == "lru":
                    victim = next(iter(self.cache))                                   # least recently used
                else:
                    held = np.where(self.resident, self.rank.score, np.inf)
                    victim = tuple(int(i) for i in np.unravel_index(np.argmin(held), held.shape))  # least used
                if not self.rank.admits(key, victim):
                    return self._load(key)                       # not worth a slot: run once, drop
                self._evict(victim)
            item = self._load(key)
            self.cache[key] = item
            self.resident[key] = True
            return item

    def _load(self, key) -> _Expert:
        """The expert's session: built ahead by the prefetcher, or read and built now."""
        pf = self.prefetcher
        item = pf.take(key) if pf is not None else None
        if item is not None:
            return item
        blob = self._read(key)
        t0 = time.perf_counter()
        item = self._build(blob)
        self.stats.build_s += time.perf_counter() - t0
        return item

    def _evict(self, key) -> None:
        del self.cache[key]
        self.resident[key] = False
        self.stats.evictions += 1


class SlotCache:
    """The slot path's expert cache: which expert each slot holds, and which slot a miss overwrites:
    the one the policy values least among slots that are not running, not being read into, and not
    holding an expert read ahead for a layer still to come. A miss is one read into that slot.

    With `prefetch`, a reader thread reads wanted experts (a layer's misses, the guesses for the next
    layers) into slots while the decode runs; the decode takes them when they arrive. Reads use no
    CPU to speak of (O_DIRECT), so nothing is taken from onnxruntime's threads. Same interface as
    ExpertCache (run, run_bound, stats, prefetcher.at / want)."""

    def __init__(self, pool, moe, *, policy: str = "lfu", decay: float = 0.995, prefetch: PrefetchStats | None = None):
        self.pool = pool
        self.moe = moe
        self.entries = {(e.layer, e.expert): i for i, e in enumerate(moe.experts)}   # key -> record
        self.record_size = pool.store.header.record_size
        self.layers = 1 + max(e.layer for e in moe.experts)
        self.rank = CachePolicy(policy, self.layers, moe.num_experts, decay)
        self.policy = policy
        n = len(pool.slots)
        self.capacity = n
        self.cache: dict[tuple[int, int], int] = {}          # key -> slot, for experts held or being read
        self.held = np.full((n, 2), -1, np.int64)            # [slot] -> (layer, expert), -1: empty
        self.pins = np.zeros(n, np.int32)                    # runs in progress: never overwritten while > 0
        self.loading = np.zeros(n, bool)                     # a read into it is in flight
        self.need = np.full(n, -1, np.int64)                 # step its read-ahead expert is wanted at
        self.fresh = np.zeros(n, bool)                       # read ahead and not used yet
        self.step, self.layer, self.base = 0, -1, 0          # decode position: step = base + layer
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.queued = threading.Condition(self.lock)          # the reader waits here for wants
        self.landed = threading.Condition(self.lock)          # the decode waits here for reads in flight
        self.queue: OrderedDict[tuple[int, int], int] = OrderedDict()     # wanted key -> step it is needed at
        self.prefetcher = _SlotReader(self, prefetch) if prefetch is not None else None

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        self.cache.clear()
        self.pool.close()

    def run(self, layer: int, expert: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The expert's output for `feeds` (a prompt piece's rows routed to it)."""
        i = self._acquire((layer, expert))
        try:
            return self.pool.slots[i].session.run([self.moe.expert_output], feeds)[0]
        finally:
            self._release(i)

    def run_bound(self, layer: int, expert: int, x: ort.OrtValue, y: ort.OrtValue, key: tuple) -> None:
        """One-token step: run the expert reading `x` and writing `y` (bound once per slot)."""
        i = self._acquire((layer, expert))
        try:
            slot = self.pool.slots[i]
            slot.session.run_with_iobinding(binding(slot.session, slot.bindings, key, self.moe, x, y))
        finally:
            self._release(i)

    def _acquire(self, key: tuple[int, int]) -> int:
        """The slot holding `key`, pinned (read into one now if it is nowhere)."""
        with self.lock:
            self.rank.use(*key)
            i = self.cache.get(key)
            if i is not None:
                if self.loading[i]:                                   # being read ahead: wait for it
                    t0 = time.perf_counter()
                    while self.loading[i]:
                        self.landed.wait()
                    self.prefetcher.stats.waited_s += time.perf_counter() - t0
                if self.cache.get(key) == i:
                    if self.fresh[i]:                                 # a miss the reader answered
                        self.fresh[i] = False
                        self.stats.misses += 1
                        self.prefetcher.stats.served += 1
                    else:
                        self.stats.hits += 1
                    self.pins[i] += 1
                    return i
            self.stats.misses += 1
            self.queue.pop(key, None)
            i = self._victim()
            while i is None:                                          # every slot busy: a read will end
                self.landed.wait(0.05)
                i = self._victim()
            self._take(i, key, -1)                                    # kept by its pin while it runs
            self.pins[i] = 1
        t0 = time.perf_counter()
        try:
            self.stats.bytes_read += self.pool.load(self.pool.slots[i], self.entries[key])
        except BaseException:
            with self.lock:
                self._empty(i)
                self.pins[i] = 0
            raise
        self.stats.read_s += time.perf_counter() - t0
        with self.lock:
            self.loading[i] = False
        return i

    def _release(self, i: int) -> None:
        with self.lock:
            self.pins[i] -= 1

    def _victim(self, ahead: bool = False) -> int | None:
        """The slot to overwrite (lock held): an empty one, else the least valued of those free to go.
        A read ahead leaves alone what was read ahead for layers to come, and leaves a token's worth of
        slots to the decode; the decode takes even those when nothing else can go."""
        idle = (self.pins == 0) & ~self.loading
        free = idle & (self.need < self.step)
        if ahead and free.sum() <= self.moe.top_k:
            return None
        if not free.any():
            free = idle
            if ahead or not free.any():
                return None
        empty = free & (self.held[:, 0] < 0)
        if empty.any():
            return int(np.argmax(empty))
        value = self.rank.score[self.held[:, 0], self.held[:, 1]]
        return int(np.argmin(np.where(free, value, np.inf)))

    def _take(self, i: int, key: tuple[int, int], need: int) -> None:
        """Give slot i to `key`, being read now (lock held)."""
        if self.held[i, 0] >= 0:
            if self.fresh[i]:
                self.prefetcher.stats.wasted += 1
            self._empty(i)
            self.stats.evictions += 1
        self.held[i] = key
        self.cache[key] = i
        self.loading[i] = True
        self.need[i] = need

    def _empty(self, i: int) -> None:
        key = (int(self.held[i, 0]), int(self.held[i, 1]))
        if self.cache.get(key) == i:
            del self.cache[key]
        self.held[i] = -1
        self.loading[i] = self.fresh[i] = False
        self.need[i] = -1


class _SlotReader:
    """SlotCache's read-ahead thread: `at(layer)` tells where the decode is, `want((layer, experts), ...)`
    queues experts a layer at or after it will use; each is read into a slot unless it is held already,
    its layer has passed, or no slot may go."""

    def __init__(self, cache: SlotCache, stats: PrefetchStats):
        self.cache = cache
        self.stats = stats
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="edge-slot-reader", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def at(self, layer: int) -> None:
        c = self.cache
        with c.lock:
            if layer <= c.layer:                                     # the next token
                c.base += c.layers
            c.layer, c.step = layer, c.base + layer
            for key in [k for k, need in c.queue.items() if need < c.step]:
                del c.queue[key]

    def want(self, *wants) -> None:
        """Queue (layer, experts) pairs, in order."""
        c = self.cache
        with c.lock:
            added = False
            for layer, experts in wants:
                need = c.base + layer
                for e in experts:
                    key = (layer, int(e))
                    if key not in c.cache and key not in c.queue:
                        c.queue[key] = need
                        added = True
            if added:
                c.queued.notify()

    def _loop(self) -> None:
        c = self.cache
        while True:
            with c.lock:
                while not self.closed and not c.queue:
                    c.queued.wait()
                if self.closed:
                    return
                key = min(c.queue, key=c.queue.__getitem__)           # the one needed soonest (first queued of those)
                need = c.queue.pop(key)
                if key in c.cache or need < c.step:
                    continue                                          # held, or its layer has passed
                i = c._victim(ahead=True)
                if i is None:
                    continue                                          # no slot may go: skip this guess
                c._take(i, key, need)
            t0, n = time.perf_counter(), 0
            try:
                n = c.pool.load(c.pool.slots[i], c.entries[key])
            except Exception:  # noqa: BLE001 - a failed read is the decode's miss to report
                pass
            with c.lock:
                self.stats.background_s += time.perf_counter() - t0
                if n:
                    c.loading[i] = False
                    c.fresh[i] = True
                    self.stats.loaded += 1
                    self.stats.bytes_read += n
                else:
                    c._empty(i)
                c.landed.notify_all()

    def close(self) -> None:
        atexit.unregister(self.close)
        with self.cache.lock:
            self.closed = True
            self.cache.queued.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
