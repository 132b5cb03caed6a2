"""Run a command as if on a smaller device: Linux cgroup v1 limits on memory (the device's RAM
minus its OS headroom), storage read bandwidth (blkio throttling on the disk holding the bundle)
and cores (cpuset). Needs root and the v1 controllers under /sys/fs/cgroup (memory, blkio,
cpuset). CPU speed is not emulated: the host's cores run at their own speed.

    with Emulation(device, bundle_path) as em:
        result = em.run(argv)            # subprocess.CompletedProcess, inside the limits
        facts = em.facts()               # peak usage, OOM kills, bytes read
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .devices import Device
from .errors import EdgeError

ROOT = Path("/sys/fs/cgroup")


def _disk_of(path: str | os.PathLike) -> str:
    """major:minor of the whole disk holding `path` (blkio throttles disks, not partitions)."""
    st = os.stat(path)
    sysfs = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not sysfs.exists():
        raise EdgeError(f"cannot throttle reads of {path}: its filesystem is not on a block device "
                        f"({os.major(st.st_dev)}:{os.minor(st.st_dev)}); put the bundle on a disk")
    if (sysfs / "partition").exists():
        sysfs = sysfs.resolve().parent
    return (sysfs / "dev").read_text().strip()


class Emulation:
    def __init__(self, device: Device, bundle: str | os.PathLike, *, name: str | None = None):
        self.device = device
        self.name = name or f"edge-emulate-{os.getpid()}"
        self.memory = device.usable_mb << 20
        host_cpus = sorted(os.sched_getaffinity(0))
        self.cpus = host_cpus[:device.cores]
        self.read_bps = int(device.storage_read_mb_s * 2**20) if device.storage_read_mb_s else None
        self.disk = _disk_of(bundle) if self.read_bps else None
        self.notes = ["CPU speed is not emulated: the host's cores run at their own speed"]
        if device.decode_speed_estimate:
            self.notes.append(f"{device.name} decodes at about {device.decode_speed_estimate:g}x this host's speed "
                              "(an estimate from its profile)")
        if len(self.cpus) < device.cores:
            self.notes.append(f"the device has {device.cores} cores; this host lends {len(self.cpus)}")
        self.groups: dict[str, Path] = {}

    def __enter__(self) -> "Emulation":
        if os.geteuid() != 0:
            raise EdgeError("--emulate needs root (it creates cgroups)")
        for ctl in ("memory", "blkio", "cpuset"):
            if not (ROOT / ctl).is_dir():
                raise EdgeError(f"--emulate needs the cgroup v1 {ctl} controller at {ROOT / ctl}")
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        for ctl in ("memory", "blkio", "cpuset"):
            g = ROOT / ctl / self.name
            if g.is_dir():
                g.rmdir()
            g.mkdir()
            self.groups[ctl] = g
        mem = self.groups["memory"]
        _write(mem / "memory.limit_in_bytes", self.memory)
        _write(mem / "memory.memsw.limit_in_bytes", self.memory, optional=True)   # no swap either
        _write(mem / "memory.swappiness", 0, optional=True)
        if self.read_bps:
            _write(self.groups["blkio"] / "blkio.throttle.read_bps_device", f"{self.disk} {self.read_bps}")
        cs = self.groups["cpuset"]
        _write(cs / "cpuset.cpus", ",".join(map(str, self.cpus)))
        _write(cs / "cpuset.mems", (ROOT / "cpuset" / "cpuset.mems").read_text().strip())

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """argv in a fresh process placed in every group before it starts (page cache dropped first,
        so bundle reads come from the throttled disk)."""
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3")
        except OSError:
            self.notes.append("could not drop the page cache: early reads may come from RAM")
        procs = [str(g / "cgroup.procs") for g in self.groups.values()]
        enter = " && ".join(f"echo $$ > {p}" for p in procs) + ' && exec "$@"'
        return subprocess.run(["sh", "-c", enter, "sh", *argv], **kw)

    def facts(self) -> dict:
        mem = self.groups["memory"]
        oom = dict(line.split() for line in (mem / "memory.oom_control").read_text().splitlines())
        read = 0
        for line in (self.groups["blkio"] / "blkio.throttle.io_service_bytes").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read":
                read += int(parts[2])
        return dict(memory_limit_mb=self.memory >> 20, peak_usage_mb=int((mem / "memory.max_usage_in_bytes").read_text()) >> 20,
                    limit_hits=int((mem / "memory.failcnt").read_text()), oom_kills=int(oom.get("oom_kill", 0)),
                    cpus=self.cpus, read_mb_s_limit=self.device.storage_read_mb_s, disk_read_mb=read >> 20)

    def __exit__(self, *exc) -> None:
        for g in self.groups.values():
            try:
                g.rmdir()
            except OSError:
                pass
        self.groups = {}


def _write(path: Path, value, *, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError as e:
        if not optional:
            raise EdgeError(f"cannot set {path}: {e.strerror}") from None
