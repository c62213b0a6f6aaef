#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the same figure run after
# run (to a fraction of a percent), where wall-clock A/B runs on a shared 2-core machine move by
# ±5%. Use it to tell whether a change to the request path does less work; use bench/ab.sh to
# see what that is worth in requests/s and latency.
#
#   bench/instructions.sh [--secs S] [--concurrency C] [--stream] BIN [BIN...]
#
# For each BIN (a tollgate release binary; copy target/release/tollgate aside between builds):
# starts the mock upstream and tollgate under callgrind with its own SQLite file, a team with
# a budget and a key (every accounting feature on, as in bench/run.sh), warms up, zeroes the
# counters, sends non-streamed chat requests with wrk for S seconds (default 8) on C
# connections (default 8), lets the ledger commit, and prints the instructions of all of
# tollgate's threads (workers, ledger, SQLite) divided by the requests answered, and those of
# the request workers alone (steadier: the SQLite share depends on the batch sizes a run
# reached). Prints the callgrind files too (one a thread), for `callgrind_annotate --inclusive=yes FILE`. With --stream the
# requests are streamed chat (the mock's SSE answer, usage in its last chunk).
#
# The work folder (/tmp/tollgate-instr.*) is kept for the callgrind files. Needs valgrind,
# wrk and curl (apt-get install -y valgrind wrk curl). Under valgrind CPUID
# hides some instruction-set extensions (SHA-NI: SHA-256 runs its portable code), so absolute
# figures are higher than natively; compare binaries with each other.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=8 CONC=8 STREAM=0 BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS=$2; shift ;;
    --concurrency) CONC=$2; shift ;;
    --stream) STREAM=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "bench/instructions.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) BINS+=("$(realpath "$1")") ;;
  esac
  shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "bench/instructions.sh: give at least one tollgate binary (see --help)" >&2; exit 2; }
for tool in valgrind callgrind_control callgrind_annotate wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "bench/instructions.sh: needs $tool (apt-get install -y valgrind wrk curl python3)" >&2; exit 2; }
done
MOCK=${CARGO_TARGET_DIR:-$ROOT/target}/release/mock-upstream
[ -x "$MOCK" ] || (cd "$ROOT" && cargo build --release --quiet --bin mock-upstream)

W=$(mktemp -d /tmp/tollgate-instr.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

python3 "$ROOT/bench/bodies.py" "$W"
BODY_FILE=$W/chat.json
[ "$STREAM" = 1 ] && BODY_FILE=$W/stream.json
post_lua "$W/post.lua"
"$MOCK" --port 0 >"$W/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT=$(port_in_log "$W/mock.log" 'listening on ')

for i in "${!BINS[@]}"; do
  d="$W/t$i"
  mkdir -p "$d"
  tollgate_config "$d/tollgate.toml" "$d" "$MOCK_PORT" sk-admin-instr </dev/null
  # One file a thread (callgrind.out.1-NN): the workers are told apart by what they ran.
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$d/callgrind.out" \
    "${BINS[$i]}" --config "$d/tollgate.toml" serve \
    >"$d/log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  port=$(port_in_log "$d/log" 'listening on http://' 60)
  key=$(bench_key "$port" sk-admin-instr bench)
  load() { BODY="$BODY_FILE" KEY="$key" wrk -t1 -c"$CONC" -d"$1s" -s "$W/post.lua" "http://127.0.0.1:$port/v1/chat/completions"; }
  load 3 >/dev/null
  sleep 1
  callgrind_control -z "$pid" >/dev/null 2>&1
  n=$(load "$SECS" | awk '/requests in/ {print $1}')
  sleep 1.5 # the ledger's paced commit of what is queued
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  total=0 workers=0
  for f in "$d"/callgrind.out.1-*; do
    t=$(awk '/^summary:/ { print $2; exit }' "$f")
    total=$((total + ${t:-0}))
    # The request workers' threads alone: steadier than the total, whose SQLite share per
    # request depends on how large the ledger's batches grew, which depends on how fast
    # this run went. A worker's thread is one that served connections (a symbol of
    # `serve_handed_over` in its file; a profile-guided build inlines tokio's own frames).
    if grep -q 'serve_handed_over' "$f"; then workers=$((workers + ${t:-0})); fi
  done
  [ "$total" -gt 0 ] && [ "${n:-0}" -gt 0 ] || { echo "bench/instructions.sh: no measurement for ${BINS[$i]}" >&2; exit 1; }
  printf '%s: %d requests, %d instructions a request, %d of them in the workers (%s)\n' \
    "${BINS[$i]}" "$n" $((total / n)) $((workers / n)) "$d/callgrind.out.1-*"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
