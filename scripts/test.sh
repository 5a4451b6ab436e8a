#!/usr/bin/env bash
# Run the test suite (unit, engine and end-to-end tests against a real tritonserver).
#
#   scripts/test.sh                 # pytest -q
#   scripts/test.sh tests/unit -x   # arguments replace the default -q
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"

cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- -q
fi
exec "$ROOT/.venv/bin/python" -m pytest "$@"
