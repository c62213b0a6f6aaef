#!/usr/bin/env bash
# tollgate's benchmark: the same load, alternating between three targets in one session,
#   direct    wrk -> mock-upstream
#   nginx     wrk -> nginx (keep-alive upstream pool, no buffering) -> mock-upstream
#   tollgate  wrk -> tollgate (key, team, budget, metering, SQLite ledger all on) -> mock-upstream
# over these cases: non-streaming chat at c=1 and c=64, streaming chat at c=64, a ~100k-token
# prompt at c=1; then streaming time-to-first-byte at c=1, tollgate's idle RSS, and tollgate's
# peak RSS while it holds N open slow streams (5,000 by default).
#
# Prints a markdown table (medians over rounds, min–max spread) and writes it to
# docs/benchmarks.md, between the markers, keeping anything written by hand around them.
#
#   bench/run.sh              full run (a few minutes), writes docs/benchmarks.md
#   bench/run.sh --quick      CI smoke: 1 round of ~2 s per case, 200 streams, writes nothing
#   bench/run.sh --quick --write
#   options: --rounds N  --duration S  --streams N  --no-build  --no-write  --keep (keep the work dir)
#            --no-pgo    measure a plain release build, not the profile-guided one (bench/pgo.sh)
#            --wait-quiet S  wait up to S seconds for no rustc to be running before measuring
#
# Installs wrk and nginx from Debian when missing. Every server listens on 127.0.0.1 only and
# every process started here is stopped on exit.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0 WRITE=1 BUILD=1 KEEP=0 PGO=1
ROUNDS="" DURATION="" STREAMS="" WAIT_QUIET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --write) WRITE=2 ;;
    --no-write) WRITE=0 ;;
    --no-build) BUILD=0 ;;
    --no-pgo) PGO=0 ;;
    --keep) KEEP=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --streams) STREAMS=$2; shift ;;
    --wait-quiet) WAIT_QUIET=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-1} DURATION=${DURATION:-2} STREAMS=${STREAMS:-200} TTFB_N=30 WARM_S=1
  [ "$WRITE" = 2 ] || WRITE=0
else
  ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-4} STREAMS=${STREAMS:-5000} TTFB_N=200 WARM_S=2
fi
# Slow streams: one event a second, long enough to get all of them open and hold them.
SLOW_INTERVAL_MS=1000
SLOW_CHUNKS=$(( QUICK == 1 ? 6 : 25 ))
# The TTFB upstream drips its events 5 ms apart: a gateway that buffered the stream would
# show it as a first byte at least 10 ms late.
DRIP_INTERVAL_MS=5 DRIP_CHUNKS=3
MASTER_KEY=sk-admin-bench-0

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes and cleanup ------------------------------------------------------------------
WORK=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
PIDS=()
stop_pid() { # pid: TERM, wait up to 10 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pid "${PIDS[$i]}"; done
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_line FILE PATTERN PID: waits until FILE has a line matching PATTERN; prints it.
wait_line() {
  local file=$1 pattern=$2 pid=$3 i line
  for i in $(seq 300); do
    line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "$line"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { cat "$file" >&2; die "process $pid exited before printing '$pattern'"; }
    sleep 0.1
  done
  cat "$file" >&2
  die "timed out waiting for '$pattern' in $file"
}
port_of() { sed -E 's#.*://[^:]+:([0-9]+).*#\1#'; }
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
rss_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
compiling() { pgrep -x 'rustc|clippy-driver|cc1|cc1plus' >/dev/null 2>&1 && echo 1 || echo 0; }
# Noise: the share of the machine's CPU used during a run by processes this script did not
# start (the box is shared with builds and tests). cpu_mark sets MARK (machine busy ticks,
# our servers' ticks, our shell's reaped children's seconds — wrk, bench-client — and time);
# other_cpu_pct prints the others' share in % since the MARK saved in MARK0.
HZ=$(getconf CLK_TCK) NCPU=$(nproc) NGINX_PID=""
cpu_mark() {
  local busy ours child now pids p
  now=$(date +%s.%N)
  busy=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat)
  pids="${PIDS[*]}"
  [ -n "$NGINX_PID" ] && pids="$pids $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"
  ours=$( { for p in $pids; do sed 's/.*) //' "/proc/$p/stat" 2>/dev/null; done; true; } \
    | awk '{s += $12 + $13} END {print s + 0}')
  times >"$WORK/times"
  child=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, b, "m"); t += b[1] * 60 + substr(b[2], 1, length(b[2]) - 1) } print t }' "$WORK/times")
  MARK="$busy $ours $child $now"
}
other_cpu_pct() {
  echo "$MARK0 $MARK" | awk -v hz="$HZ" -v n="$NCPU" '{
    other = (($5 - $1) - ($6 - $2)) / hz - ($7 - $3); dt = $8 - $4
    pct = dt > 0 ? 100 * other / (dt * n) : 0; if (pct < 0) pct = 0; printf "%.1f", pct }'
}

# --- tools ----------------------------------------------------------------------------------
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
command -v python3 >/dev/null || die "python3 is needed (body generation and the report)"
command -v curl >/dev/null || die "curl is needed"
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  log "installing wrk and nginx from Debian"
  debian_install wrk nginx
fi
# 5,000 streams need ~10,000 descriptors in tollgate (client side and upstream side).
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
ulimit -n $(( HARD < 1048576 ? HARD : 1048576 ))
if [ $(( STREAMS * 2 + 200 )) -gt "$(ulimit -n)" ]; then
  STREAMS=$(( ($(ulimit -n) - 200) / 2 ))
  log "open-file limit $(ulimit -n): holding only $STREAMS streams"
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The shipped build (the Dockerfile's) is profile-guided: bench/pgo.sh builds it, with the
# mock and client beside it. --no-pgo measures a plain `cargo build --release`.
if [ "$PGO" = 1 ]; then BIN=$TARGET_DIR/pgo-use/release BUILD_KIND="release profile, profile-guided (bench/pgo.sh)"
else BIN=$TARGET_DIR/release BUILD_KIND="release profile, no PGO"; fi
if [ "$BUILD" = 1 ]; then
  if [ "$PGO" = 1 ]; then
    log "building the profile-guided release binaries (bench/pgo.sh)"
    bash "$ROOT/bench/pgo.sh"
  else
    log "building release binaries"
    (cd "$ROOT" && cargo build --release --quiet --bin tollgate --bin mock-upstream --bin bench-client)
  fi
fi
for b in tollgate mock-upstream bench-client; do [ -x "$BIN/$b" ] || die "$BIN/$b missing (run without --no-build)"; done
# The source the binaries were built from (taken now: commits may land while this runs).
git_rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
git_note=$(cd "$ROOT" && { git status --porcelain -- src Cargo.toml migrations 2>/dev/null | grep -q . && echo " with uncommitted changes" || true; })
[ "$BUILD" = 1 ] || git_note=" (--no-build: the binaries may be older than this)"

if [ "$WAIT_QUIET" -gt 0 ]; then
  # On a shared 2-core box a running compiler halves whatever it lands on: wait for 15 quiet seconds.
  log "waiting up to ${WAIT_QUIET} s for 15 quiet seconds (no compiler, others under 10% CPU)"
  quiet=0 waited=0
  cpu_mark
  while [ "$quiet" -lt 15 ] && [ "$waited" -lt "$WAIT_QUIET" ]; do
    MARK0=$MARK; sleep 1; cpu_mark; waited=$((waited + 1))
    # Quiet: no compiler, and others use under 10% of the machine.
    if [ "$(compiling)" = 0 ] && awk -v p="$(other_cpu_pct)" 'BEGIN {exit !(p < 10)}'; then
      quiet=$((quiet + 1))
    else
      quiet=0
    fi
  done
  [ "$quiet" -ge 15 ] || log "not quiet after ${WAIT_QUIET} s: measuring anyway (the report shows the others' CPU share)"
fi

# --- request bodies ---------------------------------------------------------------------------
python3 "$ROOT/bench/bodies.py" "$WORK" --big
cat > "$WORK/post.lua" <<'EOF'
-- POSTs the body in $BENCH_BODY (with $BENCH_KEY as the bearer key when set) and prints one
-- JSON line of results: wrk's latencies are in microseconds.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect_err":%d,"read_err":%d,"write_err":%d,' ..
    '"status_err":%d,"timeout_err":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
EOF

# --- the three upstream mocks -----------------------------------------------------------------
start_mock() { # name, flags...: starts a mock and sets MOCK_PORT
  local name=$1; shift
  "$BIN/mock-upstream" --port 0 "$@" >"$WORK/mock-$name.log" 2>&1 &
  PIDS+=($!)
  MOCK_PORT=$(wait_line "$WORK/mock-$name.log" 'listening on' $! | port_of)
}
start_mock fast;                                             FAST_PORT=$MOCK_PORT
start_mock drip --chunks $DRIP_CHUNKS --chunk-interval-ms $DRIP_INTERVAL_MS; DRIP_PORT=$MOCK_PORT
start_mock slow --chunks $SLOW_CHUNKS --chunk-interval-ms $SLOW_INTERVAL_MS; SLOW_PORT=$MOCK_PORT
log "mocks: fast :$FAST_PORT, drip :$DRIP_PORT, slow :$SLOW_PORT"

# --- nginx: the bare reverse-proxy hop ----------------------------------------------------------
NGX=$WORK/nginx
mkdir -p "$NGX"
NGX_FAST_PORT=$(free_port) NGX_DRIP_PORT=$(free_port)
{
  [ "$(id -u)" = 0 ] && echo "user root;"
  cat <<EOF
worker_processes auto;
worker_rlimit_nofile 65536;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $NGX/body;
  proxy_temp_path $NGX/proxy;
  fastcgi_temp_path $NGX/fastcgi;
  uwsgi_temp_path $NGX/uwsgi;
  scgi_temp_path $NGX/scgi;
  client_max_body_size 16m;
  client_body_buffer_size 1m;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  upstream fast { server 127.0.0.1:$FAST_PORT; keepalive 256; keepalive_requests 10000000; }
  upstream drip { server 127.0.0.1:$DRIP_PORT; keepalive 16; }
  server {
    listen 127.0.0.1:$NGX_FAST_PORT;
    location / { proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
  server {
    listen 127.0.0.1:$NGX_DRIP_PORT;
    location / { proxy_pass http://drip; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
EOF
} >"$NGX/nginx.conf"
nginx -p "$NGX" -e "$NGX/error.log" -c "$NGX/nginx.conf" -t -q || die "nginx config rejected"
nginx -p "$NGX" -e "$NGX/error.log" -c "$NGX/nginx.conf" -g 'daemon off;' >"$NGX/stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=($NGINX_PID)
for i in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$NGX_FAST_PORT/" && break
  kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$NGX/error.log" >&2; die "nginx exited"; }
  sleep 0.1
done
log "nginx :$NGX_FAST_PORT -> fast, :$NGX_DRIP_PORT -> drip"

# --- tollgate -----------------------------------------------------------------------------------
cat >"$WORK/tollgate.toml" <<EOF
listen = "127.0.0.1:0"
database_url = "sqlite://$WORK/tollgate.db"
shutdown_grace_ms = 5000
master_key = "$MASTER_KEY"

[[providers]]
name = "fast"
kind = "openai"
base_url = "http://127.0.0.1:$FAST_PORT/v1"
api_key = "sk-x"

[[providers]]
name = "drip"
kind = "openai"
base_url = "http://127.0.0.1:$DRIP_PORT/v1"
api_key = "sk-x"

[[providers]]
name = "slow"
kind = "openai"
base_url = "http://127.0.0.1:$SLOW_PORT/v1"
api_key = "sk-x"

[[models]]
name = "gpt-4o-mini"
provider = "fast"

[[models]]
name = "drip-mini"
provider = "drip"
upstream_model = "gpt-4o-mini"

[[models]]
name = "slow-mini"
provider = "slow"
upstream_model = "gpt-4o-mini"
EOF
TG_PID="" TG_PORT=""
start_tollgate() { # name: starts tollgate, sets TG_PID / TG_PORT
  "$BIN/tollgate" --config "$WORK/tollgate.toml" serve --listen 127.0.0.1:0 >"$WORK/tollgate-$1.log" 2>&1 &
  TG_PID=$!
  PIDS+=($TG_PID)
  TG_PORT=$(wait_line "$WORK/tollgate-$1.log" 'tollgate listening on http://' $TG_PID | port_of)
}
admin() { # method path [json]
  curl -sS -f -X "$1" -H "Authorization: Bearer $MASTER_KEY" -H 'Content-Type: application/json' \
    ${3:+-d "$3"} "http://127.0.0.1:$TG_PORT$2"
}
ledger_records() {
  admin GET /spend | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["requests"])'
}
start_tollgate main
log "tollgate :$TG_PORT (pid $TG_PID)"
admin POST /admin/teams '{"name":"bench","limit_usd":1000000,"period":"monthly"}' >/dev/null
KEY=$(admin POST /admin/keys '{"team":"bench","name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# tollgate may load things in the background after binding (tokenizers): give it a moment.
sleep 2
RSS_IDLE_START=$(rss_kb $TG_PID VmRSS)
for i in $(seq 50); do
  code=$(curl -s -o "$WORK/first.out" -w '%{http_code}' -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' --data-binary "@$WORK/chat.json" "http://127.0.0.1:$TG_PORT/v1/chat/completions")
  [ "$code" = 200 ] && break
  sleep 0.1
done
[ "$code" = 200 ] || { cat "$WORK/first.out" >&2; die "tollgate answered $code to a chat request"; }
# How many tokens tollgate counts in the big prompt (a dry run prices it without sending it).
BIG_TOKENS=$(curl -s -H "Authorization: Bearer $KEY" -H 'x-tollgate-dry-run: true' -H 'Content-Type: application/json' \
  --data-binary "@$WORK/big.json" "http://127.0.0.1:$TG_PORT/v1/chat/completions" | python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
    # estimated = prompt x $0.15/M + max_tokens (64) x $0.60/M for gpt-4o-mini
    print(round((d["estimated_cost_usd"] - 64 * 0.60e-6) / 0.15e-6))
except Exception:
    print("null")')
BIG_BYTES=$(stat -c %s "$WORK/big.json")

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
record() { echo "$1" >>"$RESULTS"; }

# --- throughput and latency ---------------------------------------------------------------------
url_of() { # target -> base URL of the fast path
  case "$1" in
    direct) echo "http://127.0.0.1:$FAST_PORT" ;;
    nginx) echo "http://127.0.0.1:$NGX_FAST_PORT" ;;
    tollgate) echo "http://127.0.0.1:$TG_PORT" ;;
  esac
}
# case name, concurrency, wrk threads, body
CASES=("chat_c1 1 1 chat.json" "chat_c64 64 2 chat.json" "stream_c64 64 2 stream.json" "prompt_100k 1 1 big.json")
TARGETS=(direct nginx tollgate)
run_wrk() { # round case conc threads body target seconds [warmup]
  local round=$1 name=$2 conc=$3 threads=$4 body=$5 target=$6 secs=$7 warm=${8:-0}
  local key="" before="" after="null" busy json
  [ "$target" = tollgate ] && key=$KEY
  [ "$target" = tollgate ] && [ "$warm" = 0 ] && before=$(ledger_records)
  cpu_mark; MARK0=$MARK
  BENCH_BODY="$WORK/$body" BENCH_KEY="$key" wrk -t"$threads" -c"$conc" -d"${secs}s" --timeout 10s \
    -s "$WORK/post.lua" "$(url_of "$target")/v1/chat/completions" >"$WORK/wrk.out" 2>&1 \
    || { cat "$WORK/wrk.out" >&2; die "wrk failed ($name, $target)"; }
  cpu_mark; busy=$(other_cpu_pct)
  [ "$warm" = 1 ] && return 0
  json=$(sed -n 's/^BENCH_JSON //p' "$WORK/wrk.out")
  [ -n "$json" ] || { cat "$WORK/wrk.out" >&2; die "no result from wrk ($name, $target)"; }
  if [ -n "$before" ]; then
    sleep 0.2 # let requests cut off at the end finish their settling
    after=$(( $(ledger_records) - before ))
  fi
  record "{\"kind\":\"wrk\",\"round\":$round,\"case\":\"$name\",\"target\":\"$target\",\"conc\":$conc,\"records\":$after,\"other_cpu_pct\":$busy,\"wrk\":$json}"
  printf '  %-11s %-8s %s\n' "$name" "$target" "$(python3 "$ROOT/bench/report.py" --line "$json")" >&2
}

log "warming up (${WARM_S} s per target)"
for t in "${TARGETS[@]}"; do run_wrk 0 warm 64 2 chat.json "$t" "$WARM_S" 1; done
for t in "${TARGETS[@]}"; do run_wrk 0 warm 8 1 stream.json "$t" 1 1; done

for round in $(seq "$ROUNDS"); do
  log "round $round/$ROUNDS (${DURATION} s per run)"
  for c in "${CASES[@]}"; do
    read -r name conc threads body <<<"$c"
    # Rotate which target goes first so none always runs right after another's load.
    for k in 0 1 2; do
      t=${TARGETS[$(( (k + round) % 3 ))]}
      run_wrk "$round" "$name" "$conc" "$threads" "$body" "$t" "$DURATION"
      sleep 0.3
    done
  done
done

# --- streaming time to first byte, c=1 ------------------------------------------------------------
log "streaming TTFB, $TTFB_N sequential requests per target and round (mock drips 5 ms apart)"
for round in $(seq "$ROUNDS"); do
  for k in 0 1 2; do
    t=${TARGETS[$(( (k + round) % 3 ))]}
    case $t in
      direct) addr=127.0.0.1:$DRIP_PORT; key="" ;;
      nginx) addr=127.0.0.1:$NGX_DRIP_PORT; key="" ;;
      tollgate) addr=127.0.0.1:$TG_PORT; key=$KEY ;;
    esac
    cpu_mark; MARK0=$MARK
    BENCH_KEY=$key "$BIN/bench-client" ttfb --addr "$addr" --body-file "$WORK/drip.json" --n "$TTFB_N" --warmup 10 >"$WORK/ttfb.json"
    cpu_mark
    record "{\"kind\":\"ttfb\",\"round\":$round,\"target\":\"$t\",\"other_cpu_pct\":$(other_cpu_pct),\"ttfb\":$(cat "$WORK/ttfb.json")}"
  done
done

sleep 2
RSS_IDLE_AFTER=$(rss_kb $TG_PID VmRSS)
RSS_HWM_LOAD=$(rss_kb $TG_PID VmHWM)
log "stopping tollgate (SIGTERM) to start a fresh one for the open-streams case"
T0=$(date +%s.%N)
stop_pid "$TG_PID"
STOP_S=$(python3 -c "import sys; print(round($(date +%s.%N) - $T0, 2))")

# --- N open slow streams through a fresh tollgate -------------------------------------------------
start_tollgate streams
sleep 2
RSS_FRESH=$(rss_kb $TG_PID VmRSS)
for i in 1 2 3; do
  curl -s -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    --data-binary "@$WORK/chat.json" "http://127.0.0.1:$TG_PORT/v1/chat/completions"
done
curl -s -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  --data-binary "@$WORK/stream.json" "http://127.0.0.1:$TG_PORT/v1/chat/completions"
sleep 1
RSS_IDLE_WARM=$(rss_kb $TG_PID VmRSS)
BEFORE=$(ledger_records)
log "holding $STREAMS slow streams open through tollgate (events ${SLOW_INTERVAL_MS} ms apart, $SLOW_CHUNKS chunks)"
BENCH_KEY=$KEY "$BIN/bench-client" streams --addr "127.0.0.1:$TG_PORT" --body-file "$WORK/slow.json" \
  --n "$STREAMS" --timeout-s 180 >"$WORK/streams.json" 2>"$WORK/streams.err" &
CLIENT=$!
PIDS+=($CLIENT)
PEAK=0 FDS=0 tick=0
while kill -0 "$CLIENT" 2>/dev/null; do
  r=$(rss_kb $TG_PID VmRSS); [ "${r:-0}" -gt "$PEAK" ] && PEAK=$r
  # Counting descriptors costs more: once a second is enough.
  if [ $(( tick++ % 10 )) = 0 ]; then
    f=$(ls -U "/proc/$TG_PID/fd" 2>/dev/null | wc -l); [ "$f" -gt "$FDS" ] && FDS=$f
  fi
  sleep 0.1
done
wait "$CLIENT" || { cat "$WORK/streams.err" >&2; die "bench-client streams failed"; }
sleep 0.5
STREAM_RECORDS=$(( $(ledger_records) - BEFORE ))
RSS_HWM_STREAMS=$(rss_kb $TG_PID VmHWM)
sleep 2
RSS_AFTER_STREAMS=$(rss_kb $TG_PID VmRSS)
record "{\"kind\":\"streams\",\"result\":$(cat "$WORK/streams.json"),\"peak_rss_kb\":$PEAK,\"hwm_kb\":$RSS_HWM_STREAMS,\"max_fds\":$FDS,\"records\":$STREAM_RECORDS,\"rss_after_kb\":$RSS_AFTER_STREAMS}"
if ! kill -0 "$TG_PID" 2>/dev/null; then
  tail -20 "$WORK/tollgate-streams.log" >&2
  die "tollgate died during the open-streams case"
fi

# --- the report -----------------------------------------------------------------------------------
cpu=$(python3 -c 'import json; print(json.dumps(next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")))')
cat >"$WORK/meta.json" <<EOF
{
  "date": "$(date -u '+%Y-%m-%d %H:%M UTC')",
  "cpu": $cpu,
  "nproc": $(nproc),
  "mem_gib": $(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo),
  "kernel": "$(uname -r)",
  "commit": "$git_rev", "source_note": "$git_note", "build": "$BUILD_KIND",
  "rustc": "$(rustc --version 2>/dev/null || echo unknown)",
  "wrk": "$(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')",
  "nginx": "$(nginx -v 2>&1 | sed 's/.*: //')",
  "quick": $QUICK, "rounds": $ROUNDS, "duration_s": $DURATION, "ttfb_n": $TTFB_N,
  "streams": $STREAMS, "slow_interval_ms": $SLOW_INTERVAL_MS, "slow_chunks": $SLOW_CHUNKS,
  "drip_interval_ms": $DRIP_INTERVAL_MS, "drip_chunks": $DRIP_CHUNKS,
  "big_bytes": $BIG_BYTES, "big_tokens": $BIG_TOKENS,
  "rss_idle_start_kb": $RSS_IDLE_START, "rss_fresh_kb": $RSS_FRESH, "rss_idle_warm_kb": $RSS_IDLE_WARM,
  "rss_idle_after_load_kb": $RSS_IDLE_AFTER, "rss_hwm_load_kb": $RSS_HWM_LOAD, "stop_s": $STOP_S
}
EOF
python3 "$ROOT/bench/report.py" "$RESULTS" "$WORK/meta.json" >"$WORK/report.md"
echo
cat "$WORK/report.md"
if [ "$WRITE" != 0 ]; then
  mkdir -p "$ROOT/docs"
  python3 "$ROOT/bench/report.py" --splice "$ROOT/docs/benchmarks.md" "$WORK/report.md"
  log "wrote docs/benchmarks.md"
fi
