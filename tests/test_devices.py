"""Device profiles (devices/*.toml), their strict loader, name resolution, and host detection."""
import json
import os
from pathlib import Path

import pytest

from edge import devices
from edge.errors import ConfigError

PROFILES = Path(__file__).resolve().parent.parent / "devices"
EXPECTED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano-8gb", "rk3588", "snapdragon-ar1-glasses",
            "x86-64-laptop"}


def _memtotal_mb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))


def test_every_shipped_profile_loads_and_resolves():
    profiles = devices.list_profiles()
    names = [p.name for p in profiles]
    assert len(profiles) >= 6 and EXPECTED <= set(names)
    assert names == sorted(names)
    assert sorted(f.stem for f in PROFILES.glob("*.toml")) == names      # none skipped
    for p in profiles:
        for v in p.variants:
            for s in p.storage:
                d = devices.get(f"{p.name}:{v.name}:{s.name}")
                assert d.name == f"{p.name}:{v.name}:{s.name}" and d.source == "profile"
                assert d.ram_mb == v.ram_mb > d.headroom_mb and d.usable_mb == d.ram_mb - d.headroom_mb
                assert d.cores == sum(c.count for c in p.clusters) > 0
                assert d.storage_read_mb_s == s.read_mb_s > 0 and d.storage_kind in devices.STORAGE_KINDS
                assert "CPUExecutionProvider" in d.providers
                assert set(d.features) <= set(devices.FEATURES[d.arch])
                assert json.loads(json.dumps(d.as_dict()))["usable_mb"] == d.usable_mb


def test_every_profile_cites_sources():
    for f in PROFILES.glob("*.toml"):
        text = f.read_text()
        assert "# Sources" in text and "https://" in text, f.name
        assert "ESTIMATE" in text, f"{f.name}: decode_speed_estimate must be labelled an estimate"


def test_profiles_hold_the_facts_they_claim():
    pi5 = devices.get("raspberry-pi-5")
    assert (pi5.arch, pi5.cores, pi5.clusters[0].core, pi5.clusters[0].ghz) == ("aarch64", 4, "Cortex-A76", 2.4)
    assert "dotprod" in pi5.features and "i8mm" not in pi5.features
    assert devices.get("raspberry-pi-4").features == ("neon",)
    rk = devices.get("rk3588")
    assert [(c.core, c.count) for c in rk.clusters] == [("Cortex-A76", 4), ("Cortex-A55", 4)]
    jetson = devices.get("jetson-orin-nano-8gb")
    assert {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(jetson.providers) and jetson.cores == 6
    assert "QNNExecutionProvider" in devices.get("snapdragon-ar1-glasses").providers
    laptop = devices.get("x86-64-laptop")
    assert laptop.arch == "x86_64" and "avx512_vnni" in laptop.features and laptop.storage_kind == "nvme"


def test_variant_and_storage_resolution():
    d = devices.get("raspberry-pi-5")
    assert (d.name, d.ram_mb, d.storage) == ("raspberry-pi-5:8gb:sd", 8192, "sd")
    assert devices.get("raspberry-pi-5:16gb").ram_mb == 16384
    nvme = devices.get("raspberry-pi-5:4gb:nvme")
    assert (nvme.ram_mb, nvme.storage, nvme.storage_kind) == (4096, "nvme", "nvme")
    assert nvme.storage_read_mb_s > d.storage_read_mb_s
    assert devices.get("raspberry-pi-5:nvme:4gb") == nvme                 # parts in any order
    assert devices.get("raspberry-pi-5:4gb", storage="nvme") == nvme
    assert devices.get("raspberry-pi-5:nvme").ram_mb == 8192               # storage only: default variant
    assert devices.get(nvme.name) == nvme                                  # a Device's name resolves back
    assert devices.get("jetson-orin-nano-8gb").ram_mb == 8192


def test_unknown_names_list_what_exists():
    with pytest.raises(ConfigError, match="unknown device 'raspberry-pi-9'.*raspberry-pi-4, raspberry-pi-5"):
        devices.get("raspberry-pi-9")
    with pytest.raises(ConfigError, match="no variant or storage '32gb'.*4gb, 8gb, 16gb.*sd, nvme"):
        devices.get("raspberry-pi-5:32gb")
    with pytest.raises(ConfigError, match="no variant or storage 'emmc'"):
        devices.get("raspberry-pi-5", storage="emmc")
    with pytest.raises(ConfigError, match="two variant choices, 4gb and 8gb"):
        devices.get("raspberry-pi-5:4gb:8gb")
    with pytest.raises(ConfigError, match="two storage choices, sd and nvme"):
        devices.get("raspberry-pi-5:sd", storage="nvme")
    with pytest.raises(ConfigError, match="has no variant 'nope'"):
        devices.list_profiles()[0].resolve(variant="nope")


def _write(tmp_path, text: str, name: str = "my-board") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


GOOD = (PROFILES / "raspberry-pi-5.toml").read_text().replace('name = "raspberry-pi-5"', 'name = "my-board"')


def test_a_new_board_is_only_a_file(tmp_path):
    p = devices.load_profile(_write(tmp_path, GOOD))
    assert p.name == "my-board" and p.resolve("16gb", "nvme").name == "my-board:16gb:nvme"


@pytest.mark.parametrize("edit,words", [
    (('arch = "aarch64"', 'arch = "aarch64"\ngpu = "VideoCore VII"'), r"my-board.toml: unknown field\(s\) gpu"),
    (("ram_mb = 4096", "ram_mb = 4096\nram_gb = 4"), r"my-board.toml.variants\[0\]: unknown field\(s\) ram_gb"),
    (("headroom_mb = 512\n", ""), "my-board.toml: missing field 'headroom_mb'"),
    (('kind = "sd"\n', ""), r"my-board.toml.storage\[0\]: missing field 'kind'"),
    (("ram_mb = 4096", 'ram_mb = "4096"'), r"variants\[0\].ram_mb: expected an integer"),
    (('"dotprod"', '"dotprd"'), "features dotprd unknown for aarch64"),
    (('"dotprod"', '"avx2"'), "features avx2 unknown for aarch64"),
    (('arch = "aarch64"', 'arch = "arm64"'), "arch 'arm64' is not one of aarch64, x86_64"),
    (('"XnnpackExecutionProvider"', '"XNNPACK"'), r"unknown provider\(s\) XNNPACK"),
    (('["CPUExecutionProvider", ', '['), "must include CPUExecutionProvider"),
    (('default_variant = "8gb"', 'default_variant = "12gb"'), "default_variant '12gb'"),
    (('default_storage = "sd"', 'default_storage = "ssd"'), "default_storage 'ssd'"),
    (('kind = "sd"', 'kind = "floppy"'), "kind must be one of sd, emmc"),
    (('name = "nvme"', 'name = "8gb"'), "distinct lowercase words"),
    (("ghz = 2.4", "ghz = 0"), "ghz > 0"),
    (("headroom_mb = 512", "headroom_mb = 5000"), "below every variant's ram_mb"),
    (("headroom_mb = 512", "headroom_mb = = 512"), "my-board.toml: not valid TOML"),
])
def test_bad_profiles_are_named_errors(tmp_path, edit, words):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=words):
        devices.load_profile(_write(tmp_path, GOOD.replace(old, new, 1)))


def test_file_name_must_match_profile_name(tmp_path):
    with pytest.raises(ConfigError, match="must be in a file named my-board.toml"):
        devices.load_profile(_write(tmp_path, GOOD, name="other"))


def test_measure_read_speed(tmp_path):
    speed = devices.measure_read_mb_s(tmp_path, size_mb=16)
    assert speed > 0
    assert list(tmp_path.iterdir()) == []                                   # the test file is gone
    with pytest.raises(ConfigError, match="size_mb"):
        devices.measure_read_mb_s(tmp_path, size_mb=0)


def test_detect_describes_this_host(tmp_path):
    d = devices.detect(tmp_path, size_mb=16)
    assert d.name == "host" and d.source == "detected" and 0.05 < d.decode_speed_estimate < 20   # memory speed / reference
    assert d.cores == len(os.sched_getaffinity(0)) == sum(c.count for c in d.clusters)
    assert 0 < d.ram_mb <= _memtotal_mb() and 0 <= d.headroom_mb < d.ram_mb
    assert d.storage_read_mb_s > 0 and str(tmp_path) in d.storage
    assert list(tmp_path.iterdir()) == []
    assert "CPUExecutionProvider" in d.providers
    flags = {f for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))
             for f in line.split(":", 1)[1].split()}
    assert ("avx2" in d.features) == ("avx2" in flags) and ("neon" in d.features) == ("asimd" in flags)
    assert json.loads(json.dumps(d.as_dict()))["cores"] == d.cores
    assert devices.detect(None).storage_read_mb_s is None


@pytest.mark.skipif(os.cpu_count() != 2, reason="the 2-vCPU, ~24 GB reference machine only")
def test_detect_on_the_reference_machine():
    d = devices.detect(None)
    assert d.arch == "x86_64" and d.cores == 2
    if d.ram_mb < _memtotal_mb():
        pytest.skip(f"a cgroup limits memory to {d.ram_mb} MB")
    assert 16 * 1024 <= d.ram_mb <= 32 * 1024
