"""Reading expert blobs from the bundle with honest I/O and clear errors.

Every read comes from the disk, not from RAM outside the memory budget: the file is opened
with O_DIRECT where the filesystem allows it (the page cache is bypassed); elsewhere (tmpfs,
some overlay filesystems, macOS) it is read normally and its pages are dropped from the page
cache right after. Blobs are 4 KiB-aligned in the file (see export/moe.py), which is what
O_DIRECT needs; the buffer is page-aligned and reused by every read.

pread, not mmap: a truncated file or a failing disk gives a BundleError that names the file
and offset, where a memory-mapped read would kill the process with SIGBUS.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BundleError

ALIGN = 4096


def _aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


class BlobReader:
    def __init__(self, path: Path, max_size: int):
        self.path = Path(path)
        self.direct = False
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            if hasattr(os, "O_DIRECT"):
                try:
                    self.fd = os.open(self.path, flags | os.O_DIRECT)
                    self.direct = True
                except OSError:
                    self.fd = os.open(self.path, flags)
            else:
                self.fd = os.open(self.path, flags)
        except OSError as e:
            raise BundleError(f"cannot open {self.path}: {e.strerror}") from None
        self.file_size = os.fstat(self.fd).st_size
        self.buf = _aligned_buffer(-(-max_size // ALIGN) * ALIGN)
        if self.direct and not self._probe():
            os.close(self.fd)
            self.fd = os.open(self.path, flags)
            self.direct = False

    def _probe(self) -> bool:
        """Some filesystems accept O_DIRECT at open and fail at read time (EINVAL)."""
        try:
            os.preadv(self.fd, [memoryview(self.buf[:ALIGN])], 0)
            return True
        except OSError:
            return False

    def read(self, offset: int, size: int, *, what: str = "blob", into: np.ndarray | None = None) -> np.ndarray:
        """Bytes [offset, offset + size) of the file, in the reader's buffer (valid until the next read)
        or in `into` (a buffer from `buffer()`)."""
        buf = self.buf if into is None else into
        where = f"{what} at offset {offset} ({size} bytes) of {self.path}"
        if size > buf.size or offset < 0:
            raise BundleError(f"{where}: larger than the manifest's largest blob")
        if offset + size > self.file_size:
            raise BundleError(f"{where}: the file has only {self.file_size} bytes; the bundle is truncated")
        span = -(-size // ALIGN) * ALIGN if self.direct else size
        view = memoryview(buf)[:span]
        done = 0
        try:
            while done < size:
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0 or (self.direct and done + n < size):   # O_DIRECT reads whole blocks or stop at the end
                    raise BundleError(f"{where}: the file ended after {done + n} bytes "
                                      f"(was it truncated while in use?)")
                done += n
        except OSError as e:
            raise BundleError(f"{where}: read failed: {e.strerror}") from None
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_DONTNEED)
        return buf[:size]

    def read_views(self, offset: int, views: list[memoryview], *, what: str = "record") -> int:
        """Fill `views` (page-aligned, whole pages) with the file's bytes from `offset` on, in order, with
        one preadv where the kernel allows (an expert slot's pages, wherever onnxruntime maps them)."""
        size = sum(v.nbytes for v in views)
        where = f"{what} at offset {offset} ({size} bytes) of {self.path}"
        if offset < 0 or offset + size > self.file_size:
            raise BundleError(f"{where}: the file has only {self.file_size} bytes; it is truncated")
        done, todo = 0, list(views)
        try:
            while todo:
                n = os.preadv(self.fd, todo, offset + done)
                if n == 0:
                    raise BundleError(f"{where}: the file ended after {done} bytes (was it truncated while in use?)")
                done += n
                while todo and n >= todo[0].nbytes:
                    n -= todo.pop(0).nbytes
                if todo and n:
                    todo[0] = todo[0][n:]
        except OSError as e:
            raise BundleError(f"{where}: read failed: {e.strerror}") from None
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_DONTNEED)
        return size

    def buffer(self) -> np.ndarray:
        """Another page-aligned buffer that `read(..., into=)` can fill (one blob's size)."""
        return _aligned_buffer(self.buf.size)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
