#!/usr/bin/env bash
# Prove the runtime (not the exporter) installs and runs on 64-bit ARM Linux, under emulation.
#
#   sudo tests/arm64/check.sh BUNDLE [ROOT_DIR]      # ROOT_DIR default /var/tmp/edge-arm64-root
#   sudo EXPERT_CAPACITY=4 QEMU_CPU=cortex-a57 tests/arm64/check.sh MOE_BUNDLE   # expert slots on ARM
#
# 1. installs qemu-user-static and debootstrap (Debian packages) if missing, registers aarch64
#    with binfmt_misc;
# 2. debootstraps a Debian bookworm arm64 root (minbase) from the mirror this machine's apt sources
#    name, and apt-installs python3 + python3-venv in it (skipped when ROOT_DIR is already built);
# 3. on the host: builds a wheel of this repo (pure Python) and `pip download`s the aarch64 wheels
#    of its runtime dependencies (pinned to the host's versions) into the root: pip inside the
#    chroot cannot reach PyPI (it lacks the host's CA bundle), so the install is offline;
# 4. in the chroot: a venv with `pip install edge` from those wheels only, and WITHOUT the
#    [export] extras (checked: onnx/gguf/torch must not be importable);
# 5. runs tests/arm64/greedy.py with BUNDLE (exported on x86) on the host and in the chroot, and
#    compares the greedy token ids; prints a summary and exits 1 if they differ. With
#    EXPERT_CAPACITY=N (a Mixture-of-Experts bundle) each machine also loads it with N experts
#    cached: the summary says whether expert slots passed their self-test there (or the runtime fell
#    back to a session per miss) and whether the greedy tokens equal that machine's unlimited run.
#    QEMU_CPU picks the emulated CPU (max: dotprod and i8mm; cortex-a57: neither, as a Raspberry
#    Pi 4's Cortex-A72), which decides onnxruntime's packed layout.
#
# Requirements: root (mount, chroot, apt), x86-64 Debian/Ubuntu host with the runtime installed
# for $PYTHON (default python3), network from the host to the Debian mirror and PyPI.
# Time (2-core machine, SmolLM2-135M): first run about 7 min (debootstrap + apt under emulation),
# a re-run with the same ROOT_DIR about 1.5 min (int4) or 2.5 min (fp32). Emulated code runs
# 10-25x slower than native: the aarch64 decode speed is a correctness run's, not a prediction.
# Bit-equal tokens need the same arithmetic on both machines: fp32 bundles match; int4/int8 ones
# (MatMulNBits accuracy_level 4: int8 activations, quantized differently by x86's and ARM's
# kernels) can part at a near-tie; the summary then prints both top-2 margins at that step.
# The chroot's /proc and /dev are bind mounts while this runs: never `rm -rf ROOT_DIR` while
# it is running (they are unmounted on exit, failure included).
set -euo pipefail

BUNDLE=${1:?usage: $0 BUNDLE [ROOT_DIR]}
ROOT=${2:-/var/tmp/edge-arm64-root}
TOKENS=${TOKENS:-32}
EXTRA=${EXPERT_CAPACITY:+--expert-capacity $EXPERT_CAPACITY}
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE=$(cd "$BUNDLE" && pwd)
ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)
T0=$(date +%s%N)
TMP=$(mktemp -d)                                  # wheel build copy and the two runs' JSON
MOUNTS=()                                         # bind mounts to undo on exit
cleanup() { for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"; done
            rm -rf "$TMP"; }
trap cleanup EXIT
log() { printf '\n== %s\n' "$*" >&2; }
inroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

[[ $ROOT != / ]] || { echo "ROOT_DIR must not be /" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "run as root (mount, chroot, apt)" >&2; exit 2; }
[[ -f $BUNDLE/manifest.json ]] || { echo "$BUNDLE is not a bundle (no manifest.json)" >&2; exit 2; }

log "1/6 qemu-user-static, debootstrap, binfmt_misc"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap
fi
BINFMT=/proc/sys/fs/binfmt_misc
mountpoint -q $BINFMT || mount binfmt_misc -t binfmt_misc $BINFMT
[[ -e $BINFMT/qemu-aarch64 ]] || grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > $BINFMT/register

log "2/6 Debian bookworm arm64 root in $ROOT"
if [[ ! -x $ROOT/usr/bin/apt-get || -d $ROOT/debootstrap ]]; then   # not built, or interrupted
    if grep -q " $ROOT/" /proc/mounts; then echo "something is mounted under $ROOT: unmount it first" >&2; exit 2; fi
    if [[ -d $ROOT/debootstrap ]]; then rm -rf "${ROOT:?}"/*      # an interrupted debootstrap: start over
    elif [[ -n $(ls -A "$ROOT") ]]; then echo "$ROOT is neither empty nor a Debian root: pick another ROOT_DIR" >&2; exit 2; fi
    MIRROR=${MIRROR:-$( { grep -hsE '^\s*URIs:' /etc/apt/sources.list.d/*.sources | sed -E 's/^\s*URIs:\s*//' | tr ' ' '\n'
        grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed -E 's/^\s*deb\s+(\[[^]]*\]\s+)?//' | awk '{print $1}'
      } | grep -E '/debian/?$' | head -n1 || true)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    echo "mirror: $MIRROR" >&2
    debootstrap --arch=arm64 --variant=minbase bookworm "$ROOT" "$MIRROR" >&2
fi

# /proc and /dev for apt and pip; unmounted on any exit (trap above). NOT /sys: with /sys present,
# onnxruntime's cpuinfo (1.31 and 1.32) parses the host's x86 /proc/cpuinfo (qemu 7.2 does not fake
# an ARM one) and segfaults on import. Without it cpuinfo_initialize fails with a warning and
# onnxruntime reads the CPU features from getauxval(AT_HWCAP), i.e. the emulated CPU's: correct.
for d in proc dev; do
    mountpoint -q "$ROOT/$d" || { mount --bind "/$d" "$ROOT/$d"; MOUNTS+=("$ROOT/$d"); }
done
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[[ $(inroot uname -m) == aarch64 ]] || { echo "the chroot does not run as aarch64" >&2; exit 1; }

if [[ ! -f $ROOT/.edge-python-ready ]]; then
    inroot apt-get update -qq
    inroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
    inroot apt-get clean
    touch "$ROOT/.edge-python-ready"
fi

log "3/6 host: wheel of $REPO + aarch64 wheels of its runtime dependencies"
W=$ROOT/opt/edge/wheels
mkdir -p "$W"
SRC=$TMP/src; mkdir "$SRC"                        # build from a copy: the working tree stays untouched
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC" 2>/dev/null || true)
rm -f "$W"/edge-*.whl
"$PY" -m pip wheel -q --no-deps "$SRC" -w "$W" >&2
WHEEL=$(basename "$W"/edge-*.whl)
# pin to the host's versions so the two runs differ by the machine only
"$PY" - > "$ROOT/opt/edge/pins.txt" <<'EOF'
import importlib.metadata as md
for name in ("onnxruntime", "numpy", "tokenizers", "typer", "jinja2"):
    try: print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError: pass
EOF
"$PY" -m pip download -qq --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    -d "$W" "$W/$WHEEL" -r "$ROOT/opt/edge/pins.txt" >&2

log "4/6 chroot: venv, pip install --no-index (runtime only)"
[[ -x $ROOT/opt/edge/venv/bin/python ]] || inroot python3 -m venv /opt/edge/venv
VPY=/opt/edge/venv/bin/python
inroot $VPY -m pip install -q --disable-pip-version-check --no-index --find-links /opt/edge/wheels \
    "/opt/edge/wheels/$WHEEL" -r /opt/edge/pins.txt
inroot $VPY -m pip install -q --disable-pip-version-check --no-index --no-deps --force-reinstall "/opt/edge/wheels/$WHEEL"
inroot $VPY -c 'import importlib.util as u, sys; bad = [m for m in ("onnx", "gguf", "torch", "transformers") if u.find_spec(m)]
sys.exit(f"exporter packages are installed in the chroot: {bad}" if bad else 0)'
inroot $VPY -m pip list --disable-pip-version-check --format=freeze | tr '\n' ' ' >&2; echo >&2

log "5/6 copy the bundle, run greedy.py on the host (x86-64) and in the chroot (aarch64)"
rm -rf "$ROOT/opt/edge/bundle" && cp -a "$BUNDLE" "$ROOT/opt/edge/bundle"
cp "$REPO/tests/arm64/greedy.py" "$ROOT/opt/edge/greedy.py"
inroot /opt/edge/venv/bin/edge inspect /opt/edge/bundle >&2          # the CLI entry point works too
OUT=$TMP
rm -rf "$ROOT/opt/edge/bundle/packed"                 # the x86 store must not travel: ARM packs its own
(cd "$OUT" && "$PY" "$REPO/tests/arm64/greedy.py" "$BUNDLE" --tokens "$TOKENS" $EXTRA) > "$OUT/host.json"
cat "$OUT/host.json" >&2
TA=$(date +%s%N)
inroot ${QEMU_CPU:+env QEMU_CPU=$QEMU_CPU} $VPY /opt/edge/greedy.py /opt/edge/bundle --tokens "$TOKENS" $EXTRA \
    > "$OUT/arm.json"
TB=$(date +%s%N)
cat "$OUT/arm.json" >&2

log "6/6 summary"
"$PY" - "$OUT/host.json" "$OUT/arm.json" "$(( (TB - TA) / 1000000 ))" "$(( ($(date +%s%N) - T0) / 1000000 ))" <<'EOF'
import json, sys
h, a = (json.load(open(p)) for p in sys.argv[1:3])
same = h["tokens"] == a["tokens"] and h["prompt_ids"] == a["prompt_ids"]
rows = [("host arch", h["machine"]), ("emulated arch", a["machine"]),
        ("onnxruntime host / emulated", f'{h["onnxruntime"]} / {a["onnxruntime"]}'),
        (f'greedy tokens equal ({len(h["tokens"])})', "yes" if same else "NO"),
        ("x86 decode tok/s", h["decode_tok_s"]), ("emulated decode tok/s", a["decode_tok_s"]),
        ("emulated greedy.py wall s", int(sys.argv[3]) / 1000), ("total wall s", int(sys.argv[4]) / 1000)]
for name, run in (("host", h), ("emulated", a)):
    if run.get("experts"):
        e = run["experts"]
        rows.append((f"{name}: {e['capacity']} experts cached", f"{e['path']}, greedy equal to unlimited: "
                     + ("yes" if e["same_as_unlimited"] else "NO") + "; session path: "
                     + ("yes" if e["sessions_same_as_unlimited"] else "NO")))
        same = same and e["same_as_unlimited"] and e["sessions_same_as_unlimited"]
for k, v in rows:
    print(f"{k:<30} {v}")
if not same:
    print("host    :", h["tokens"], "\nemulated:", a["tokens"])
    k = next((i for i, (x, y) in enumerate(zip(h["tokens"], a["tokens"])) if x != y), None)
    if k is not None and h["prompt_ids"] == a["prompt_ids"]:
        print(f"first difference at step {k}: top-1 minus top-2 logit there is {h['margins'][k]} on the host, "
              f"{a['margins'][k]} emulated (small: a near-tie that the two machines' kernels round apart)")
sys.exit(0 if same else 1)
EOF
