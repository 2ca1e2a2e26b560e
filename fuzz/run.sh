#!/usr/bin/env bash
# Bounded fuzzing session, both harnesses side by side (default 300 s each); fork mode
# keeps going after a finding.
#   fuzz/run.sh [seconds per harness]
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
python fuzz/fuzz_import.py fuzz/corpus_import "${COMMON[@]}" 2>&1 | tee fuzz/artifacts/import.log | tail -5 &
python fuzz/fuzz_graph.py fuzz/corpus_graph "${COMMON[@]}" -max_len=256 2>&1 | tee fuzz/artifacts/graph.log | tail -5
wait
