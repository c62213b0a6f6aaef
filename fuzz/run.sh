#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time: `fuzz/run.sh [SECONDS]` (default 30 per
# target). Exits non-zero if any target crashes or breaks an invariant, printing where the
# input that did it was saved (fuzz/artifacts/TARGET/); turn that input into a regression test
# at the bottom of tests/proptest_parsers.rs.
#
# libFuzzer needs nightly-only compiler flags (-Zsanitizer=address); on the stable toolchain
# RUSTC_BOOTSTRAP=1 unlocks them, so no nightly toolchain is needed. Targets are built
# optimized, with AddressSanitizer and debug assertions (integer overflow is caught too).
#
# A first build compiles every dependency with those flags: about 15-25 min on two cores.
# FUZZ_FAST=1 builds unoptimized without a sanitizer instead (about 9 min, a third of the
# executions per second): enough for a smoke run in CI.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-30}"
TARGETS=(sse_parser usage_extraction request_parse_rewrite config_parse)
if [ "${FUZZ_FAST:-0}" = "1" ]; then
    FLAGS=(--dev --sanitizer none)
else
    FLAGS=(--release --debug-assertions)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
echo "== building fuzz targets"
cargo fuzz build "${FLAGS[@]}"

passed=0
failed=0
for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="${TMPDIR:-/tmp}/tollgate-fuzz-$target.log"
    # New inputs go to a scratch corpus so a run never dirties the committed seeds.
    scratch="$(mktemp -d)"
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    set +e
    cargo fuzz run "${FLAGS[@]}" "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    grep -E "^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log"
        echo "!! $target failed (exit $rc); the input is in fuzz/artifacts/$target/, the log in $log"
        failed=$((failed + 1))
    else
        passed=$((passed + 1))
    fi
    rm -rf "$scratch"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
