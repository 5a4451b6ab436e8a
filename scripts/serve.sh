#!/usr/bin/env bash
# Serve model_repository/ with Triton Inference Server until Ctrl-C.
#
#   scripts/serve.sh                      # gRPC 8001, HTTP 8000, metrics 8002 on 127.0.0.1
#   HTTP_PORT=9000 GRPC_PORT=9001 METRICS_PORT=9002 scripts/serve.sh
#   scripts/serve.sh -- --log-verbose=1   # extra arguments go to the launcher
#
# Environment: HTTP_PORT, GRPC_PORT, METRICS_PORT, HOST (bind address, default 127.0.0.1),
# MODEL_REPOSITORY (default: model_repository/ of this checkout).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"

exec "$ROOT/.venv/bin/python" -m preemptserve.launcher \
    --model-repository "${MODEL_REPOSITORY:-$ROOT/model_repository}" \
    --host "${HOST:-127.0.0.1}" \
    --http-port "${HTTP_PORT:-8000}" \
    --grpc-port "${GRPC_PORT:-8001}" \
    --metrics-port "${METRICS_PORT:-8002}" \
    "$@"
