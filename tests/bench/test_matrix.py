"""The policy matrix: its workloads, the target checker, and a tiny grid end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preemptserve.bench.cli import main
from preemptserve.bench.matrix import (
    GIB,
    METRICS,
    WORKLOADS,
    evaluate_targets,
    heavy_tailed,
    matrix_workload,
    ratio,
    regimes_for,
)
from preemptserve.bench.workload import PRESETS, synthetic
from preemptserve.core.scheduler import available_policies


@pytest.mark.parametrize(
    ("preset", "input_median", "input_mean", "output_median", "output_mean"),
    [("conversation", 1000, 1500, 180, 250), ("code", 1500, 2000, 30, 50)],
)
def test_new_presets_have_the_stated_medians_and_means(
    preset: str, input_median: float, input_mean: float, output_median: float,
    output_mean: float,
) -> None:
    spec = PRESETS[preset]
    assert (spec.input.median_tokens, spec.input.mean_tokens) == (input_median, input_mean)
    assert (spec.output.median_tokens, spec.output.mean_tokens) == (output_median, output_mean)
    assert "assumed" in spec.source
    w = synthetic(preset, 50_000, rate_rps=10.0, seed=2)  # unclipped
    inputs = np.array([r.input_tokens for r in w.requests])
    outputs = np.array([r.output_tokens for r in w.requests])
    assert np.median(inputs) == pytest.approx(input_median, rel=0.03)
    assert inputs.mean() == pytest.approx(input_mean, rel=0.03)
    assert np.median(outputs) == pytest.approx(output_median, rel=0.05)
    assert outputs.mean() == pytest.approx(output_mean, rel=0.03)


def test_matrix_workloads() -> None:
    bursty = matrix_workload("bursty", 20_000, seed=1, max_context=4096)
    sharegpt = matrix_workload("sharegpt", 20_000, seed=1, max_context=4096)
    gaps = np.diff([r.arrival_time_s for r in bursty.requests])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    assert 1 / gaps.mean() == pytest.approx(1.0, rel=0.1)  # nominal 1/s, rescaled per cell
    # Same lengths as sharegpt (drawn before the arrivals): only the arrivals differ.
    assert [r.output_tokens for r in bursty.requests] == [
        r.output_tokens for r in sharegpt.requests]
    assert bursty.name == "bursty" and bursty.meta["cv"] == 3.0
    assert all(r.input_tokens + r.output_tokens <= 4096 for r in bursty.requests)
    assert WORKLOADS["code"].engine == {"max_batch_size": 64, "max_num_tokens": 4096}
    assert WORKLOADS["alpaca"].engine == {"max_batch_size": 16, "max_num_tokens": 2048}
    assert {w for w in WORKLOADS if heavy_tailed(w)} == {
        "sharegpt", "bursty", "conversation", "code"}


def test_regimes_scale_with_the_kv_per_token_and_take_overrides(tmp_path: Path) -> None:
    own = regimes_for("llama2-7b-a100", 524288)
    assert own["tight"] == {"kv_cache_bytes": str(4 * GIB),
                            "kv_cache_host_memory_bytes": str(16 * GIB)}
    other = regimes_for(str(tmp_path / "llama2-13b-a100.json"), 2 * 524288,
                        ["tight:kv_cache_bytes=123", "tiny:kv_cache_bytes=7"])
    assert other["ample"]["kv_cache_bytes"] == str(32 * GIB)
    assert other["tight"] == {"kv_cache_bytes": "123",
                              "kv_cache_host_memory_bytes": str(32 * GIB)}
    assert other["tiny"] == {"kv_cache_bytes": "7"}


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0, 0) == 1.0 and ratio(2.5, 2.5) == 1.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, None) is None


def _run(**metrics: float) -> dict[str, Any]:
    base = {"mean_jct_s": 10.0, "p99_jct_s": 40.0, "mean_ttft_s": 1.0, "p99_ttft_s": 3.0,
            "p99_tbt_s": 0.1, "output_tokens_per_s": 1000.0, "goodput_rps": 2.0,
            "attainment": 0.8, "num_recomputed_tokens": 0, "swapped_bytes": 0}
    return {"metrics": {**base, **metrics}}


def _cell(load: float, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for run in runs.values():
        run["ratios"] = {k: ratio(run["metrics"][k], runs["fcfs"]["metrics"][k])
                         for k in METRICS}
    return {"profile": "p", "regime": "tight", "workload": "w", "load": load, "runs": runs}


def test_the_target_checker_flags_a_losing_cell() -> None:
    cells = [
        # At nominal load: mlfq wins, apt loses on every ratio and on attainment.
        _cell(1.0, {
            "fcfs": _run(),
            "skip_join_mlfq": _run(mean_jct_s=4.0, p99_jct_s=45.0, goodput_rps=2.0),
            "apt": _run(mean_jct_s=10.6, p99_jct_s=51.0, output_tokens_per_s=960.0,
                        attainment=0.79, goodput_rps=1.0),
        }),
        # Overload: mlfq keeps 95% of its goodput, apt 80%.
        _cell(1.5, {
            "fcfs": _run(goodput_rps=1.0),
            "skip_join_mlfq": _run(goodput_rps=1.9),
            "apt": _run(goodput_rps=0.8, attainment=0.9),
        }),
    ]
    targets = evaluate_targets(cells, {"w": True})
    met = {(t["target"], t["load"], t["policy"]): t["met"] for t in targets}
    assert met[("throughput", 1.0, "apt")] is False  # 0.96 < 0.97
    assert met[("mean_jct", 1.0, "apt")] is False  # 1.06 > 1.05
    assert met[("p99_jct", 1.0, "apt")] is False  # 1.275 > 1.25
    assert met[("apt_attainment", 1.0, "apt")] is False  # 0.79 < 0.80
    assert met[("goodput_overload", 1.5, "apt")] is False  # 0.8 < 0.9 x 1.0
    assert met[("throughput", 1.0, "skip_join_mlfq")] is True
    assert met[("mean_jct", 1.0, "skip_join_mlfq")] is True
    assert met[("p99_jct", 1.0, "skip_join_mlfq")] is True  # 1.125
    assert met[("mlfq_speedup", 1.0, "skip_join_mlfq")] is True  # 10 / 4 = 2.5
    assert met[("goodput_overload", 1.5, "skip_join_mlfq")] is True  # 1.9 >= 0.9 x 2.0
    assert met[("apt_attainment", 1.5, "apt")] is True
    assert not any(t["policy"] == "fcfs" for t in targets)  # the baseline has no targets
    speedup = next(t for t in targets if t["target"] == "mlfq_speedup")
    assert speedup["value"] == pytest.approx(2.5)
    # Light-tailed workload: no speedup target.
    assert not any(t["target"] == "mlfq_speedup" for t in evaluate_targets(cells, {"w": False}))
    miss = next(t for t in targets if t["target"] == "mean_jct" and t["policy"] == "apt")
    assert "10.6 vs fcfs 10" in miss["detail"] and "1.06x" in miss["detail"]


TINY = ["matrix", "--workloads", "alpaca", "code", "--loads", "0.8", "1.5", "--regimes",
        "tight", "--num-requests", "100", "--seed", "1", "--no-progress"]


def _numbers(result: dict[str, Any]) -> Any:
    """A result without what depends on the machine or the run (times, date, jobs)."""
    def strip(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if "wall" not in k
                    and k not in ("date", "command", "machine", "timing", "jobs")}
        if isinstance(o, list):
            return [strip(x) for x in o]
        return o
    return strip(result)


def test_a_tiny_matrix_runs_and_does_not_depend_on_the_pool(tmp_path: Path) -> None:
    results = []
    for jobs in (1, 2):
        out = tmp_path / f"m{jobs}"
        assert main([*TINY, "--jobs", str(jobs), "--out", str(out)]) == 0
        results.append(json.loads(out.with_suffix(".json").read_text()))
        assert out.with_suffix(".md").stat().st_size > 0
        assert (tmp_path / f"m{jobs}.png").stat().st_size > 0
    result = results[0]
    policies = available_policies()
    assert result["policies"][0] == "fcfs" and sorted(result["policies"]) == policies
    assert [(c["workload"], c["load"]) for c in result["cells"]] == [
        ("alpaca", 0.8), ("alpaca", 1.5), ("code", 0.8), ("code", 1.5)]
    for cap in result["capacity"]:
        assert cap["capacity_rps"] > 0 and cap["num_finished"] == 100
    for cell in result["cells"]:
        assert sorted(cell["runs"]) == policies
        assert cell["rate_rps"] == pytest.approx(cell["load"] * cell["capacity_rps"])
        for run in cell["runs"].values():
            assert run["metrics"]["num_finished"] == 100
            assert run["sim_wall_s"] > 0
            assert set(METRICS) <= set(run["ratios"])
            assert run["metrics"]["swapped_bytes"] >= 0
        fcfs = cell["runs"]["fcfs"]["ratios"]
        assert all(fcfs[k] == 1.0 for k in METRICS if cell["runs"]["fcfs"]["metrics"][k]
                   is not None)
    # Every non-fcfs policy has its three ratio targets in every cell, met or not.
    assert sum(t["target"] == "mean_jct" for t in result["targets"]) == 4 * (len(policies) - 1)
    assert result["misses"] == [t for t in result["targets"] if t["met"] is False]
    assert _numbers(results[0]) == _numbers(results[1])  # --jobs 1 and --jobs 2
    text = (tmp_path / "m1.md").read_text()
    assert "## llama2-7b-a100 / tight / code" in text and "Target misses" in text


def test_a_failing_simulation_is_reported_not_raised() -> None:
    from preemptserve.bench.matrix import Task, _cell, run_task

    bad = Task("llama2-7b-a100", "tight", "alpaca", 1.0, 5.0, "apt", ("max_batch_size=-1",), (),
               10, 0, 4096, (2.0, 0.2))
    failed = run_task(bad)
    assert "max_batch_size" in failed["error"] and "metrics" not in failed
    cell = _cell(("llama2-7b-a100", "tight", "alpaca"), 1.0, 5.0, {
        "fcfs": {**_run(), "counters": {}, "summary": {}, "sim_wall_s": 0.1, "wall_s": 0.1},
        "apt": failed,
    })
    assert cell["runs"]["apt"] == {"error": failed["error"], "wall_s": failed["wall_s"]}
    assert cell["runs"]["fcfs"]["ratios"]["mean_jct_s"] == 1.0
    assert evaluate_targets([cell], {"alpaca": False}) == []  # nothing to check apt on
