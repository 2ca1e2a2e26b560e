#!/usr/bin/env bash
# Builds pyedge._core with AddressSanitizer + UndefinedBehaviorSanitizer and runs tests
# against that build. The normal dev build (pyedge/_core*.so) is never touched: the tracked
# and untracked (non-ignored) files are mirrored into a separate directory (default
# /tmp/pyedge-sanitize/<hash of the worktree path>; PYEDGE_SANITIZE_DIR overrides), built there
# with -DPYEDGE_SANITIZE=ON (one module for this CPU, -DPYEDGE_NATIVE=ON; it lands in that
# copy's pyedge/) and tested from there.
# tar keeps modification times, so reruns rebuild only what changed.
#
#   scripts/sanitize.sh                    # default subset: ops, session, forward, fuzz regr.
#   scripts/sanitize.sh tests/test_ops_shape.py -k reshape   # any pytest arguments
#   SANITIZE_ALL=1 scripts/sanitize.sh     # the whole suite (slow)
#
# Exit code: non-zero if the build fails, a test fails, or a sanitizer reports anything.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$(command -v python3)}"
DIR="${PYEDGE_SANITIZE_DIR:-/tmp/pyedge-sanitize/$(printf %s "$ROOT" | md5sum | cut -c1-12)}"
SRC="$DIR/src"

# Mirror the tree (tracked + untracked, minus ignored files: no build dirs, no .so); the
# copy's own sanitized module is kept across runs.
KEEP="$(ls "$SRC"/pyedge/_core*.so 2>/dev/null || true)"
[ -n "$KEEP" ] && mkdir -p "$DIR/keep" && mv "$KEEP" "$DIR/keep/"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -r ls -d 2>/dev/null |
  tar -cf - -T -) | tar -xf - -C "$SRC"
[ -n "$KEEP" ] && mv "$DIR"/keep/_core*.so "$SRC/pyedge/"

cmake -S "$SRC" -B "$DIR/build" -G Ninja -DPython_EXECUTABLE="$PY" \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYEDGE_SANITIZE=ON -DPYEDGE_NATIVE=ON >/dev/null
cmake --build "$DIR/build" -j "${SANITIZE_JOBS:-2}"

ASAN_LIB="$(g++ -print-file-name=libasan.so)"
UBSAN_LIB="$(g++ -print-file-name=libubsan.so)"
LOG="$DIR/reports"
rm -rf "$LOG" && mkdir -p "$LOG"
export LD_PRELOAD="$ASAN_LIB${UBSAN_LIB:+:$UBSAN_LIB}"
# CPython, numpy and onnxruntime leak by design: leak checking off. Reports also go to files
# so a report from a child process (or one swallowed by pytest) still fails the run.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$LOG/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOG/ubsan"
export PYEDGE_NUM_THREADS="${PYEDGE_NUM_THREADS:-2}"
export PYTHONDONTWRITEBYTECODE=1

if [ "$#" -gt 0 ]; then
  ARGS=("$@")
elif [ -n "${SANITIZE_ALL:-}" ]; then
  ARGS=(tests -m "not slow")
else
  ARGS=()
  for f in "$SRC"/tests/test_ops_*.py tests/test_session.py tests/test_models_forward.py \
           tests/test_untrusted.py tests/test_fuzz_regressions.py tests/test_concurrency.py; do
    f="${f#"$SRC"/}"
    [ -f "$SRC/$f" ] && ARGS+=("$f")
  done
  ARGS+=(-m "not slow")
fi

cd "$SRC"
# The module really is the sanitized one, loaded from the copy.
"$PY" -c "import pyedge._core as c, sys; assert c.__file__.startswith('$SRC'), c.__file__"
set +e
# --capture=sys: a sanitizer report goes to the real stderr (fd capture would swallow it when
# halt_on_error ends the process).
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "${ARGS[@]}"
rc=$?
set -e
if compgen -G "$LOG/*" >/dev/null; then
  echo "=== sanitizer reports ($LOG) ==="
  cat "$LOG"/*
  exit 1
fi
exit $rc
