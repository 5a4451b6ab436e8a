#!/usr/bin/env bash
# Stream tokens over HTTP with Triton's generate extension (server-sent events): one
# `data: {"text_output": ...}` line per token.
#
#   client/curl_generate_stream.sh ["prompt"] [max_tokens]
#
# TRITON_HTTP_URL sets the server (default http://127.0.0.1:8000).
set -euo pipefail

prompt="${1:-The capital of France is}"
prompt="${prompt//\\/\\\\}"
prompt="${prompt//\"/\\\"}"

curl -sSN -X POST "${TRITON_HTTP_URL:-http://127.0.0.1:8000}/v2/models/llm/generate_stream" \
    -H 'Content-Type: application/json' \
    -d "{\"text_input\": \"$prompt\", \"max_tokens\": ${2:-32}, \"stream\": true}"
