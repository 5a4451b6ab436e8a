"""Reports: JSON, Markdown tables and PNG plots from one result dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preemptserve.bench.metrics import SLO, RequestTimeline, summarize
from preemptserve.bench.report import (
    finish_result,
    markdown,
    new_result,
    plot_cdfs,
    plot_sweep,
    save_json,
)

TIMELINES = [
    RequestTimeline("a", 0.0, 5, [1.0, 1.5, 2.0], 2.0),
    RequestTimeline("b", 0.5, 7, [0.9, 1.0], 1.0),
]


def test_markdown_and_json(tmp_path: Path) -> None:
    result = new_result(
        "simulate",
        workload=None,
        parameters={"max_batch_size": "8"},
        slo={"ttft_s": 1.0, "tbt_s": 0.6},
    )
    result["runs"] = {
        "fcfs": {
            "policy": "fcfs",
            "backend": "sim",
            "summary": summarize(TIMELINES, SLO(1.0, 0.6)),
            "counters": {"num_iterations": 3},
        }
    }
    result["fidelity"] = [
        {
            "policy": "fcfs",
            "server_mean_jct_s": 1.0,
            "sim_mean_jct_s": 1.1,
            "mean_jct_error": 0.1,
            "server_p99_jct_s": 2.0,
            "sim_p99_jct_s": 1.8,
            "p99_jct_error": -0.1,
            "server_mean_ttft_s": 0.5,
            "sim_mean_ttft_s": 0.5,
            "mean_ttft_error": 0.0,
        }
    ]
    finish_result(result)
    text = markdown(result)
    assert "| fcfs | sim | 2 | 1.250 |" in text  # mean JCT (2.0 + 0.5) / 2
    assert "50.0%" in text  # b meets the SLO, a (TTFT 1.0, not < 1.0) does not
    assert "+10.0%" in text and "-10.0%" in text
    path = save_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text())["runs"]["fcfs"]["summary"]["num_requests"] == 2


def test_plots_are_written(tmp_path: Path) -> None:
    cdf = plot_cdfs({"x": TIMELINES}, tmp_path / "cdf.png", "t")
    points = [
        {
            "policy": "fcfs",
            "rate_rps": r,
            "attainment": a,
            "mean_jct_s": 1.0 * r,
            "p99_jct_s": 2.0 * r,
        }
        for r, a in ((1, 1.0), (2, 0.5))
    ]
    sweep = plot_sweep(points, tmp_path / "sweep.png")
    for path in (cdf, sweep):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_rows_average_repeats_and_seeds_and_show_ranges() -> None:
    from preemptserve.bench.fidelity import fidelity_row
    from preemptserve.bench.report import fidelity_table

    def summary(mean_jct: float, p99_jct: float) -> dict:
        return {"jct_s": {"mean": mean_jct, "p99": p99_jct}, "ttft_s": {"mean": 0.1}}

    row = fidelity_row("fcfs", [summary(2.0, 5.0), summary(4.0, 7.0)],
                       [summary(3.3, 5.4), summary(3.0, 6.6), summary(2.7, 6.0)])
    assert row["server_mean_jct_s"] == 3.0 and row["sim_mean_jct_s"] == pytest.approx(3.0)
    assert row["mean_jct_error"] == pytest.approx(0.0, abs=1e-12)
    assert row["p99_jct_error"] == pytest.approx(6.0 / 6.0 - 1, abs=1e-12)
    assert row["server_p99_jct_range_s"] == [5.0, 7.0]
    assert row["sim_mean_jct_range_s"] == [2.7, 3.3]
    text = fidelity_table([row])
    assert "3.000 (2.000-4.000)" in text and "(2.700-3.300)" in text
