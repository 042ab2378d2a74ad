#!/usr/bin/env bash
# The long fuzzing run: every target for FUZZ_SECONDS (default 1800) each, on all cores but one.
# Crashes land in build/fuzz/crashes/; each one, once fixed, goes to tests/fuzz/regressions/<target>/.
# New coverage is merged into the shipped corpus tests/fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SECONDS_EACH=${FUZZ_SECONDS:-1800}
JOBS=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
for target in pdu ndr auth; do
    echo "== fuzzing $target for ${SECONDS_EACH}s with $JOBS worker(s)"
    "$PY" scripts/fuzz.py "$target" -max_total_time="$SECONDS_EACH" -workers="$JOBS" -jobs="$JOBS" \
        -rss_limit_mb=1024 -timeout=10 -print_final_stats=1
    # Keep what reached new code: the suite replays tests/fuzz/corpus (commit it if it grew).
    "$PY" scripts/fuzz.py "$target" -merge=1 "tests/fuzz/corpus/$target" "build/fuzz/corpus/$target" 2>/dev/null
done
ls build/fuzz/crashes/ 2>/dev/null | sed 's/^/crash: /' || true
