"""Process memory: what is resident, and giving back weight-file pages nobody reads any more.

onnxruntime memory-maps a model's external data file. Weights it prepacks (MatMulNBits) are
copied into its own buffers, and the original pages it read while packing stay mapped, counted
in our RSS although they are never read again (for int4 block-32 weights: the fp32 scales,
~12% of the bytes). `release_file_pages` drops our mapping's pages of that file; anything that
is still used (embedding rows, rotary tables) simply faults back in from the page cache.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (None off Linux, where none of this applies)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def status() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile, RssShmem (expert slots) of this process in bytes (Linux;
    empty elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f)
                    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")}
    except OSError:
        return {}


def _dontneed(start: int, length: int) -> bool:
    """madvise(MADV_DONTNEED) on [start, start + length) (start page-aligned): clean file pages
    leave this process's RSS and fault back in from the page cache if read again."""
    return _libc().madvise(start, length, _MADV_DONTNEED) == 0


def release_file_pages(path: str | os.PathLike) -> int:
    """Drop every mapping of `path` in this process from RSS; returns how many."""
    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target and parts[1].startswith("r"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                n += _dontneed(start, end - start)
    return n


def return_freed_memory(threshold: int = 256 << 10) -> bool:
    """glibc: serve every allocation of `threshold` bytes or more from its own mapping, returned to
    the OS when freed. glibc otherwise raises that threshold after the first large free, and the
    prepacked weights of evicted expert sessions then stay in its heap as free but resident memory
    (SmolMoE int4 under a 720 MB budget: RSS 755 MB, of which 124 MB free heap; with this: 620 MB).
    Process-wide; a no-op elsewhere."""
    mallopt = getattr(_libc(), "mallopt", None)        # musl and others have none
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, threshold))


def reset_peak() -> bool:
    """Linux: restart VmHWM (the peak RSS) from the current RSS, so that the peak of what follows can be
    read from status(). A no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """glibc: give the heap's free pages back to the OS (malloc_trim). Building and dropping
    hundreds of expert sessions leaves small free chunks scattered through the heap; SmolMoE under
    a 460 MB budget: ~12 MB back, ~2 ms. A no-op elsewhere."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    return bool(malloc_trim and malloc_trim(0))
