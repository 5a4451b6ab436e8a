#!/usr/bin/env bash
# Load-test the streaming `llm` model with perf_analyzer over gRPC.
#
#   client/run_perf_analyzer.sh                                # concurrency 1, 2, 3, 4
#   PERF_CONCURRENCY=4:16:4 client/run_perf_analyzer.sh        # 4, 8, 12, 16 (start:end:step)
#   client/run_perf_analyzer.sh --measurement-interval 20000 -f results.csv
#
# Extra arguments go to perf_analyzer after the defaults; a load option among them
# (--concurrency-range, --request-rate-range, ...) replaces the default concurrency range. Environment: PERF_URL (gRPC host:port, default 127.0.0.1:8001), PERF_MODEL
# (llm), PERF_CONCURRENCY (start:end:step, default 1:4:1), PERF_INPUT_DATA
# (client/perf_inputs.json), PERF_MEASUREMENT_MS (10000).
#
# With --streaming perf_analyzer counts every token response ("Response Throughput") and
# times each request from send to its final response. perf_analyzer needs libb64.so.0d
# (Debian libb64-0d, installed by scripts/setup.sh) and libcudart.so.12 (the
# nvidia-cuda-runtime-cu12 wheel), whose directory this script puts on LD_LIBRARY_PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
PERF="$ROOT/.venv/bin/perf_analyzer"

[[ -x "$PERF" ]] || { echo "error: $PERF not found; run scripts/setup.sh" >&2; exit 1; }

cudart_dir="$("$PY" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)" \
    || { echo "error: nvidia-cuda-runtime-cu12 is not installed in .venv; run scripts/setup.sh" >&2; exit 1; }
export LD_LIBRARY_PATH="$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if ldd "$PERF" | grep -q 'not found'; then
    echo "error: perf_analyzer is missing shared libraries:" >&2
    ldd "$PERF" | grep 'not found' >&2
    echo "(libb64.so.0d comes from 'apt-get install libb64-0d')" >&2
    exit 1
fi

# perf_analyzer merges a repeated --concurrency-range into the first one instead of
# replacing it, so the default is left out when the caller sets the load.
load=(--concurrency-range "${PERF_CONCURRENCY:-1:4:1}")
for arg in "$@"; do
    case "$arg" in
        --concurrency-range* | --request-rate-range* | --request-intervals* \
            | --periodic-concurrency-range*) load=() ;;
    esac
done

exec "$PERF" \
    -m "${PERF_MODEL:-llm}" \
    -u "${PERF_URL:-127.0.0.1:8001}" \
    -i grpc \
    --streaming \
    --input-data "${PERF_INPUT_DATA:-$ROOT/client/perf_inputs.json}" \
    "${load[@]}" \
    --measurement-interval "${PERF_MEASUREMENT_MS:-10000}" \
    "$@"
