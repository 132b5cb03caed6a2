"""The Mixture-of-Experts decoder: the manifest's stages run in order, and between a layer's stage
and the next the runtime routes each token and runs the experts it picked (SlotCache, or
ExpertCache where slots cannot work).

Same interface as engine.Decoder: forward(ids, all_logits) -> logits [P, vocab], reset(), room().
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .engine import (PREFILL_CHUNK, check_context_length, in_chunks, open_session, pooled_options, step_ids,
                     use_global_pool)
from .errors import BudgetError, ConfigError
from .kvcache import KVCache
from .experts import ExpertCache, SlotCache, packed_factor
from .memory import release_file_pages, reset_peak, return_freed_memory, status, trim_heap
from .prefetch import AHEAD, Guesser, Prefetcher, PrefetchStats, load_routers
from .progress import quiet
from .routing import route, route_one
from .storage import BlobReader


class _Stage:
    """One stage session; its cache buffers (if any) bound once where they are written in place, at
    every step where they are appended to (edge/kvcache.py)."""

    def __init__(self, spec, path: str, kv: KVCache):
        self.spec = spec
        self.kv = kv
        self.session = open_session(path, pooled_options())
        self.io = self.session.io_binding()
        kv.bind(self.io, spec.cache)
        self.appends = kv.appends(spec.cache)

    def run_bound(self, position: int, new_tokens: int) -> None:
        """Run on what is bound, the cache at tokens [position, position + new_tokens)."""
        keep = self.kv.bind_step(self.io, self.spec.cache, position, new_tokens) if self.appends else None  # noqa: F841
        self.session.run_with_iobinding(self.io)

    def bind(self, feeds: dict[str, ort.OrtValue], outputs: dict[str, ort.OrtValue]) -> None:
        """Bind OrtValues by role (they stay bound until rebound)."""
        for role, v in feeds.items():
            self.io.bind_ortvalue_input(self.spec.inputs[role], v)
        for role, v in outputs.items():
            self.io.bind_ortvalue_output(self.spec.outputs[role], v)

    def run(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], position: int, new_tokens: int) -> None:
        """feeds / outputs by role; outputs are filled in place."""
        keep = self.kv.bind_step(self.io, self.spec.cache, position, new_tokens) if self.appends else []
        for role, arr in feeds.items():
            v = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(v)
            self.io.bind_ortvalue_input(self.spec.inputs[role], v)
        for role, arr in outputs.items():
            v = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(v)
            self.io.bind_ortvalue_output(self.spec.outputs[role], v)
        self.session.run_with_iobinding(self.io)


HEADROOM = 48 << 20       # activations, onnxruntime arenas, Python: measured peaks stay well inside
CACHE_MARGIN = 1.1        # per cached expert session over its measured cost (see _plan)
SLOT_MARGIN = 1.02        # per slot: its memory is fixed (record pages + a session), only measurement noise
log = logging.getLogger("edge")


@dataclass(frozen=True)
class MemoryPlan:
    """The model's own memory (what the process holds beyond its footprint when load began)."""
    budget: int
    base: int              # resident after loading the stages (weights, runtime, tokenizer) + the weight
                           # file pages a prompt reads
    kv_cache: int          # at the full context length
    headroom: int
    per_expert: int        # resident cost of one cached expert (measured): a session, or a slot
    capacity: int          # experts held at once
    fused_need: int        # what the fused graph (every expert, no eviction churn) needs: see _plan
    read_ahead: int = 0    # session path: experts the prefetcher builds ahead, and its read buffers
    floor: int = 2         # experts the least budget holds (session path: 2 run once; slots: a token's)

    @property
    def minimum(self) -> int:
        return self.base + self.kv_cache + self.headroom + self.floor * self.per_expert + self.read_ahead

    def describe(self) -> str:
        mb = lambda b: f"{b / 2**20:.0f} MB"
        return (f"dense part {mb(self.base)} + KV cache {mb(self.kv_cache)} + headroom {mb(self.headroom)} "
                f"+ {mb(self.per_expert)} per resident expert"
                + (f" + experts built ahead {mb(self.read_ahead)}" if self.read_ahead else ""))


def parse_bytes(v) -> int:
    """"300MB", "1.5GiB", "512M", 123456 -> bytes (MB and MiB both mean 2^20 here, as RSS is reported)."""
    if isinstance(v, bool):
        raise ConfigError(f"memory budget must be a size such as '300MB', not {v!r}")
    if isinstance(v, (int, float)):
        return int(v)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(v).lower())
    if not m:
        raise ConfigError(f"memory budget must be a size such as '300MB' or '1.5GB', not {v!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def process_budget(total) -> int:
    """The memory_budget that bounds the whole process by `total` ("450MB", bytes): total minus what the
    process holds now (VmRSS). What `--memory-budget` means on the command line, and what a memory
    cgroup enforces; load()'s memory_budget alone is the model's own memory."""
    total = parse_bytes(total)
    held = status().get("VmRSS", 0)
    if total <= held:
        raise BudgetError(f"memory budget {total / 2**20:.0f} MB is too small: this process holds "
                          f"{held / 2**20:.0f} MB already; raise it")
    return total - held


class MoEDecoder:
    """memory_budget: the model's own memory; `baseline` is what the process held when load began
    (VmRSS), which the budget does not cover. Under a budget (or expert_capacity below every expert)
    misses go into expert slots (edge/slots.py) from the packed store at `expert_store`, made on first
    use; where slots cannot work (expert_slots=False, or the self-test fails) each miss builds a
    session (edge/experts.py)."""

    def __init__(self, bundle: Bundle, *, threads: int, context_length: int, expert_capacity: int | None = None,
                 memory_budget=None, baseline: int = 0, policy: str = "lfu", prefetch: bool | None = None,
                 expert_slots: bool = True, expert_store=None, progress=quiet):
        m = bundle.manifest
        check_context_length(context_length, m.model.max_context)
        self.moe = m.moe
        self.context_length = context_length
        self.prefill_chunk = PREFILL_CHUNK         # prompt tokens per pass: bounds activation memory
        self.vocab_size = m.model.vocab_size
        self.hidden = m.model.hidden_size
        self.baseline = baseline
        n_all = len(self.moe.experts)
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        data = [f for f in m.files if f.path.endswith(".data")]
        self._data_files = [bundle.path(f.path) for f in data]
        self._data_bytes = sum(f.size for f in data)
        limited = budget is not None or (expert_capacity is not None and expert_capacity < n_all)
        want_slots = expert_slots and limited
        # Session build-ahead (prefetch on the session path): a background thread reads and builds the
        # experts this layer misses and the next AHEAD layers' routers guess. SmolMoE int4, 2 cores:
        # 1.4-1.6x the decode speed at a quarter of the experts, about level at half, 0.85x at 80% (few
        # misses: the decode's second thread is worth more), hence the default below half. A build takes
        # a core, so onnxruntime's process-wide pool gets threads - 1 (a spinning pool thread would take
        # the builder's core); the choice is made on an estimate, before any session exists. Slot reads
        # take no core: the pool keeps every thread.
        build_ahead = not want_slots and threads >= 2 and prefetch is not False and \
            self._builds_ahead(m, budget, expert_capacity, context_length, n_all, prefetch)
        use_global_pool(threads - 1 if build_ahead else threads)
        g = m.graph
        self.kv = KVCache(g.cache, context_length)
        # under a budget, the stages' packing peak above their steady RSS (_plan reserves it for the fused
        # graph): VmHWM restarts here, as load() says; 0 where it cannot, and the headroom covers it
        watch = budget is not None and reset_peak()
        self.stages = [_Stage(st, str(bundle.path(st.file)), self.kv) for st in self.moe.stages]
        now = status()
        self._load_transient = max(0, now.get("VmHWM", 0) - now.get("VmRSS", 0)) if watch else 0
        for path in self._data_files:
            release_file_pages(path)
        return_freed_memory()                  # evicted experts' memory goes back to the OS, not to a heap
        base = self._dense_part()
        if budget is not None:       # a budget that cannot hold a token's experts fails before anything is made
            kv = self.kv.nbytes
            self._plan(budget, base, (kv, int(packed_factor(m) * max(x.size for x in self.moe.experts))),
                       margin=1.0, need=self.moe.top_k)
        slots = self._open_slots(bundle, expert_store, progress) if want_slots else None
        self.plan = None
        if budget is not None:
            if slots is not None:
                self.plan = self._plan(budget, self._dense_part(), self._measure_slots(slots), margin=SLOT_MARGIN,
                                       need=self.moe.top_k)
            else:
                self.plan = self._session_plan(bundle, budget, base, policy=policy,
                                               reads=(1 + AHEAD) * self.moe.top_k if build_ahead else 0)
                build_ahead = build_ahead and self.plan.read_ahead > 0
            expert_capacity = self.plan.capacity
        elif expert_capacity is None:
            expert_capacity = n_all
        expert_capacity = min(expert_capacity, n_all)
        self.guesser = None
        stats = None
        self.routing = self.moe.routing
        n_moe = sum(x is not None for x in self.moe.moe_layers())
        self._biases = load_routers(bundle.path(self.moe.router_file), self.moe.router_biases, 1, self.moe.num_experts) \
            if self.routing.bias else [None] * n_moe                      # [1, E] each: choosing only
        self._biases = [b if b is None else b[0] for b in self._biases]
        if expert_capacity < n_all and self.moe.routers:
            routers = load_routers(bundle.path(self.moe.router_file), self.moe.routers, self.hidden,
                                   self.moe.num_experts)
            self.guesser = Guesser(routers, self.moe.routing, self._biases)
            stats = self.guesser.stats
        if slots is not None:
            if not self.fused_fits:              # else the fused graph replaces this decoder (Model)
                slots.add(expert_capacity)
            read_ahead = prefetch is not False and expert_capacity < n_all
            self.experts = SlotCache(slots, self.moe, policy=policy,
                                     prefetch=(stats or PrefetchStats()) if read_ahead else None)
        else:
            self.experts = ExpertCache(bundle, capacity=expert_capacity, policy=policy)
            if build_ahead and expert_capacity < n_all:
                reads = (1 + AHEAD) * self.moe.top_k
                self.experts.prefetcher = Prefetcher(self.experts, reads=reads, builds=reads,
                                                     stats=stats or PrefetchStats())
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self.position = 0
        self.writes = 0     # forward and rewind calls so far: a change of the cache anyone made
        self._decode_bound = False
        self._shared = [("moe_shared" in st.outputs) for st in self.moe.stages[:-1]]
        self._moe_layer = self.moe.moe_layers()          # stage -> MoE layer, None for a dense layer's
        # one-token buffers: stage i writes moe_in into x; experts write y0..y(k-1); the weighted sum
        # goes to hidden, which stage i+1 reads together with the residual stream
        H, E, K = self.hidden, self.moe.num_experts, self.moe.top_k
        self._b = {n: np.zeros(shape, np.float32) for n, shape in
                   (("x", (1, H)), ("hidden", (1, 1, H)), ("hidden2", (1, 1, H)), ("residual", (1, 1, H)),
                    ("residual2", (1, 1, H)),
                    ("logits", (1, 1, E)), ("out", (1, 1, self.vocab_size)), ("shared", (1, 1, H)))}
        self._y = [np.zeros((1, H), np.float32) for _ in range(K)]
        self._ids1 = np.zeros((1, 1), np.int64)
        self._pos1 = np.zeros((1,), np.int64)
        ov = ort.OrtValue.ortvalue_from_numpy
        self._v = {n: ov(a) for n, a in self._b.items()}
        self._v["x3"] = ov(self._b["x"].reshape(1, 1, H))
        self._vy = [ov(a) for a in self._y]
        self._vstep = {"seqlens_k": ov(self._seqlens), "total_sequence_length": ov(self._total)}
        self._vids, self._vpos = ov(self._ids1), ov(self._pos1)

    @property
    def fused_fits(self) -> bool:
        """The budget holds every expert in the fused graph (Model then runs that instead)."""
        return self.moe.fused is not None and self.plan is not None and self.plan.budget >= self.plan.fused_need

    def _builds_ahead(self, m, budget, expert_capacity, context_length, n_all, prefetch) -> bool:
        """Session path: build ahead when the cache will hold under half of the experts (or when asked
        and it holds fewer than all), judged before anything is loaded: the dense weights count twice
        (sessions, and file pages a prompt reads), an expert as packed_factor estimates it."""
        if budget is None:
            guess = expert_capacity
        else:
            g = m.graph
            blob = max(x.size for x in self.moe.experts)
            kv = g.cache_bytes(context_length)
            free = self.baseline + budget - status().get("VmRSS", 0) - 2 * self._data_bytes - kv - HEADROOM
            guess = int(free // (CACHE_MARGIN * packed_factor(m) * blob))
        return guess is not None and guess < (n_all / 2 if prefetch is None else n_all)

    def _dense_part(self) -> int:
        """The model's memory so far (stages, runtime state) plus the weight file pages a prompt reads
        again (onnxruntime's batched int4 path; SmolMoE: all 66 MB of stages.onnx.data): counted in the
        dense part; they are dropped again when a generation ends (reset)."""
        return status().get("VmRSS", 0) - self.baseline + self._data_bytes

    def _open_slots(self, bundle: Bundle, location, progress):
        """The slot pool (packed store prepared, slot 0 self-tested), or None after one line saying why
        slots cannot work here (every miss then builds a session). A store that cannot be written is an
        error (StoreError), not a reason to run slowly."""
        from .slots import SlotError, SlotPool, self_test
        from .store import prepare
        try:
            pool = SlotPool(prepare(bundle, location, progress=progress).store, len(self.moe.experts))
            blobs = BlobReader(bundle.path(self.moe.expert_file), max(x.size for x in self.moe.experts))
            try:
                first, last = self.moe.experts[0], self.moe.experts[-1]
                self_test(pool, self.moe, hidden=self.hidden, graph_path=bundle.path(self.moe.expert_graph),
                          blobs=blobs, keys=[(first.layer, first.expert), (last.layer, last.expert)])
            except BaseException:
                pool.close()
                raise
            finally:
                blobs.close()
            return pool
        except SlotError as e:
            log.warning("expert slots cannot work here (%s): building a session per cache miss instead", e)
            return None

    def _measure_slots(self, pool) -> tuple[int, int]:
        """(KV cache, measured resident cost of one slot) in bytes: slots made and filled with distinct
        experts, run as prefill and decode run them (their record pages are shared memory)."""
        kv = self.kv.nbytes
        n = min(4, len(self.moe.experts))
        before = status()
        pool.add(1 + n)
        io, oo = self.moe.expert_input, self.moe.expert_output
        for i in range(n):
            slot = pool.slots[1 + i]
            pool.load(slot, i)
            for rows in (PREFILL_CHUNK, 1):
                slot.session.run([oo], {io: np.zeros((rows, self.hidden), np.float32)})
        after = status()
        grown = sum(after.get(k, 0) - before.get(k, 0) for k in ("RssAnon", "RssShmem"))
        return kv, max(pool.store.header.record_size, grown // n)

    def _session_plan(self, bundle: Bundle, budget: int, base: int, *, policy: str, reads: int) -> MemoryPlan:
        """The session path's plan: a cached expert's session measured; room for a token's run-once
        misses (lfu), and for the experts built ahead with their read buffers (dropped when the budget
        cannot hold them)."""
        kv, measured, blob = self._measure(bundle)
        # 10% margin: SmolMoE int4 measures 1.56 MB per expert session and creeps up as thousands of
        # evictions fragment the heap (with return_freed_memory; without it glibc kept ~25% more)
        per_expert = int(max(CACHE_MARGIN * measured, blob))
        need = self.moe.top_k if policy == "lru" else 0
        try:
            return self._plan(budget, base, (kv, measured), margin=CACHE_MARGIN, reserve=reads * (per_expert + blob),
                              apart=2, need=need, lower=blob)
        except BudgetError:
            if not reads:
                raise
            return self._plan(budget, base, (kv, measured), margin=CACHE_MARGIN, apart=2, need=need, lower=blob)

    def _measure(self, bundle: Bundle) -> tuple[int, int, int]:
        """(KV cache, measured resident cost of one expert session, largest blob) in bytes."""
        base_anon = status().get("RssAnon", 0)
        kv = self.kv.nbytes
        n = self.moe.num_experts      # build one layer's experts, run them as prefill and decode do, measure
        probe = ExpertCache(bundle, capacity=n, policy="lru")
        io, oo = self.moe.expert_input, self.moe.expert_output
        for e in range(n):
            sess = probe.get(0, e)
            for rows in (PREFILL_CHUNK, 1):
                sess.run([oo], {io: np.zeros((rows, self.hidden), np.float32)})
        anon = status().get("RssAnon", 0)
        blob = max(x.size for x in self.moe.experts)
        per_expert = int((anon - base_anon) / n)
        probe.close()
        del probe
        return kv, per_expert, blob

    def _plan(self, budget: int, base: int, measured: tuple[int, int], *, margin: float, reserve: int = 0,
              apart: int = 0, need: int = 0, lower: int = 0) -> MemoryPlan:
        """Size the expert cache so that the model stays under `budget` bytes of its own. `reserve`:
        bytes kept for reading ahead; `apart`: experts held beside the cache (the session path's
        run-once misses); `need`: the least capacity that works."""
        kv, measured_expert = measured
        per_expert = int(max(margin * measured_expert, lower))
        # the fused graph holds every expert once, prepacked as a session holds it, and never evicts;
        # its load peaks above its steady RSS by about what the stages' load did (the tied head's
        # packing: SmolMoE int4 22 MB, as SmolLM2's), so the larger of that and the headroom
        # (SmolMoE int4 at context 256: 672 MB against 710 MB for every expert in the cache; the fused
        # graph peaks at 616 MB RSS and ran at 116 tok/s in a cgroup of 672 MB)
        fused = base + kv + max(HEADROOM, self._load_transient) + len(self.moe.experts) * max(measured_expert, lower)
        capacity = max(0, (budget - base - kv - HEADROOM - reserve) // per_expert - apart)
        plan = MemoryPlan(budget, base, kv, HEADROOM, per_expert, capacity, fused, reserve, apart + need)
        if budget < plan.minimum:
            raise BudgetError(f"memory budget {budget / 2**20:.0f} MB is too small for this model at context "
                              f"{self.context_length}: it needs at least {plan.minimum / 2**20:.0f} MB "
                              f"({plan.describe()}); raise the budget or lower the context length")
        return plan

    def close(self) -> None:
        """Drop every session and stop the read-ahead thread."""
        self.experts.close()
        self.stages = []

    def reset(self) -> None:
        self.rewind(0)

    def rewind(self, position: int) -> None:
        """Keep the first `position` cached tokens and forget the rest (the prompt cache)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: {self.position} tokens are cached")
        self.position = position
        self.writes += 1
        if self.plan is not None:
            # embedding rows each generation gathered stay mapped and count against the budget
            self.release_pages()
            trim_heap()                        # and the heap pages evicted sessions left free

    def release_pages(self) -> None:
        """Drop the bundle's file pages from RSS (they fault back from the page cache if read again). ~1 ms."""
        for path in self._data_files:
            release_file_pages(path)

    def room(self) -> int:
        return self.context_length - self.position

    def _mix(self, layer: int, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Σ_k w_k · expert_k(x) per token; x [T, H], logits [T, E] -> [T, H]."""
        ids, w = route(logits, self.routing, self._biases[layer])
        if self.experts.prefetcher is not None:
            self.experts.prefetcher.at(layer)
            self.experts.prefetcher.want((layer, np.unique(ids)))        # read misses while we read others
        out = np.zeros_like(x)
        io = self.moe.expert_input
        if x.shape[0] == 1:                                   # decode: no gathering needed
            for e, wk in zip(ids[0], w[0]):
                if wk:
                    out += wk * self.experts.run(layer, int(e), {io: x})
            return out
        for e in np.unique(ids[w > 0])[::-1]:             # the prefetcher reads from the other end
            tok, k = np.nonzero((ids == e) & (w > 0))
            y = self.experts.run(layer, int(e), {io: x[tok]})
            np.add.at(out, tok, w[tok, k][:, None] * y)
        return out

    def _bind_decode(self) -> None:
        """Bind every stage to the one-token buffers (residual, and the hidden state a dense layer's
        stage writes, ping-pong between two arrays so a stage never reads and writes the same one).
        An MoE layer's experts add up into `hidden`."""
        v = self._v
        res = [v["residual"], v["residual2"]]
        src = "hidden"                                  # where the hidden state the next stage reads is
        for i, st in enumerate(self.stages[:-1]):
            feeds = dict(self._vstep, input_ids=self._vids) if i == 0 else \
                dict(self._vstep, hidden=v[src], residual=res[(i - 1) % 2])
            if self._moe_layer[i] is None:
                src = "hidden2" if src == "hidden" else "hidden"
                outs = {"hidden": v[src], "residual": res[i % 2]}
            else:
                src = "hidden"
                outs = {"moe_in": v["x3"], "residual": res[i % 2], "router_logits": v["logits"]}
            if "moe_shared" in st.spec.outputs:
                outs["moe_shared"] = v["shared"]
            st.bind(feeds, outs)
        last = len(self.stages) - 2
        self.stages[-1].bind({"hidden": v[src], "residual": res[last % 2], "logits_positions": self._vpos},
                             {"logits": v["out"]})
        self._decode_bound = True

    def _step1(self, token: int) -> np.ndarray:
        """One-token forward on pre-bound buffers."""
        if not self._decode_bound:
            self._bind_decode()
        self._ids1[0, 0] = token
        b, K, routing, at = self._b, self.moe.top_k, self.routing, self.position
        hidden, logits = b["hidden"][0, 0], b["logits"][0]                   # logits [1, E]
        guesser, pf = self.guesser, self.experts.prefetcher
        guesses = []
        for i, st in enumerate(self.stages[:-1]):
            st.run_bound(at, 1)
            layer = self._moe_layer[i]
            if layer is None:                                 # a dense layer: done inside its stage
                continue
            top, w = route_one(logits[0], routing, self._biases[layer])
            if guesser is not None:
                guesser.check(layer, top)
                guesses = guesser.guess(layer, b["x"][0])
            if pf is not None:                                # a miss of this layer is read there while we read
                pf.at(layer)                                  # the other, and the guesses for the next layers
                pf.want((layer, top), *guesses)               # while these run
            for k in reversed(range(K)):      # the reader takes a first miss while we read the last
                if w[k]:
                    self.experts.run_bound(layer, int(top[k]), self._v["x"], self._vy[k], key=k)
            np.multiply(self._y[0][0], w[0], out=hidden)
            for k in range(1, K):
                if w[k]:
                    hidden += w[k] * self._y[k][0]
            if self._shared[i]:
                hidden += b["shared"][0, 0]
        self.stages[-1].run_bound(at, 1)
        return b["out"][0]

    def forward(self, ids, *, all_logits: bool = False) -> np.ndarray:
        self.writes += 1                    # the cache changed (the prompt cache checks this)
        ids, total = step_ids(ids, self.position, self.context_length)
        s = ids.shape[1]
        if s > self.prefill_chunk:
            return in_chunks(self.forward, ids, self.prefill_chunk, all_logits)
        self._seqlens[0] = total - 1
        self._total[...] = total
        if s == 1 and not all_logits:
            out = self._step1(int(ids[0, 0]))
            self.position = total
            return out
        self._decode_bound = False          # the prompt path rebinds the stages
        step = {"seqlens_k": self._seqlens, "total_sequence_length": self._total}
        hidden = residual = None
        H, E = self.hidden, self.moe.num_experts
        for layer, st in enumerate(self.stages[:-1]):
            feeds = dict(step, input_ids=ids) if layer == 0 else dict(step, hidden=hidden, residual=residual)
            residual = np.empty((1, s, H), np.float32)
            if self._moe_layer[layer] is None:               # a dense layer: its stage writes the hidden state
                hidden = np.empty((1, s, H), np.float32)
                st.run(feeds, {"hidden": hidden, "residual": residual}, self.position, s)
                continue
            moe_in = np.empty((1, s, H), np.float32)
            logits = np.empty((1, s, E), np.float32)
            outs = {"moe_in": moe_in, "residual": residual, "router_logits": logits}
            if "moe_shared" in st.spec.outputs:
                outs["moe_shared"] = shared = np.empty((1, s, H), np.float32)
            st.run(feeds, outs, self.position, s)
            hidden = self._mix(self._moe_layer[layer], moe_in[0], logits[0])[None]        # [1, S, H]
            if "moe_shared" in outs:
                hidden += shared
        positions = np.arange(s, dtype=np.int64) if all_logits else np.array([s - 1], np.int64)
        out = np.empty((1, positions.size, self.vocab_size), np.float32)
        self.stages[-1].run({"hidden": hidden, "residual": residual, "logits_positions": positions}, {"logits": out},
                            self.position, s)
        self.position = total
        return out[0]
