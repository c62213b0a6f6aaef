#!/usr/bin/env bash
# What shared budgets cost: the same load against
#   sqlite     one tollgate (2 workers), budgets in its memory, SQLite ledger
#   pg         two replicas (1 worker each) behind nginx, budgets and ledger in PostgreSQL
#   pg+redis   the same two replicas' setup, reservations in Redis, ledger in PostgreSQL
# Every request carries a team budget (a reservation taken and settled), as in bench/run.sh.
# wrk runs non-streaming chat at c=64 against each setup in turn, rotating the order each
# round; printed are medians over rounds of requests/s, p50 / p99 latency, and the CPU a
# request costs: tollgate's processes, and with them the database's and Redis's.
#
#   bench/replicas.sh [--rounds N] [--secs S]      (defaults: 3 rounds of 5 s)
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth; a database is created and
# dropped) and Redis on 127.0.0.1:6379 (a key prefix of its own, deleted at the end); installs
# wrk and nginx from Debian when missing, and builds the release binaries when missing. Do not build while it runs.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3 SECS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench/replicas.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PSQL=(psql -h 127.0.0.1 -U postgres -qtA)
"${PSQL[@]}" -d postgres -c 'SELECT 1' >/dev/null || { echo "bench/replicas.sh: needs PostgreSQL on 127.0.0.1:5432" >&2; exit 2; }
redis-cli -h 127.0.0.1 ping >/dev/null || { echo "bench/replicas.sh: needs Redis on 127.0.0.1:6379" >&2; exit 2; }
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
for b in tollgate mock-upstream; do
  [ -x "$BIN_DIR/$b" ] || (cd "$ROOT" && cargo build --release --quiet --bin tollgate --bin mock-upstream)
done

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
command -v wrk >/dev/null && command -v nginx >/dev/null || debian_install wrk nginx
work_dir replicas
DB="tollgate_bench_$$" PREFIX="tollgate-bench-$$:"
cleanup_services() {
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -h 127.0.0.1 --scan --pattern "$PREFIX*" | xargs -r redis-cli -h 127.0.0.1 del >/dev/null 2>&1 || true
}
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; cleanup_services; rm -rf "$W"' EXIT

python3 "$ROOT/bench/bodies.py" "$W"
post_lua "$W/post.lua"
cat >>"$W/post.lua" <<'EOF'
done = function(s, latency)
  io.write(string.format("RUN %d %d %d %d %d\n", s.requests, s.duration, latency:percentile(50),
    latency:percentile(99), s.errors.status + s.errors.read + s.errors.write + s.errors.timeout + s.errors.connect))
end
EOF

"$BIN_DIR/mock-upstream" --port 0 >"$W/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT=$(port_in_log "$W/mock.log" 'listening on ')

# start DIR DATABASE_URL WORKERS [EXTRA TOML]: a tollgate; prints its port.
start() {
  mkdir -p "$1"
  tollgate_config "$1/tollgate.toml" "$1" "$MOCK_PORT" sk-admin-bench </dev/null
  sed -i "s#^database_url = .*#database_url = \"$2\"\nworkers = $3\njournal_dir = \"$1/journal\"\n${4:-}#" "$1/tollgate.toml"
  "$BIN_DIR/tollgate" --config "$1/tollgate.toml" serve >"$1/log" 2>&1 &
  PIDS+=($!)
  echo $! >"$1/pid"
  port_in_log "$1/log" 'listening on http://'
}

"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB" >/dev/null
PG_URL="postgres://postgres@127.0.0.1:5432/$DB"
declare -A PORT KEY TG_PIDS
PORT[sqlite]=$(start "$W/sqlite" "sqlite://$W/sqlite/tollgate.db" 2)
TG_PIDS[sqlite]=$(cat "$W/sqlite/pid")
for setup in pg redis; do
  extra=""
  [ "$setup" = redis ] && extra="redis_url = \"redis://127.0.0.1:6379/0\"\nredis_key_prefix = \"$PREFIX\""
  p1=$(start "$W/$setup-1" "$PG_URL" 1 "$extra")
  p2=$(start "$W/$setup-2" "$PG_URL" 1 "$extra")
  TG_PIDS[$setup]="$(cat "$W/$setup-1/pid") $(cat "$W/$setup-2/pid")"
  lb=$(free_port)
  {
    [ "$(id -u)" = 0 ] && echo "user root;"
    cat <<EOF
worker_processes 1; pid $W/nginx-$setup.pid; error_log $W/nginx-$setup.err warn;
events { worker_connections 4096; }
http {
  access_log off; client_body_temp_path $W/ngx_b; proxy_temp_path $W/ngx_p; fastcgi_temp_path $W/ngx_f;
  uwsgi_temp_path $W/ngx_u; scgi_temp_path $W/ngx_s; keepalive_requests 10000000;
  upstream replicas { server 127.0.0.1:$p1; server 127.0.0.1:$p2; keepalive 128; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$lb;
    location / { proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }
}
EOF
  } >"$W/nginx-$setup.conf"
  nginx -p "$W" -c "$W/nginx-$setup.conf" -g 'daemon off;' >"$W/nginx-$setup.log" 2>&1 &
  PIDS+=($!)
  PORT[$setup]=$lb
  KEY[$setup]=$(bench_key "$p1" sk-admin-bench "bench-$setup")
done
KEY[sqlite]=$(bench_key "${PORT[sqlite]}" sk-admin-bench bench-sqlite)
sleep 1

ticks() { local p s=0; for p in "$@"; do s=$((s + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}'))); done; echo $s; }
service_pids() { pgrep -d ' ' -f '^postgres' || true; pgrep -d ' ' redis-server || true; }
RESULTS=$W/results
run() { # setup
  local s=$1 t0 t1 d0 d1 out
  # shellcheck disable=SC2086
  t0=$(ticks ${TG_PIDS[$s]}) d0=$(ticks $(service_pids))
  out=$(BODY="$W/chat.json" KEY="${KEY[$s]}" wrk -t2 -c64 -d"${SECS}s" --timeout 10s -s "$W/post.lua" \
    "http://127.0.0.1:${PORT[$s]}/v1/chat/completions" | grep '^RUN ')
  # shellcheck disable=SC2086
  t1=$(ticks ${TG_PIDS[$s]}) d1=$(ticks $(service_pids))
  echo "$s $out $((t1 - t0)) $((d1 - d0))" >>"$RESULTS"
}
for s in sqlite pg redis; do SECS=1 run "$s"; done
: >"$RESULTS"
SETUPS=(sqlite pg redis)
for r in $(seq "$ROUNDS"); do
  echo "[replicas] round $r of $ROUNDS" >&2
  for i in 0 1 2; do run "${SETUPS[$(( (i + r) % 3 ))]}"; done
done

python3 - "$RESULTS" "$(getconf CLK_TCK)" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
tck = int(sys.argv[2])
names = {"sqlite": "1 replica, SQLite (budgets in memory)", "pg": "2 replicas, PostgreSQL",
         "redis": "2 replicas, PostgreSQL + Redis"}
print("| setup | requests/s | p50 ms | p99 ms | tollgate CPU µs/req | + database/Redis CPU µs/req | errors |")
print("|---|---|---|---|---|---|---|")
base = None
for s in ["sqlite", "pg", "redis"]:
    rs = [r for r in rows if r[0] == s]
    rps = statistics.median(int(r[2]) / (int(r[3]) / 1e6) for r in rs)
    p50 = statistics.median(int(r[4]) for r in rs) / 1000
    p99 = statistics.median(int(r[5]) for r in rs) / 1000
    cpu = statistics.median(int(r[7]) / tck * 1e6 / int(r[2]) for r in rs)
    svc = statistics.median(int(r[8]) / tck * 1e6 / int(r[2]) for r in rs)
    errors = sum(int(r[6]) for r in rs)
    base = base or rps
    print(f"| {names[s]} | {rps:,.0f} ({rps / base:.2f}×) | {p50:.2f} | {p99:.2f} | {cpu:.1f} | {svc:.1f} | {errors} |")
EOF
