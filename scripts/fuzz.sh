#!/usr/bin/env bash
# The long fuzzing run: every target for FUZZ_SECONDS (default 1800) each, on all cores but one.
# Crashes land in build/fuzz/crashes/; each one, once fixed, goes to tests/fuzz/regressions/<target>/.
# New coverage is merged into the shipped corpus tests/fuzz/corpus/<target>/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}  # an absolute path: the loop below runs in build/fuzz
SECONDS_EACH=${FUZZ_SECONDS:-1800}
JOBS=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
mkdir -p "$ROOT/build/fuzz"
cd "$ROOT/build/fuzz"  # libFuzzer's per-job logs (fuzz-N.log) land here
for target in pdu ndr auth; do
    echo "== fuzzing $target for ${SECONDS_EACH}s with $JOBS worker(s)"
    "$PY" "$ROOT/scripts/fuzz.py" "$target" -max_total_time="$SECONDS_EACH" -workers="$JOBS" -jobs="$JOBS" \
        -rss_limit_mb=1024 -timeout=10 -print_final_stats=1
    # Keep what reached new code: the suite replays tests/fuzz/corpus (commit it if it grew).
    "$PY" "$ROOT/scripts/fuzz.py" "$target" -merge=1 "$ROOT/tests/fuzz/corpus/$target" \
        "$ROOT/build/fuzz/corpus/$target" 2>/dev/null
done
ls "$ROOT/build/fuzz/crashes/" 2>/dev/null | sed 's/^/crash: /' || true
