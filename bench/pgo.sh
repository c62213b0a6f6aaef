#!/usr/bin/env bash
# A profile-guided (PGO) release build of tollgate: builds an instrumented binary, runs it
# under the benchmark's own workload for a few seconds (a team with a budget, a key, the
# SQLite ledger; non-streamed chat at c=64 and c=1, streamed chat at c=64, a long prompt,
# spend and log queries), merges the profile, and builds the release binary with it.
#
#   bench/pgo.sh [--out PATH] [--secs S]
#     --out PATH   where the optimised binary goes (default target/pgo/tollgate; it is also
#                  left in target/pgo-use/release, with the benchmark's mock and client)
#     --secs S     seconds of each load in the training run (default 3)
#
# Needs llvm-profdata of the LLVM that rustc is built on (`rustc -vV`; Debian bookworm has
# it as llvm-22) and wrk; both are installed from Debian when missing. The instrumented and
# the optimised builds use their own target directories (target/pgo-gen, target/pgo-use),
# so they never invalidate the ordinary target/release build.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET/pgo/tollgate SECS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift ;;
    --secs) SECS=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench/pgo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '[pgo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools ----------------------------------------------------------------------------------
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || die "cannot tell rustc's LLVM version"
profdata() {
  local c
  for c in "llvm-profdata-$LLVM_MAJOR" "/usr/lib/llvm-$LLVM_MAJOR/bin/llvm-profdata"; do
    command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }
  done
}
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
if [ -z "$(profdata)" ] || ! command -v wrk >/dev/null; then
  log "installing llvm-$LLVM_MAJOR (llvm-profdata) and wrk from Debian"
  debian_install "llvm-$LLVM_MAJOR" wrk
fi
PROFDATA=$(profdata)
[ -n "$PROFDATA" ] || die "no llvm-profdata for LLVM $LLVM_MAJOR (rustc's); install llvm-$LLVM_MAJOR"
command -v curl >/dev/null && command -v python3 >/dev/null || die "needs curl and python3"

work_dir pgo

# --- 1. instrumented build ------------------------------------------------------------------
GEN=$TARGET/pgo-gen USE=$TARGET/pgo-use
log "building the instrumented binary (target/pgo-gen) and the mock upstream"
# Build scripts and proc macros are instrumented too and write profiles while compiling:
# those go to a directory of their own, the server's (LLVM_PROFILE_FILE) to $W/raw. A fixed
# path keeps RUSTFLAGS, and so cargo's cached instrumented build, the same from run to run.
# The training's mock upstream comes from the same build (so no third build of every crate);
# it is instrumented too, and its profile, written to the build directory, is not used.
(cd "$ROOT" && CARGO_TARGET_DIR=$GEN RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$GEN/build-profiles" \
  cargo build --release --locked --quiet --bin tollgate --bin mock-upstream)

# --- 2. training run ------------------------------------------------------------------------
python3 "$ROOT/bench/bodies.py" "$W" --long
post_lua "$W/post.lua"
"$GEN/release/mock-upstream" --port 0 >"$W/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PORT=$(port_in_log "$W/mock.log" 'listening on ')
mkdir -p "$W/db"
tollgate_config "$W/tollgate.toml" "$W/db" "$MOCK_PORT" sk-admin-pgo </dev/null
LLVM_PROFILE_FILE="$W/raw/tollgate-%p-%m.profraw" "$GEN/release/tollgate" --config "$W/tollgate.toml" serve >"$W/tollgate.log" 2>&1 &
TG=$!
PIDS+=($TG)
PORT=$(port_in_log "$W/tollgate.log" 'listening on http://')
KEY=$(bench_key "$PORT" sk-admin-pgo pgo)
# A team near its limit: the long prompt's reservation must count its tokens exactly.
TIGHT=$(bench_key "$PORT" sk-admin-pgo tight 0.05)
URL=http://127.0.0.1:$PORT
load() { # body connections seconds
  BODY="$W/$1" KEY="$KEY" wrk -t"$(( $2 < 2 ? 1 : 2 ))" -c"$2" -d"$3s" --timeout 10s -s "$W/post.lua" "$URL/v1/chat/completions" >/dev/null
}
log "training: chat c=64, stream c=64, chat c=1, a long prompt, queries (${SECS} s each)"
load chat.json 64 "$SECS"
load stream.json 64 "$SECS"
load chat.json 1 1
for _ in 1 2 3 4 5 6; do
  curl -sS -o /dev/null -H "Authorization: Bearer $TIGHT" -H 'Content-Type: application/json' \
    --data-binary "@$W/long.json" "$URL/v1/chat/completions"
done
for q in "/spend" "/spend?group_by=team,key,model,day" "/spend?format=csv" "/spend/logs?limit=100"; do
  curl -sSf -H "Authorization: Bearer $KEY" "$URL$q" >/dev/null
done
# SIGTERM: tollgate drains, exits 0, and the profile is written on exit.
kill -TERM "$TG"
wait "$TG" || die "the instrumented tollgate exited with an error (see $W/tollgate.log)"
ls "$W"/raw/*.profraw >/dev/null 2>&1 || die "the training run wrote no profile"
mkdir -p "$TARGET/pgo"
"$PROFDATA" merge -o "$W/merged.profdata" "$W"/raw/*.profraw
# Named by its content: cargo does not track the file, but a new name changes RUSTFLAGS and
# so rebuilds every crate with the new profile.
PROFILE=$TARGET/pgo/tollgate-$(sha256sum "$W/merged.profdata" | cut -c1-16).profdata
rm -f "$TARGET"/pgo/tollgate-*.profdata
mv "$W/merged.profdata" "$PROFILE"

# --- 3. optimised build -----------------------------------------------------------------------
log "building with the profile (target/pgo-use)"
(cd "$ROOT" && CARGO_TARGET_DIR=$USE RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
  cargo build --release --locked --quiet --bin tollgate --bin mock-upstream --bin bench-client)
mkdir -p "$(dirname "$OUT")"
cp "$USE/release/tollgate" "$OUT"
log "done: $OUT (and the benchmark's mock-upstream and bench-client in $USE/release)"
