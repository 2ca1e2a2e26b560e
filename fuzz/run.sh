#!/usr/bin/env bash
# Bounded fuzzing session, both harnesses side by side (default 300 s each; .ci/run runs
# them for 60 s each).
#   fuzz/run.sh [seconds per harness]        (PYTHON=... picks the interpreter)
# Findings land in fuzz/artifacts/ (crash-*, timeout-*, oom-*); turn each into a case in
# tests/test_fuzz_regressions.py (input under tests/data/fuzz/).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${1:-300}"
mkdir -p fuzz/artifacts fuzz/corpus_import fuzz/corpus_graph
export PYEDGE_MAX_MEMORY="${PYEDGE_MAX_MEMORY:-1G}" PYEDGE_NUM_THREADS=1 OMP_NUM_THREADS=1
COMMON=(-max_total_time="$T" -timeout=20 -rss_limit_mb=3072 -max_len=65536
        -artifact_prefix=fuzz/artifacts/ -print_final_stats=1
        )  # atheris does not support -fork: a run stops at its first finding
PY="${PYTHON:-python}"
# Exit code: non-zero when either harness stops on a finding (pipefail carries the harness's
# status through tee; the background one's comes back through `wait PID`).
"$PY" fuzz/fuzz_import.py fuzz/corpus_import "${COMMON[@]}" 2>&1 | tee fuzz/artifacts/import.log | tail -5 &
IMPORT_PID=$!
rc=0
"$PY" fuzz/fuzz_graph.py fuzz/corpus_graph "${COMMON[@]}" -max_len=256 2>&1 | tee fuzz/artifacts/graph.log | tail -5 || rc=$?
wait "$IMPORT_PID" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "fuzz: a harness stopped on a finding (exit $rc); see fuzz/artifacts/" >&2
  ls fuzz/artifacts/ >&2
fi
exit "$rc"
