#!/usr/bin/env bash
# A/B: compares tollgate builds with each other and with nginx, in one session, alternating.
#
#   bench/ab.sh [options] BIN [BIN...]
#     --secs S       seconds per wrk run (default 5)
#     --rounds N     rounds; each runs nginx and every BIN, per case, in an order that
#                    rotates from round to round (default 3)
#     --cases "..."  any of chat_c64 stream_c64 chat_c1 ttfb (default: all four); the mock
#                    streams one event per write (as providers do), 20 events a stream, and
#                    stream rows also print CPU per relayed event; ttfb is
#                    streaming time to first byte at c=1, 200 requests in a row on one
#                    connection per run, against a mock that drips its events 5 ms apart
#     --direct       also run wrk straight at the mock (the "direct" row)
#
# For each case and target it prints the medians over rounds of requests/s, p50 and p99
# latency, the target's CPU time per request (user + system, from /proc, all its threads;
# and user alone), for tollgate that CPU split by thread kind: request workers, the ledger
# runtime (since 5cf7348 it writes the SQLite record batches itself), sqlx's SQLite
# connection threads (queries, retractions); and the share of the machine the hypervisor stole
# for other guests during the runs (`steal` in /proc/stat), which slows every target. Each BIN runs with its own SQLite file, a team with a budget and
# a key, as bench/run.sh sets them up. Use it to decide whether a change pays: build the old
# and the new binary (copy target/release/tollgate aside between builds) and compare them
# here, not with numbers from another session — this machine's noise is larger than most
# single changes. Do not build while it runs.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=5 ROUNDS=3 CASES="chat_c64 stream_c64 chat_c1 ttfb" DIRECT=0 BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --cases) CASES=$2; shift ;;
    --direct) DIRECT=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "bench/ab.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) BINS+=("$(realpath "$1")") ;;
  esac
  shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "bench/ab.sh: give at least one tollgate binary (see --help)" >&2; exit 2; }
for b in "${BINS[@]}"; do [ -x "$b" ] || { echo "bench/ab.sh: $b is not executable" >&2; exit 2; }; done
command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "bench/ab.sh: needs wrk and nginx (bench/run.sh installs them)" >&2; exit 2; }
MOCK=${CARGO_TARGET_DIR:-$ROOT/target}/release/mock-upstream
CLIENT=${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-client
[ -x "$MOCK" ] && [ -x "$CLIENT" ] || (cd "$ROOT" && cargo build --release --quiet --bin mock-upstream --bin bench-client)

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
work_dir ab

python3 "$ROOT/bench/bodies.py" "$W"
post_lua "$W/post.lua"
cat >>"$W/post.lua" <<'EOF'
done = function(s, latency)
  local e = s.errors
  io.write(string.format("AB %d %d %d %d %d\n", s.requests, s.duration, latency:percentile(50),
    latency:percentile(99), e.status + e.read + e.write + e.timeout + e.connect))
end
EOF

"$MOCK" --port 0 >"$W/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT=$(port_in_log "$W/mock.log" 'listening on ')
"$MOCK" --port 0 --chunks 3 --chunk-interval-ms 5 >"$W/drip.log" 2>&1 &
PIDS+=($!)
DRIP_PORT=$(port_in_log "$W/drip.log" 'listening on ')
NGINX_PORT=$(free_port) NGINX_DRIP_PORT=$(free_port)
{
  [ "$(id -u)" = 0 ] && echo "user root;"
  cat <<EOF
worker_processes auto; worker_rlimit_nofile 65536; pid $W/nginx.pid; error_log $W/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off; client_body_temp_path $W/ngx_b; proxy_temp_path $W/ngx_p; fastcgi_temp_path $W/ngx_f;
  uwsgi_temp_path $W/ngx_u; scgi_temp_path $W/ngx_s; keepalive_requests 10000000;
  upstream fast { server 127.0.0.1:$MOCK_PORT; keepalive 256; keepalive_requests 10000000; }
  upstream drip { server 127.0.0.1:$DRIP_PORT; keepalive 16; }
  server { listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }
  server { listen 127.0.0.1:$NGINX_DRIP_PORT;
    location / { proxy_pass http://drip; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }
}
EOF
} >"$W/nginx.conf"
nginx -p "$W" -c "$W/nginx.conf" -g 'daemon off;' >"$W/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=($NGINX_PID)

TG_PORT=() TG_PID=() TG_KEY=()
for i in "${!BINS[@]}"; do
  mkdir -p "$W/t$i"
  tollgate_config "$W/t$i/tollgate.toml" "$W/t$i" "$MOCK_PORT" sk-admin-ab <<EOF

[[providers]]
name = "drip"
kind = "openai"
base_url = "http://127.0.0.1:$DRIP_PORT/v1"
api_key = "sk-x"

[[models]]
name = "drip-mini"
provider = "drip"
upstream_model = "gpt-4o-mini"
EOF
  "${BINS[$i]}" --config "$W/t$i/tollgate.toml" serve >"$W/t$i/log" 2>&1 &
  TG_PID+=($!)
  PIDS+=($!)
  port=$(port_in_log "$W/t$i/log" 'listening on http://')
  TG_PORT+=("$port")
  TG_KEY+=("$(bench_key "$port" sk-admin-ab ab)")
done
sleep 1

# CPU ticks of a process (all threads), or of its threads whose name matches a pattern.
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
user_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12}'; }
# The machine's CPU ticks in all and stolen by the hypervisor (other guests), from /proc/stat.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9}' /proc/stat; }
thread_ticks() { # pid pattern
  local t s=0 n
  for t in /proc/"$1"/task/*; do
    grep -qE "$2" "$t/comm" 2>/dev/null || continue
    n=$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
    s=$((s + ${n:-0}))
  done
  echo $s
}
RESULTS=$W/results
run() { # label port key body conc pid [pid...]
  local label=$1 port=$2 key=$3 body=$4 conc=$5; shift 5
  local threads=2 t0=0 t1=0 u0=0 u1=0 p w0 l0 s0 out m0 m1
  [ "$conc" = 1 ] && threads=1
  for p in "$@"; do t0=$((t0 + $(ticks "$p"))) u0=$((u0 + $(user_ticks "$p"))); done
  m0=$(machine_ticks)
  w0=$(thread_ticks "$1" '^tollgate-worker') l0=$(thread_ticks "$1" '^tokio-rt') s0=$(thread_ticks "$1" '^sqlx')
  out=$(BODY="$W/$body" KEY="$key" wrk -t"$threads" -c"$conc" -d"${SECS}s" --timeout 10s -s "$W/post.lua" \
    "http://127.0.0.1:$port/v1/chat/completions" | grep '^AB ') || { echo "bench/ab.sh: wrk failed ($label)" >&2; exit 1; }
  for p in "$@"; do t1=$((t1 + $(ticks "$p"))) u1=$((u1 + $(user_ticks "$p"))); done
  m1=$(machine_ticks)
  [ "$label" = warm ] && return 0
  echo "$label $out $((t1 - t0)) $(( $(thread_ticks "$1" '^tollgate-worker') - w0 )) \
$(( $(thread_ticks "$1" '^tokio-rt') - l0 )) $(( $(thread_ticks "$1" '^sqlx') - s0 )) $((u1 - u0)) $m0 $m1" >>"$RESULTS"
}
nginx_pids() { echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"; }
# in_turn ROUND TARGET...: the targets in the order round ROUND runs them, rotated by one each
# round. In a fixed order a target ran while the one before it was still committing its
# ledger backlog: whichever build ran second measured ~10% slower than the same build first.
in_turn() {
  local r=$1 n i; shift
  n=$#
  local t=("$@")
  for i in $(seq 0 $((n - 1))); do echo "${t[$(( (i + r) % n ))]}"; done
}
ttfb() { # label addr key
  local out
  out=$(BENCH_KEY="$3" "$CLIENT" ttfb --addr "$2" --body-file "$W/drip.json" --n 200 --warmup 10 | tr -d '\n') \
    || { echo "bench/ab.sh: bench-client failed ($1)" >&2; exit 1; }
  echo "$1 $out" >>"$W/ttfb"
}
for c in $CASES; do
  if [ "$c" = ttfb ]; then
    echo "[ab] ttfb: $ROUNDS round(s) of 200 streaming requests per target" >&2
    for r in $(seq "$ROUNDS"); do
      for t in $(in_turn "$r" direct nginx "${!BINS[@]}"); do
        case $t in
          direct) ttfb direct "127.0.0.1:$DRIP_PORT" "" ;;
          nginx) ttfb nginx "127.0.0.1:$NGINX_DRIP_PORT" "" ;;
          *) ttfb "tollgate#$((t + 1))" "127.0.0.1:${TG_PORT[$t]}" "${TG_KEY[$t]}" ;;
        esac
      done
    done
    continue
  fi
  case $c in
    chat_c64) body=chat.json conc=64 ;;
    stream_c64) body=stream.json conc=64 ;;
    chat_c1) body=chat.json conc=1 ;;
    *) echo "bench/ab.sh: unknown case $c" >&2; exit 2 ;;
  esac
  echo "[ab] $c: $ROUNDS round(s) of ${SECS} s per target" >&2
  # shellcheck disable=SC2046
  run warm "$NGINX_PORT" "" $body $conc $(nginx_pids)
  for i in "${!BINS[@]}"; do run warm "${TG_PORT[$i]}" "${TG_KEY[$i]}" $body $conc "${TG_PID[$i]}"; done
  for r in $(seq "$ROUNDS"); do
    [ "$DIRECT" = 1 ] && run "$c direct" "$MOCK_PORT" "" $body $conc "${PIDS[0]}"
    for t in $(in_turn "$r" nginx "${!BINS[@]}"); do
      if [ "$t" = nginx ]; then
        # shellcheck disable=SC2046
        run "$c nginx" "$NGINX_PORT" "" $body $conc $(nginx_pids)
      else
        run "$c tollgate#$((t + 1))" "${TG_PORT[$t]}" "${TG_KEY[$t]}" $body $conc "${TG_PID[$t]}"
      fi
    done
  done
done

echo
for i in "${!BINS[@]}"; do echo "tollgate#$((i + 1)) = ${BINS[$i]}"; done
touch "$RESULTS" "$W/ttfb"
python3 - "$RESULTS" "$(getconf CLK_TCK)" "$W/ttfb" <<'EOF'
import collections, json, statistics, sys
hz = int(sys.argv[2])
# A streamed answer from the mock is 20 events (role, 16 content chunks, finish, usage, [DONE]),
# each in its own upstream write.
EVENTS = 20
ttfb = collections.OrderedDict()
for line in open(sys.argv[3]):
    target, doc = line.split(" ", 1)
    ttfb.setdefault(target, []).append(json.loads(doc))
if ttfb:
    print(f"{'ttfb':<11} {'target':<11} {'first byte p50 µs':>17} {'p90 µs':>7} {'p99 µs':>7}  p50 by round")
    for target, runs in ttfb.items():
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"{'':<11} {target:<11} {med('first_byte_p50_us'):17.0f} {med('first_byte_p90_us'):7.0f}"
              f" {med('first_byte_p99_us'):7.0f}  {[round(r['first_byte_p50_us']) for r in runs]}")
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    case, target, _, n, dur_us, p50, p99, errors, cpu, workers, ledger, sqlite, user, all0, stolen0, all1, stolen1 = line.split()
    n = int(n)
    per = lambda t: int(t) / hz * 1e6 / n  # µs of CPU per request
    steal = 100 * (int(stolen1) - int(stolen0)) / max(1, int(all1) - int(all0))
    rows.setdefault((case, target), []).append(
        (n / (int(dur_us) / 1e6), int(p50), int(p99), per(cpu), per(workers), per(ledger), per(sqlite), int(errors),
         per(user), steal))
if rows:
  print(f"{'case':<11} {'target':<11} {'req/s':>8} {'p50 µs':>7} {'p99 µs':>7} {'CPU µs/req':>10} {'user':>5}"
      f" {'workers':>8} {'ledger':>7} {'sqlite':>7} {'errors':>6} {'steal':>5}  req/s by round")
for (case, target), runs in rows.items():
    med = [statistics.median(col) for col in zip(*runs)]
    split = f"{med[4]:8.1f} {med[5]:7.1f} {med[6]:7.1f}" if target.startswith("tollgate") else f"{'':8} {'':7} {'':7}"
    direct = target == "direct"
    cpu, user = ("", "") if direct else (f"{med[3]:.1f}", f"{med[8]:.1f}")
    print(f"{case:<11} {target:<11} {med[0]:8.0f} {med[1]:7.0f} {med[2]:7.0f} {cpu:>10} {user:>5} {split}"
          f" {sum(r[7] for r in runs):6d} {med[9]:4.0f}%  {[round(r[0]) for r in runs]}")
    if case.startswith("stream") and not direct:
        print(f"{'':<11} {'':<11} {'':>8} {'':>7} {'':>7} {med[3] / EVENTS:10.2f} µs of CPU per relayed event")
stolen = [r[9] for runs in rows.values() for r in runs]
if stolen and max(stolen) >= 5:
    print(f"steal: the hypervisor took {max(stolen):.0f}% of the machine in the worst run "
          f"({sum(s >= 5 for s in stolen)} of {len(stolen)} runs at 5% or more): compare those rounds with care")
EOF
