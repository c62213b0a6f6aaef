#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the same figure run after
# run (to a fraction of a percent), where wall-clock A/B runs on a shared 2-core machine move by
# ±5%. Use it to tell whether a change to the request path does less work; use bench/ab.sh to
# see what that is worth in requests/s and latency.
#
#   bench/instructions.sh [--secs S] [--concurrency C] BIN [BIN...]
#
# For each BIN (a tollgate release binary; copy target/release/tollgate aside between builds):
# starts the mock upstream and tollgate under callgrind with its own SQLite file, a team with
# a budget and a key (every accounting feature on, as in bench/run.sh), warms up, zeroes the
# counters, sends non-streamed chat requests with wrk for S seconds (default 8) on C
# connections (default 8), lets the ledger commit, and prints the instructions of all of
# tollgate's threads (workers, ledger, SQLite) divided by the requests answered. Prints the
# callgrind file too, for `callgrind_annotate --inclusive=yes FILE`.
#
# The work folder (/tmp/tollgate-instr.*) is kept for the callgrind files. Needs valgrind,
# wrk and curl (apt-get install -y valgrind wrk curl). Under valgrind CPUID
# hides some instruction-set extensions (SHA-NI: SHA-256 runs its portable code), so absolute
# figures are higher than natively; compare binaries with each other.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=8 CONC=8 BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS=$2; shift ;;
    --concurrency) CONC=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "bench/instructions.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) BINS+=("$(realpath "$1")") ;;
  esac
  shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "bench/instructions.sh: give at least one tollgate binary (see --help)" >&2; exit 2; }
for tool in valgrind callgrind_control callgrind_annotate wrk curl; do
  command -v "$tool" >/dev/null || { echo "bench/instructions.sh: needs $tool (apt-get install -y valgrind wrk curl)" >&2; exit 2; }
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
wait_for() { # file pattern seconds: waits for the line and prints the port in its URL
  local i
  for i in $(seq $(($3 * 10))); do
    grep -q "$2" "$1" 2>/dev/null && { grep -o "$2[^ \"]*" "$1" | head -1 | sed -E 's#.*:([0-9]+).*#\1#'; return; }
    sleep 0.1
  done
  cat "$1" >&2; echo "bench/instructions.sh: no '$2' in $1" >&2; exit 1
}

printf '%s' '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one sentence about toll bridges."}]}' >"$W/chat.json"
cat >"$W/post.lua" <<'EOF'
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.method = "POST"; wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
EOF
"$MOCK" --port 0 >"$W/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT=$(wait_for "$W/mock.log" 'listening on ' 10)

for i in "${!BINS[@]}"; do
  d="$W/t$i"
  mkdir -p "$d"
  cat >"$d/tollgate.toml" <<EOF
listen = "127.0.0.1:0"
database_url = "sqlite://$d/tollgate.db"
master_key = "sk-admin-instr"

[[providers]]
name = "fast"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key = "sk-x"

[[models]]
name = "gpt-4o-mini"
provider = "fast"
EOF
  valgrind --tool=callgrind --callgrind-out-file="$d/callgrind.out" "${BINS[$i]}" --config "$d/tollgate.toml" serve \
    >"$d/log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  port=$(wait_for "$d/log" 'listening on http://' 60)
  admin() { curl -sSf -X POST -H 'Authorization: Bearer sk-admin-instr' -H 'Content-Type: application/json' -d "$2" "http://127.0.0.1:$port$1"; }
  admin /admin/teams '{"name":"bench","limit_usd":1000000,"period":"monthly"}' >/dev/null
  key=$(admin /admin/keys '{"team":"bench","name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  load() { BODY="$W/chat.json" KEY="$key" wrk -t1 -c"$CONC" -d"$1s" -s "$W/post.lua" "http://127.0.0.1:$port/v1/chat/completions"; }
  load 3 >/dev/null
  sleep 1
  callgrind_control -z "$pid" >/dev/null 2>&1
  n=$(load "$SECS" | awk '/requests in/ {print $1}')
  sleep 1.5 # the ledger's paced commit of what is queued
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  total=$(callgrind_annotate "$d/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  [ -n "$total" ] && [ "${n:-0}" -gt 0 ] || { echo "bench/instructions.sh: no measurement for ${BINS[$i]}" >&2; exit 1; }
  printf '%s: %d requests, %d instructions a request (%s)\n' "${BINS[$i]}" "$n" $((total / n)) "$d/callgrind.out.1"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
