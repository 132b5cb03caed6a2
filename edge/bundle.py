"""Open a bundle folder safely: every path stays inside it, sizes are checked on load and
sha256 sums on request (`edge inspect --verify`)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .manifest import MANIFEST_NAME, Manifest


def safe_path(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths, `..` and symlinks that lead outside `root`."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
        raise BundleError(f"unsafe path {rel!r} in bundle {root}: refusing to load it")
    p = root / rel
    real_root = root.resolve()
    try:
        p.resolve().relative_to(real_root)
    except ValueError:
        raise BundleError(f"path {rel!r} in bundle {root} leads outside the bundle: refusing to load it") from None
    return p


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        return safe_path(self.root, rel)

    def verify(self) -> list[str]:
        """Check every file's sha256; return the problems found (empty when intact)."""
        problems = []
        for f in self.manifest.files:
            p = self.path(f.path)
            if not p.is_file():
                problems.append(f"{f.path}: missing")
            elif p.stat().st_size != f.size:
                problems.append(f"{f.path}: size {p.stat().st_size} != {f.size}")
            elif sha256_file(p) != f.sha256:
                problems.append(f"{f.path}: sha256 mismatch")
        return problems


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Read and check a bundle's manifest and the sizes of its files (cheap; no hashing)."""
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle {root} does not exist")
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle folder (make one with `edge export`)")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}: not an edge bundle, or an export that did not finish")
    if mpath.is_symlink():
        raise BundleError(f"{mpath} is a symlink: refusing to load it")
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8", errors="replace"))
    bundle = Bundle(root, manifest)
    paths = [bundle.path(f.path) for f in manifest.files]          # refuses unsafe paths first
    listed = {f.path for f in manifest.files}
    needed_files = [manifest.tokenizer.file, manifest.tokenizer.chat_template]
    if manifest.graph is not None:
        needed_files.append(manifest.graph.file)
    if manifest.embedding is not None:
        needed_files.append(manifest.embedding.file)
    if manifest.speech is not None:
        sp = manifest.speech
        needed_files += [sp.encoder, sp.decoder, sp.mel_filters]
    if manifest.moe is not None:
        needed_files += [st.file for st in manifest.moe.stages] + [manifest.moe.expert_graph, manifest.moe.expert_file]
    for needed in needed_files:
        if needed and needed not in listed:
            raise BundleError(f"manifest does not list {needed!r}: the bundle is corrupt, export it again")
    for f, p in zip(manifest.files, paths):
        if not p.is_file():
            raise BundleError(f"bundle file {f.path} is missing from {root}: copy the whole bundle folder")
        size = p.stat().st_size
        if size != f.size:
            raise BundleError(f"bundle file {f.path} is {size} bytes, the manifest says {f.size}: "
                              "the copy is truncated or corrupt (check with `edge inspect --verify`)")
    return bundle
