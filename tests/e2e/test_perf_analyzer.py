"""A short perf_analyzer run through client/run_perf_analyzer.sh against the server."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from preemptserve.launcher import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "client" / "run_perf_analyzer.sh"
TOKENS_PER_REQUEST = 32  # max_tokens and min_length in client/perf_inputs.json


def _missing_libraries() -> list[str]:
    ldd = subprocess.run(
        ["ldd", str(REPO_ROOT / ".venv" / "bin" / "perf_analyzer")],
        capture_output=True,
        text=True,
    )
    # libcudart is found by the script itself (LD_LIBRARY_PATH), not by plain ldd.
    return [
        line.strip()
        for line in ldd.stdout.splitlines()
        if "not found" in line and "libcudart" not in line
    ]


@pytest.mark.slow
def test_perf_analyzer_counts_every_streamed_token(
    triton_server: TritonServer, tmp_path: Path
) -> None:
    missing = _missing_libraries()
    if missing:
        pytest.skip(f"perf_analyzer cannot run: {missing} (apt-get install libb64-0d)")
    report = tmp_path / "perf.csv"
    run = subprocess.run(
        [
            str(SCRIPT),
            "--concurrency-range=2",
            "--measurement-mode=count_windows",
            "--measurement-request-count=8",
            "--stability-percentage=50",
            "-f",
            str(report),
        ],
        env={**os.environ, "PERF_URL": triton_server.grpc_url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = list(csv.DictReader(report.open()))
    requests_per_s = float(row["Inferences/Second"])
    responses_per_s = float(row["Response Throughput"])
    assert requests_per_s > 0
    # One streamed response per token: the response rate is the request rate times 32.
    assert responses_per_s == pytest.approx(TOKENS_PER_REQUEST * requests_per_s, rel=0.05)
