"""The packed expert store: onnxruntime's own prepacked bytes of every expert, made on the device by
`edge prepare` (or by the first budgeted load), so that expert slots (edge/slots.py) fill a miss with
one read.

    <store>/store.json      StoreHeader: the bundle, onnxruntime version and CPU it was made for, and
                            the byte ranges of the template's data that a session reads at run time
    <store>/template.onnx   the expert graph as onnxruntime saves it with its prepacked weights (the
    <store>/template.data   first expert's); every slot's session is made from it
    <store>/records.bin     one record per expert, in manifest order, `record_size` bytes each (page
                            aligned): those byte ranges of that expert's saved data, back to back

The packed layout depends on the CPU (AVX2 and AVX-512 pack differently, ARM has its own) and on the
onnxruntime version, so the store is made where it runs and made again when either changes. What a
session reads at run time is measured, not assumed: each page range of the template that onnxruntime
maps is zeroed in turn under a new session's mappings, and the ranges whose zeroing changes the
expert's output make the record (x86-64 and ARM with dot-product instructions: the packed weights,
which carry their scales, and the page holding the graph's one constant).

Where it lives: `BUNDLE/packed/` when the bundle folder is writable, else
`$XDG_CACHE_HOME/edge/packed/<bundle id>` (~/.cache by default), or where `expert_store=` / `--store`
says. It is built in a temporary folder beside that place and renamed into it when complete.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .engine import open_session, pooled_options
from .errors import StoreError
from .experts import expert_values
from .memory import _libc
from .progress import Progress, quiet
from .saved_layout import blobs
from .schema import from_dict, to_dict
from .slots import PAGE, SlotError, SlotMemory, new_session_mappings, probe_inputs
from .storage import BlobReader

FORMAT = 1
_ISA = re.compile(r"^(sse\d\w*|ssse3|avx\w*|fma\w*|f16c|amx\w*|asimd\w*|sve\w*|sme(\d\w*)?|i8mm|bf16|dotprod|fphp|fp16\w*)$")


@dataclass(frozen=True)
class StoreHeader:
    format: int
    bundle: str                                  # bundle_identity(): the expert weights and graph it packs
    onnxruntime: str                             # the version that packed them
    cpu: str                                     # cpu_signature(): machine and the ISA features that decide packing
    experts: int                                 # records, in the manifest's expert order
    template_size: int                           # bytes of template.data
    record_size: int                             # bytes per record (page aligned)
    record_spans: tuple[tuple[int, int], ...]    # template.data byte ranges [start, end) a record holds, in order


def bundle_identity(bundle: Bundle) -> str:
    """sha256 over what the packed bytes derive from: the expert graph and the expert store (their
    sha256 from the manifest), and how experts lie in it."""
    m = bundle.manifest
    sums = {f.path: f.sha256 for f in m.files}
    what = [sums.get(m.moe.expert_graph), sums.get(m.moe.expert_file), to_dict(m.moe.expert_tensors),
            [(e.layer, e.expert, e.offset, e.size) for e in m.moe.experts]]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def cpu_signature() -> str:
    """The machine and its ISA extensions, which decide onnxruntime's packed layout: /proc/cpuinfo's
    flags (x86) or Features (ARM), and the kernel's hardware capability words (getauxval AT_HWCAP and
    AT_HWCAP2), which is what onnxruntime reads on ARM and what an emulator reports truly."""
    flags = set()
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        for line in block.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = {f for f in value.split() if _ISA.match(f)}
    except OSError:
        pass
    hwcap = ""
    getauxval = getattr(_libc(), "getauxval", None)
    if getauxval is not None:
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        hwcap = f":hwcap={getauxval(16):x},{getauxval(26):x}"          # AT_HWCAP, AT_HWCAP2
    return f"{platform.machine()}:{','.join(sorted(flags))}{hwcap}"


def default_location(bundle: Bundle) -> Path:
    """BUNDLE/packed when the bundle folder is writable, else the user's cache folder."""
    if os.access(bundle.root, os.W_OK):
        return bundle.root / "packed"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edge" / "packed" / bundle_identity(bundle)[:16]


@dataclass(frozen=True)
class Store:
    root: Path
    header: StoreHeader

    @property
    def records(self) -> Path:
        return self.root / "records.bin"

    def template_model(self) -> bytes:
        return (self.root / "template.onnx").read_bytes()

    def record_offset(self, index: int) -> int:
        return index * self.header.record_size


def open_store(bundle: Bundle, location: Path) -> tuple[Store | None, str]:
    """(the store at `location`, "") when it was made for this bundle, onnxruntime and CPU;
    (None, why not) otherwise."""
    path = location / "store.json"
    if not path.is_file():
        return None, "there is none yet"
    try:
        header = from_dict(StoreHeader, json.loads(path.read_text()), "store.json")
    except (ValueError, OSError) as e:                   # ConfigError is a ValueError
        return None, f"its header is unreadable ({e})"
    for what, have, want in (("format", header.format, FORMAT), ("bundle", header.bundle, bundle_identity(bundle)),
                             ("onnxruntime", header.onnxruntime, ort.__version__), ("CPU", header.cpu, cpu_signature()),
                             ("expert count", header.experts, len(bundle.manifest.moe.experts))):
        if have != want:
            return None, f"it was made for another {what} ({have}, this is {want})"
    sizes = {"template.onnx": None, "template.data": header.template_size,
             "records.bin": header.experts * header.record_size}
    for name, size in sizes.items():
        p = location / name
        if not p.is_file() or (size is not None and p.stat().st_size != size):
            return None, f"{name} is missing or truncated"
    return Store(location, header), ""


@dataclass(frozen=True)
class PrepareReport:
    store: Store
    built: bool              # False: a matching store was already there
    reason: str              # why it was (re)built
    seconds: float
    bytes: int               # on disk


def prepare(bundle: Bundle, location: Path | None = None, *, force: bool = False,
            progress: Progress = quiet) -> PrepareReport:
    """The packed expert store for `bundle` on this machine: the one at `location` (default_location)
    when it matches, else made anew there (atomically; a full disk is a StoreError and leaves nothing)."""
    if bundle.manifest.moe is None:
        raise StoreError(f"{bundle.root} is a dense model: it has no experts to pack")
    location = Path(location) if location is not None else default_location(bundle)
    t0 = time.perf_counter()
    store, why = open_store(bundle, location)
    if store is not None and not force:
        return PrepareReport(store, False, "", time.perf_counter() - t0, _disk_bytes(location))
    reason = "asked to (force)" if store is not None else why
    try:
        location.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{location.name}.tmp-", dir=location.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)                          # mkdtemp's 0700 would hide it from other users
    except OSError as e:
        raise StoreError(f"cannot write the packed expert store in {location.parent} ({e.strerror}): "
                         "point expert_store= (--store) at a writable folder") from None
    try:
        _build(bundle, tmp, progress)
        _commit(tmp, location)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"the disk holding {location.parent} is full: the packed expert store needs about "
                             f"{_estimate(bundle) / 2**20:.0f} MB; free some space or point expert_store= "
                             "(--store) elsewhere") from None
        raise StoreError(f"cannot write the packed expert store in {location.parent} ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store, why = open_store(bundle, location)
    if store is None:
        raise StoreError(f"the packed expert store just made in {location} does not check: {why}")
    return PrepareReport(store, True, reason, time.perf_counter() - t0, _disk_bytes(location))


def _commit(tmp: Path, location: Path) -> None:
    """Rename the finished store into place, replacing an outdated one; a store another process
    finished meanwhile wins (ours is dropped)."""
    old = None
    if location.exists():
        old = location.with_name(f".{location.name}.old-{os.getpid()}")
        os.rename(location, old)
    try:
        os.rename(tmp, location)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _disk_bytes(location: Path) -> int:
    return sum(p.stat().st_size for p in location.iterdir() if p.is_file())


def _estimate(bundle: Bundle) -> int:
    """Bytes the store will take, before it is made (a record: ~1.2x a block-64 int4 blob; kept generous)."""
    blob = max(x.size for x in bundle.manifest.moe.experts)
    return int(len(bundle.manifest.moe.experts) * 1.35 * blob + 4 * blob)


def _save_packed(bundle: Bundle, blob: np.ndarray, folder: Path) -> tuple[bytes, bytes]:
    """Let onnxruntime save the expert graph with `blob`'s weights and its prepacked copies of them:
    (model bytes, data bytes). add_external_initializers, not add_initializer: onnxruntime 1.32 saves
    the tensors add_initializer hands over as garbage where it keeps them unpacked."""
    moe = bundle.manifest.moe
    names, values, keep = expert_values(moe, blob)
    so = pooled_options()
    so.add_external_initializers(names, values)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "template.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    so.optimized_model_filepath = str(folder / "template.onnx")
    open_session(bundle.path(moe.expert_graph), so)
    del keep
    return (folder / "template.onnx").read_bytes(), (folder / "template.data").read_bytes()


def _runtime_spans(bundle: Bundle, folder: Path, data: bytes) -> list[tuple[int, int]]:
    """The page ranges of template.data that a session made from the template reads at run time: each
    range onnxruntime maps is zeroed in turn, under a new session's mappings (a kernel may keep what it
    derives from its weights at its first run), and kept when that changes the expert's output on a
    probe (or makes it fail)."""
    moe = bundle.manifest.moe
    so = pooled_options()
    so.log_severity_level = 4                # zeroed shapes make onnxruntime log errors: expected here
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    make = lambda: open_session(folder / "template.onnx", so)
    session, maps = new_session_mappings(folder / "template.data", make)
    if not maps:
        raise SlotError("onnxruntime did not map the saved packed weights: expert slots cannot work with it")
    end = -(-len(data) // PAGE) * PAGE
    covered = sorted({(m.offset, min(m.offset + m.length, end)) for m in maps})
    cuts = sorted({x for span in covered for x in span})
    segments = [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if any(a <= lo and hi <= b for a, b in covered)]
    probes = probe_inputs(bundle.manifest.model.hidden_size, rows=(1, 2, 7, 64))
    memory = SlotMemory(1 + len(segments), end, name="edge-prepare")
    sessions = [session]

    def outputs(region: int, zeroed: tuple[int, int] | None):
        """The first outputs of a session over `region`, which holds the template with `zeroed` zeroed."""
        if region:
            s, m = new_session_mappings(folder / "template.data", make)
            sessions.append(s)
        else:
            s, m = session, maps
        memory.overlay(region, m)
        for lo, hi in covered:
            memory.write(region, lo, data[lo:hi])
        if zeroed:
            memory.write(region, zeroed[0], bytes(zeroed[1] - zeroed[0]))
        try:
            return [s.run([moe.expert_output], {moe.expert_input: x})[0] for x in probes]
        except Exception:  # noqa: BLE001 - a zeroed shape or index makes onnxruntime fail: it was read
            return None
    try:
        base = outputs(0, None)
        read = []
        for n, (lo, hi) in enumerate(segments, 1):
            now = outputs(n, (lo, hi))
            if now is None or any(not np.array_equal(a, b) for a, b in zip(now, base)):
                read.append((lo, hi))
    finally:
        sessions.clear()
        del session
        memory.close()
    spans = []
    for lo, hi in read:                                   # merge touching ranges: fewer iovecs
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    packed = [(b.offset, b.offset + b.length) for b in blobs((folder / "template.onnx").read_bytes()) if b.packed]
    if not any(lo < b and a < hi for lo, hi in spans for a, b in packed):
        raise SlotError("no packed weight onnxruntime saved changes the expert's output: it is not reading them in place")
    return spans


def _scratch(near: Path) -> Path:
    """A folder for onnxruntime's per-expert saves: in RAM (/dev/shm) when it has room, sparing the disk."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 64 << 20:
            return Path(tempfile.mkdtemp(prefix="edge-prepare-", dir=shm))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix=".scratch-", dir=near))


def _layout(model: bytes) -> list[tuple[int, int]]:
    """Where a saved model's weights and their packed copies lie in its data file."""
    return [(b.offset, b.length) for b in blobs(model)]


def _build(bundle: Bundle, out: Path, progress: Progress) -> None:
    moe = bundle.manifest.moe
    reader = BlobReader(bundle.path(moe.expert_file), max(x.size for x in moe.experts))
    scratch = _scratch(out)
    try:
        first = moe.experts[0]
        model, data = _save_packed(bundle, reader.read(first.offset, first.size, what="expert 0.0"), out)
        spans = _runtime_spans(bundle, out, data)
        record_size = sum(hi - lo for lo, hi in spans)
        need = len(moe.experts) * record_size
        free = shutil.disk_usage(out).free
        if free < need + (16 << 20):
            raise OSError(errno.ENOSPC, f"{need >> 20} MB needed, {free >> 20} MB free")
        layout = (len(data), _layout(model))
        progress(0, len(moe.experts))
        with open(out / "records.bin", "wb") as f:
            for i, e in enumerate(moe.experts):
                blob = reader.read(e.offset, e.size, what=f"expert {e.layer}.{e.expert}")
                m, d = _save_packed(bundle, blob, scratch)
                if (len(d), _layout(m)) != layout:
                    raise SlotError(f"onnxruntime packed expert {e.layer}.{e.expert} in another layout than the first")
                d = d.ljust(spans[-1][1], b"\0")
                f.write(b"".join(d[lo:hi] for lo, hi in spans))
                progress(i + 1, len(moe.experts))
            f.flush()
            os.fsync(f.fileno())
        header = StoreHeader(format=FORMAT, bundle=bundle_identity(bundle), onnxruntime=ort.__version__,
                             cpu=cpu_signature(), experts=len(moe.experts), template_size=len(data),
                             record_size=record_size, record_spans=tuple(spans))
        with open(out / "store.json", "w") as f:
            f.write(json.dumps(to_dict(header), indent=1))
            f.flush()
            os.fsync(f.fileno())
    finally:
        reader.close()
        shutil.rmtree(scratch, ignore_errors=True)
