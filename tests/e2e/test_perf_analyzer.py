"""A short real perf_analyzer --streaming run against the server succeeds and counts tokens."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_perf_analyzer_streaming_run(triton_server, tmp_path):
    report = tmp_path / "perf.csv"
    env = {**os.environ, "PERF_URL": triton_server.grpc_url, "PERF_MEASUREMENT_MS": "3000"}
    proc = subprocess.run(
        [str(REPO_ROOT / "client" / "run_perf_analyzer.sh"), "--concurrency-range", "2",
         "-f", str(report), "--max-trials", "3", "--stability-percentage", "999"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(report.open()))
    assert rows, proc.stdout
    row = rows[0]
    assert float(row["Inferences/Second"]) > 0
    # Each request streams 32 tokens (min_length = max_tokens = 32 in perf_inputs.json).
    assert float(row["Response Throughput"]) >= 20 * float(row["Inferences/Second"])
