"""Expert slots: expert sessions made once at load whose packed weights live in memory the runtime
owns, so that a cache miss is one read of the expert's packed record into a slot: no new session,
no prepacking, no memory allocated or freed.

onnxruntime can save a session's prepacked weights beside its model (edge/store.py does that for
every expert, on the device: `edge prepare`). A session made from such a model memory-maps the
packed bytes from the model's data file and reads them in place at run time. Right after a slot's
session is made, the runtime maps its own shared memory (one memfd for every slot) over those
mappings, at the same addresses (MAP_FIXED): from then on the session computes whichever expert's
record was last read into its slot. The mapping never changes again (a remap would cost every core
running the model a TLB flush), so a slot's pages are populated once and reused.

    records.bin ──one O_DIRECT preadv per miss──► memfd, slot i ◄── mapped where onnxruntime reads

Only the pages a session reads at run time are ever written (the record); the rest of a slot stays
a hole and costs nothing. Slot pages are shared memory: they count in RSS (RssShmem) and in the
process's memory cgroup, once. This relies on onnxruntime behaviour it does not document, so the
runtime checks it at load (self_test) and otherwise builds a session per miss. Linux only.

(Slots could also be stripes of one QMoE session per layer, the fused graph's kernel: exact, and 25%
less decode compute with every expert resident on SmolMoE; but an expert's stripe has a fixed place
in its layer, so each miss must re-point page tables, and the TLB flushes that costs the decode's
cores (+1 ms a token per 1000 remaps a second, measured) made it slower under a budget. See
docs/benchmarks.md.)
"""
from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import open_session, pooled_options
from .errors import EdgeError
from .memory import _libc

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10                       # Linux, every architecture edge runs on


class SlotError(EdgeError):
    """Expert slots cannot work here (no memfd, onnxruntime did not map its packed weights, a
    swapped expert computed something else): the runtime falls back to a session per miss."""


@dataclass(frozen=True)
class Mapping:
    address: int
    length: int
    offset: int                         # in the mapped file


def mappings(path) -> list[Mapping]:
    """This process's mappings of `path` (/proc/self/maps)."""
    target = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append(Mapping(lo, hi - lo, int(parts[2], 16)))
    return out


def new_session_mappings(path, make):
    """(what `make()` returns, the mappings of `path` that appeared while it ran)."""
    before = set(mappings(path))
    made = make()
    return made, [m for m in mappings(path) if m not in before]


def _mmap():
    libc = _libc()
    if libc is None or not hasattr(os, "memfd_create"):
        raise SlotError("expert slots need Linux (memfd_create)")
    f = libc.mmap
    f.restype = ctypes.c_void_p
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return f


class SlotMemory:
    """One memfd for every slot: slot i holds the template data file's layout at [i * span, (i+1) * span),
    so a mapping of file offset o is backed by memfd offset i * span + o. Unwritten pages are holes."""

    def __init__(self, count: int, span: int, name: str = "edge-expert-slots"):
        self._mmap = _mmap()
        self.span = -(-span // PAGE) * PAGE
        self.count = count
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, count * self.span)

    def overlay(self, index: int, maps: list[Mapping]) -> None:
        """Back `maps` (a session's mappings of the template data) with slot `index`, at the same addresses."""
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED
        for m in maps:
            got = self._mmap(m.address, m.length, prot, flags, self.fd, index * self.span + m.offset)
            if got != m.address:
                raise SlotError(f"could not map slot memory over onnxruntime's weights (errno {ctypes.get_errno()})")

    def write(self, index: int, offset: int, data: bytes) -> None:
        """Write template-file bytes at `offset` of slot `index` (the store's probes; the runtime reads records)."""
        os.pwrite(self.fd, data, index * self.span + offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)            # the mappings keep the memory until their sessions go
            self.fd = -1


def views(maps: list[Mapping], spans) -> list[memoryview]:
    """Writable views of the memory behind file ranges `spans` ([(start, end)], page-aligned, in
    record order), cut from the mappings that cover them: the iovecs one read fills a slot with."""
    out = []
    ordered = sorted(maps, key=lambda m: m.offset)
    for lo, hi in spans:
        at = lo
        for m in ordered:
            if m.offset <= at < m.offset + m.length:
                end = min(m.offset + m.length, hi)
                out.append(memoryview((ctypes.c_char * (end - at)).from_address(m.address + at - m.offset)).cast("B"))
                at = end
                if at == hi:
                    break
        if at != hi:
            raise SlotError(f"onnxruntime did not map bytes {at}-{hi} of the packed template: it is not reading "
                            "the saved packed weights in place")
    return out


class Slot:
    """One expert session over slot memory (which expert it holds is the cache's business)."""
    __slots__ = ("index", "session", "views", "bindings")

    def __init__(self, index: int, session, views: list[memoryview]):
        self.index = index
        self.session = session
        self.views = views              # the record's pages, where onnxruntime reads them
        self.bindings = {}              # (x, y) buffer key -> IOBinding for one-token steps


class SlotPool:
    """Slots made from a packed store's template over one SlotMemory sized for up to `most` slots
    (a sparse memfd: only records read into slots take memory)."""

    def __init__(self, store, most: int):
        from .storage import BlobReader
        h = store.header
        self.store = store
        self.memory = SlotMemory(most, h.template_size)
        self.template = store.template_model()
        self.slots: list[Slot] = []
        self.reader = BlobReader(store.records, PAGE)          # O_DIRECT where the filesystem allows it

    def add(self, count: int) -> None:
        """Make slots until there are `count` (each a session that onnxruntime makes and validates: ~3 ms)."""
        folder = self.store.root
        while len(self.slots) < min(count, self.memory.count):
            i = len(self.slots)
            so = pooled_options()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            session, maps = new_session_mappings(folder / "template.data", lambda: open_session(
                folder / "template.onnx", so, model=self.template))
            slot_views = views(maps, self.store.header.record_spans)   # raises where onnxruntime copied
            self.memory.overlay(i, maps)
            self.slots.append(Slot(i, session, slot_views))

    def load(self, slot: Slot, index: int) -> int:
        """Read record `index` (the index-th expert of the manifest) into `slot`: one preadv; bytes read."""
        return self.reader.read_views(self.store.record_offset(index), slot.views, what=f"packed expert {index}")

    def close(self) -> None:
        self.slots = []                   # their sessions unmap the slot memory as they go
        self.memory.close()
        self.reader.close()


def probe_inputs(hidden: int, rows=(1, 64)) -> list[np.ndarray]:
    """Deterministic expert inputs [T, hidden] for the self-tests (a decode row, a prompt piece)."""
    rng = np.random.default_rng(20261206)
    return [rng.standard_normal((t, hidden)).astype(np.float32) for t in rows]


def self_test(pool: SlotPool, moe, *, hidden: int, graph_path: str | Path, blobs, keys) -> None:
    """Slot 0 must compute, bit for bit, what a session freshly built from the bundle's blob computes,
    for each expert of `keys` swapped into it in turn (a decode row, a prompt piece); SlotError
    otherwise. onnxruntime ignores a packed blob that does not match its kernel without a word, and a
    CPU whose kernels read more than the packed bytes would mix two experts: both show here.
    `blobs`: a BlobReader of the bundle's expert store."""
    from .experts import build_session
    entries = {(e.layer, e.expert): (i, e) for i, e in enumerate(moe.experts)}
    pool.add(1)
    slot = pool.slots[0]
    for key in keys:
        i, e = entries[key]
        pool.load(slot, i)
        fresh = build_session(moe, str(graph_path), blobs.read(e.offset, e.size, what=f"expert {key[0]}.{key[1]}"))
        for x in probe_inputs(hidden):
            feeds = {moe.expert_input: x}
            got = slot.session.run([moe.expert_output], feeds)[0]
            want = fresh.session.run([moe.expert_output], feeds)[0]
            if not np.array_equal(got, want):
                raise SlotError(f"expert {key[0]}.{key[1]} in a slot differs from its own session by up to "
                                f"{float(np.nanmax(np.abs(got - want))):.3g} on {len(x)} rows")
