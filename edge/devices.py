"""Device profiles (devices/<name>.toml, format in devices/README.md) and detection of this host:
`get("name[:variant][:storage]")` resolves a profile into a `Device` (RAM, cores, ISA features, storage
read speed, onnxruntime providers, OS headroom); `detect()` describes this host the same way, measured."""
from __future__ import annotations

import importlib.resources
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, EdgeError, UnsupportedError
from .schema import from_dict, to_dict

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10: tomli, if it is installed
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

FEATURES = {"aarch64": ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme"),
            "x86_64": ("avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx")}
STORAGE_KINDS = ("sd", "emmc", "ufs", "nvme", "usb-ssd", "sata-ssd")
PROVIDERS = ("CPUExecutionProvider", "XnnpackExecutionProvider", "NnapiExecutionProvider", "QNNExecutionProvider",
             "CUDAExecutionProvider", "TensorrtExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider",
             "OpenVINOExecutionProvider", "ROCMExecutionProvider", "ACLExecutionProvider", "WebGpuExecutionProvider")
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
# /proc/cpuinfo flags (x86) and Features (arm64) -> FEATURES names; arm64 "CPU part" -> core name
_FLAGS = {**{f: f for f in FEATURES["x86_64"] + FEATURES["aarch64"] if f not in ("neon", "fp16", "dotprod", "amx")},
          "avx512vnni": "avx512_vnni", "amx_tile": "amx", "asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod"}
_ARM_PARTS = {"0xd03": "A53", "0xd05": "A55", "0xd08": "A72", "0xd0b": "A76", "0xd41": "A78", "0xd42": "A78AE",
              "0xd4b": "A78C", "0xd46": "A510", "0xd47": "A710", "0xd4d": "A715", "0xd80": "A520", "0xd81": "A720"}


@dataclass(frozen=True)
class Cluster:
    """`count` identical cores; `ghz` their maximum clock (0: unknown, detected hosts only)."""
    core: str
    count: int
    ghz: float


@dataclass(frozen=True)
class Variant:
    """One RAM configuration of a board, addressed as "<profile>:<name>"."""
    name: str
    ram_mb: int
    description: str = ""


@dataclass(frozen=True)
class Storage:
    """Where bundles live: sequential read bandwidth with a cold page cache."""
    name: str
    kind: str                    # one of STORAGE_KINDS
    read_mb_s: float
    description: str = ""


@dataclass(frozen=True)
class Profile:
    """One devices/<name>.toml file, checked when it is built."""
    name: str
    description: str
    arch: str
    clusters: tuple[Cluster, ...]
    features: tuple[str, ...]
    providers: tuple[str, ...]
    headroom_mb: int
    decode_speed_estimate: float
    default_variant: str
    default_storage: str
    variants: tuple[Variant, ...]
    storage: tuple[Storage, ...]

    def __post_init__(self):
        known = FEATURES.get(self.arch, ())
        variants, options = [v.name for v in self.variants], [s.name for s in self.storage]
        checks = [
            (_NAME.match(self.name), f"name {self.name!r}: use lowercase letters, digits, '-' and '.'"),
            (self.arch in FEATURES, f"arch {self.arch!r} is not one of {', '.join(FEATURES)}"),
            (set(self.features) <= set(known), f"features {', '.join(sorted(set(self.features) - set(known)))} "
                                               f"unknown for {self.arch} (known: {', '.join(known)})"),
            (set(self.providers) <= set(PROVIDERS), f"unknown provider(s) "
             f"{', '.join(sorted(set(self.providers) - set(PROVIDERS)))} (known: {', '.join(PROVIDERS)})"),
            ("CPUExecutionProvider" in self.providers, "providers must include CPUExecutionProvider"),
            (self.clusters and all(c.count > 0 and c.ghz > 0 for c in self.clusters),
             "clusters: at least one, each with count > 0 and ghz > 0"),
            (self.decode_speed_estimate > 0, "decode_speed_estimate must be > 0"),
            (variants and options and all(_NAME.match(n) for n in variants + options)
             and len(set(variants + options)) == len(variants + options), "at least one variant and one storage "
             f"option are needed, all named by distinct lowercase words: {', '.join(variants + options)}"),
            (all(v.ram_mb > self.headroom_mb >= 0 for v in self.variants),
             "headroom_mb must be >= 0 and below every variant's ram_mb"),
            (all(s.kind in STORAGE_KINDS and s.read_mb_s > 0 for s in self.storage),
             f"storage: kind must be one of {', '.join(STORAGE_KINDS)} and read_mb_s > 0"),
            (self.default_variant in variants, f"default_variant {self.default_variant!r} is not one of the variants"),
            (self.default_storage in options, f"default_storage {self.default_storage!r} is not a storage option"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def resolve(self, variant: str | None = None, storage: str | None = None) -> "Device":
        """This board with one RAM variant and one storage option (the defaults where None)."""
        variants, options = {v.name: v for v in self.variants}, {s.name: s for s in self.storage}
        v, s = variants.get(variant or self.default_variant), options.get(storage or self.default_storage)
        if v is None or s is None:
            what, value = ("variant", variant) if v is None else ("storage", storage)
            raise ConfigError(f"device {self.name} has no {what} {value!r}: variants {', '.join(variants)}; "
                              f"storage {', '.join(options)}")
        return Device(name=f"{self.name}:{v.name}:{s.name}", description=self.description, arch=self.arch,
                      ram_mb=v.ram_mb, headroom_mb=self.headroom_mb, cores=sum(c.count for c in self.clusters),
                      clusters=self.clusters, features=tuple(f for f in FEATURES[self.arch] if f in self.features),
                      storage=s.name, storage_kind=s.kind, storage_read_mb_s=s.read_mb_s, providers=self.providers,
                      decode_speed_estimate=self.decode_speed_estimate, source="profile")


@dataclass(frozen=True)
class Device:
    """One concrete machine, from a profile (`get`) or measured on this host (`detect`)."""
    name: str                    # "raspberry-pi-5:8gb:sd" (get accepts it back), or "host"
    description: str
    arch: str
    ram_mb: int                  # detected: MemTotal, or a smaller cgroup memory limit
    headroom_mb: int             # RAM to leave to the OS (detected: what was in use at detection)
    cores: int                   # profiles: physical cores; detected: CPUs this process may run on
    clusters: tuple[Cluster, ...]
    features: tuple[str, ...]
    storage: str
    storage_kind: str            # one of STORAGE_KINDS; detected: the folder's filesystem type
    storage_read_mb_s: float | None       # None: not measured
    providers: tuple[str, ...]
    decode_speed_estimate: float | None   # rough CPU decode speed vs the reference x86 host; None: unknown
    source: str                  # "profile" or "detected"

    @property
    def usable_mb(self) -> int:            # RAM left for the model
        return max(0, self.ram_mb - self.headroom_mb)

    def as_dict(self) -> dict:
        """JSON-ready description (tuples become lists), with usable_mb."""
        return {**to_dict(self), "usable_mb": self.usable_mb}


def load_profile(path: str | os.PathLike, where: str | None = None) -> Profile:
    """Read and check one profile file; errors name `where` (default: the path) and the key."""
    where, path = where or str(path), Path(path) if isinstance(path, (str, os.PathLike)) else path
    if tomllib is None:
        raise UnsupportedError("reading device profiles needs Python 3.11+ or `pip install tomli`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    profile = from_dict(Profile, data, where)
    if path.name != f"{profile.name}.toml":
        raise ConfigError(f"{where}: profile {profile.name!r} must be in a file named {profile.name}.toml")
    return profile


def list_profiles() -> list[Profile]:
    """Every profile shipped in the `devices` package, checked, sorted by name."""
    import devices
    try:
        roots = [importlib.resources.files(devices)]
    except NotADirectoryError:       # namespace package under a setuptools editable install (Python < 3.12)
        roots = [Path(p) for p in devices.__path__ if os.path.isdir(p)]
    files: dict[str, object] = {}
    for root in roots:
        files.update({f.name: f for f in root.iterdir() if f.name.endswith(".toml") and f.name not in files})
    return [load_profile(files[n], f"devices/{n}") for n in sorted(files)]


def get(name: str, storage: str | None = None) -> Device:
    """Resolve "name[:variant][:storage]" (parts in any order; `storage` may also be passed)."""
    base, *parts = name.strip().split(":")
    profiles = {p.name: p for p in list_profiles()}
    if base not in profiles:
        raise ConfigError(f"unknown device {base!r}: known devices are {', '.join(sorted(profiles))} "
                          "(name[:variant][:storage], see devices/README.md)")
    profile = profiles[base]
    variants, options = [v.name for v in profile.variants], [s.name for s in profile.storage]
    chosen: dict[str, str] = {}
    for part in parts + ([storage] if storage else []):
        kind = "variant" if part in variants else "storage" if part in options else None
        if kind is None:
            raise ConfigError(f"device {base} has no variant or storage {part!r}: variants "
                              f"{', '.join(variants)}; storage {', '.join(options)}")
        if chosen.setdefault(kind, part) != part:
            raise ConfigError(f"device {name!r}: two {kind} choices, {chosen[kind]} and {part}")
    return profile.resolve(chosen.get("variant"), chosen.get("storage"))


def measure_read_mb_s(folder: str | os.PathLike, size_mb: int = 64, *, rounds: int = 3) -> float:
    """Sequential read speed (MiB/s) of `folder`'s storage: writes a `size_mb` MiB temporary file,
    fsyncs it, then `rounds` times drops it from the page cache and times reading it back (the median:
    a shared disk's speed varies by 2-3x between reads), and deletes it. On tmpfs this is memory
    speed (there is no storage under its page cache)."""
    if not hasattr(os, "posix_fadvise"):
        raise UnsupportedError("measuring storage speed needs posix_fadvise (Linux)")
    if not isinstance(size_mb, int) or size_mb < 1:
        raise ConfigError(f"size_mb must be a positive integer, got {size_mb!r}")
    chunk = os.urandom(1 << 20)      # incompressible; repeating one MiB keeps CPU use low
    fd, path = tempfile.mkstemp(prefix=".edge-read-test-", dir=folder)
    speeds = []
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            for _ in range(size_mb):
                f.write(chunk)
            os.fsync(f.fileno())     # only clean pages can be dropped
        for _ in range(rounds):
            with open(path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                buf, total, start = bytearray(1 << 20), 0, time.perf_counter()
                while (n := f.readinto(buf)) > 0:
                    total += n
                elapsed = time.perf_counter() - start
            if total != size_mb << 20:
                raise OSError(f"read {total} bytes of the {size_mb} MiB test file in {folder}")
            speeds.append(total / (1 << 20) / max(elapsed, 1e-9))
    finally:
        os.unlink(path)
    return sorted(speeds)[len(speeds) // 2]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of the tightest cgroup (v1 or v2) memory limit over this process."""
    v1, v2 = ("memory.limit_in_bytes", "memory.usage_in_bytes"), ("memory.max", "memory.current")
    dirs = {("/sys/fs/cgroup/memory", v1), ("/sys/fs/cgroup", v2)}
    for hid, controllers, path in (line.split(":", 2) for line in _read("/proc/self/cgroup").splitlines()):
        root, files = ("/sys/fs/cgroup", v2) if hid == "0" else ("/sys/fs/cgroup/memory", v1)
        while (hid == "0" or "memory" in controllers.split(",")) and path not in ("/", ""):
            dirs.add((root + path, files))       # the process's cgroup and its ancestors
            path = os.path.dirname(path)
    return min(((int(_read(f"{d}/{limit}")), int(_read(f"{d}/{usage}") or 0))
                for d, (limit, usage) in dirs if _read(f"{d}/{limit}").isdigit()), default=None)


def _cpus() -> tuple[int, tuple[Cluster, ...], set[str]]:
    """CPUs this process may use, their clusters (by core type and max clock), their ISA features."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    groups, features = {}, set()
    for block in _read("/proc/cpuinfo").split("\n\n"):
        b = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if not b.get("processor", "").isdigit() or int(b["processor"]) not in allowed:
            continue
        features |= {_FLAGS[f] for f in (b.get("flags") or b.get("Features") or "").split() if f in _FLAGS}
        part = b.get("CPU part", "?")
        core = b.get("model name") or (f"Cortex-{_ARM_PARTS[part]}" if part in _ARM_PARTS else f"CPU part {part}")
        khz = _read(f"/sys/devices/system/cpu/cpu{b['processor']}/cpufreq/cpuinfo_max_freq")
        ghz = round(int(khz) / 1e6 if khz.isdigit() else float(b.get("cpu MHz") or 0) / 1e3, 2)
        groups[(core, ghz)] = groups.get((core, ghz), 0) + 1
    clusters = sorted((Cluster(core, n, ghz) for (core, ghz), n in groups.items()), key=lambda c: -c.ghz)
    return len(allowed), tuple(clusters or [Cluster(platform.machine(), len(allowed), 0.0)]), features


def _filesystem(folder: str) -> tuple[str, str]:
    """(filesystem type, mount point) holding `folder`: the last, longest match in /proc/mounts."""
    target = os.path.realpath(folder).rstrip("/") + "/"
    mounts = [line.split()[1:3] for line in _read("/proc/mounts").splitlines() if len(line.split()) > 2]
    inside = [(t, m) for m, t in reversed(mounts) if target.startswith(m.rstrip("/") + "/")]
    return max(inside, key=lambda tm: len(tm[1]), default=("unknown", ""))


def detect(folder: str | os.PathLike | None = ".", size_mb: int = 64) -> Device:
    """This host as a Device: usable CPUs, RAM (MemTotal or a smaller cgroup limit), ISA features,
    onnxruntime's available providers, and `folder`'s measured sequential read speed (a `size_mb`
    MiB file is written there and deleted; `folder=None` skips the measurement)."""
    mem = {k: int(v.split()[0]) // 1024 for k, v in
           (line.split(":", 1) for line in _read("/proc/meminfo").splitlines() if ":" in line)}
    ram_mb, in_use_mb = mem.get("MemTotal", 0), mem.get("MemTotal", 0) - mem.get("MemAvailable", 0)
    cgroup = _cgroup_memory()
    if cgroup and cgroup[0] >> 20 < ram_mb:
        ram_mb, in_use_mb = cgroup[0] >> 20, cgroup[1] >> 20
    cores, clusters, features = _cpus()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    import onnxruntime               # a runtime dependency; imported here because it is slow to import
    storage, kind, speed = "unmeasured", "unknown", None
    if folder is not None:
        kind, mount = _filesystem(str(folder))
        storage = f"{os.path.abspath(folder)} ({kind} on {mount or '?'})"
        try:
            speed = round(measure_read_mb_s(folder, size_mb), 1)
        except (OSError, EdgeError) as e:
            storage += f", not measured: {e}"
    return Device(name="host", description=f"this host ({platform.node() or 'unknown'})", arch=arch,
                  ram_mb=ram_mb, headroom_mb=max(0, min(in_use_mb, ram_mb)), cores=cores, clusters=clusters,
                  features=tuple(f for f in FEATURES.get(arch, ()) if f in features),
                  storage=storage, storage_kind=kind, storage_read_mb_s=speed,
                  providers=tuple(onnxruntime.get_available_providers()),
                  decode_speed_estimate=round(memory_read_gb_s() / REFERENCE_MEMORY_GB_S, 2), source="detected")


REFERENCE_MEMORY_GB_S = 25.0     # memory_read_gb_s() on the reference x86 host the planner's speeds come from


def memory_read_gb_s(mb: int = 64) -> float:
    """How fast one thread streams memory (best of 4 sums over a 64 MB array, ~0.1 s): a decode step
    reads every weight once, so its speed follows this."""
    import time
    import numpy as np
    a = np.ones(mb << 18, np.float32)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9
