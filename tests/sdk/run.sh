#!/usr/bin/env bash
# Runs the openai-SDK end-to-end suite against an already built tollgate binary
# ($TOLLGATE_BIN, default target/debug/tollgate). Creates a venv at $SDK_VENV on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${SDK_VENV:-/tmp/tollgate-sdk-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import openai, pytest' 2>/dev/null; then
    "$VENV/bin/pip" install -q openai pytest
fi
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk "$@"
rc=$?
exit $rc
