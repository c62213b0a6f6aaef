# Shared by the bench scripts (sourced, not run): ports, the wrk request script, and a
# tollgate with every accounting feature on (a team with a budget and a key).

# work_dir NAME: a fresh folder /tmp/tollgate-NAME.* in $W, an empty PIDS, and an exit trap
# that stops every process in PIDS and removes the folder.
work_dir() {
  W=$(mktemp -d "/tmp/tollgate-$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"' EXIT
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# port_in_log FILE PATTERN [SECONDS]: waits (default 10 s) for a line with PATTERN followed
# by a URL in FILE and prints the URL's port.
port_in_log() {
  local i
  for i in $(seq $((${3:-10} * 10))); do
    grep -q "$2" "$1" 2>/dev/null && { grep -o "$2[^ \"]*" "$1" | head -1 | sed -E 's#.*:([0-9]+).*#\1#'; return; }
    sleep 0.1
  done
  cat "$1" >&2; echo "$(basename "$0"): no '$2' in $1" >&2; exit 1
}

# post_lua FILE: a wrk script that POSTs the file named by $BODY as JSON, with $KEY as the
# bearer key when set. A `done` function can be appended.
post_lua() {
  cat >"$1" <<'LUA'
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.method = "POST"; wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
LUA
}

# tollgate_config FILE DIR MOCK_PORT MASTER_KEY: a config serving gpt-4o-mini from the mock
# at MOCK_PORT, with its SQLite ledger in DIR, followed by the TOML on standard input
# (give </dev/null for none).
tollgate_config() {
  {
    cat <<TOML
listen = "127.0.0.1:0"
database_url = "sqlite://$2/tollgate.db"
master_key = "$4"

[[providers]]
name = "fast"
kind = "openai"
base_url = "http://127.0.0.1:$3/v1"
api_key = "sk-x"

[[models]]
name = "gpt-4o-mini"
provider = "fast"
TOML
    cat
  } >"$1"
}

# bench_key PORT MASTER_KEY TEAM [LIMIT_USD]: creates TEAM with a budget (so every request
# takes a reservation; default $1,000,000) and a key of it on the tollgate at PORT; prints the key.
bench_key() {
  local admin=(curl -sSf -X POST -H "Authorization: Bearer $2" -H 'Content-Type: application/json')
  "${admin[@]}" -d "{\"name\":\"$3\",\"limit_usd\":${4:-1000000},\"period\":\"monthly\"}" "http://127.0.0.1:$1/admin/teams" >/dev/null
  "${admin[@]}" -d "{\"team\":\"$3\",\"name\":\"$3\"}" "http://127.0.0.1:$1/admin/keys" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

# debian_install PKG...: installs Debian packages quietly (with sudo unless root).
debian_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
