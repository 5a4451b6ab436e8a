"""The command line: a simulation and a simulated sweep write their reports."""

from __future__ import annotations

import json
from pathlib import Path

from preemptserve.bench.cli import main
from preemptserve.core.scheduler import available_policies

SMALL = [
    "--profile",
    "llama2-7b-a100",
    "--workload",
    "alpaca",
    "--num-requests",
    "200",
    "--seed",
    "3",
    "--max-context",
    "4096",
    "--no-progress",
    "--param",
    "kv_cache_bytes=1073741824",
    "--param",
    "kv_cache_host_memory_bytes=0",
]


def test_simulate_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert (
        main(
            [
                "simulate",
                *SMALL,
                "--rate",
                "20",
                "--slo-ttft-s",
                "1",
                "--slo-tbt-s",
                "0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert sorted(result["runs"]) == available_policies()  # every registered policy
    for run in result["runs"].values():
        assert run["summary"]["num_requests"] == 200
        assert 0.0 <= run["summary"]["slo"]["attainment"] <= 1.0
    assert "| fcfs | sim | 200 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "sim-cdf.png").stat().st_size > 0


def test_sweep_finds_an_effective_throughput(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                *SMALL,
                "--policies",
                "fcfs",
                "--rates",
                "5",
                "40",
                "400",
                "--slo-ttft-s",
                "0.5",
                "--slo-tbt-s",
                "0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.with_suffix(".json").read_text())
    points = sorted(result["sweep"], key=lambda p: p["rate_rps"])
    assert [p["rate_rps"] for p in points] == [5, 40, 400]
    assert points[0]["attainment"] >= points[-1]["attainment"]  # overload misses SLOs
    assert result["effective_throughput"]["fcfs"] in (None, 5, 40, 400)
    assert (tmp_path / "sweep-sweep.png").stat().st_size > 0


def test_generate_writes_a_replayable_trace(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    assert (
        main(
            [
                "generate",
                "--workload",
                "sharegpt",
                "--num-requests",
                "50",
                "--rate",
                "2",
                "--cv",
                "3",
                str(path),
            ]
        )
        == 0
    )
    assert path.read_text().splitlines()[0] == "arrival_time_s,input_tokens,output_tokens"
    assert len(path.read_text().splitlines()) == 51


def test_the_speed_diagnosis_scales_the_simulation_to_the_served_speed() -> None:
    import argparse

    from preemptserve.bench.commands import run_in_sim
    from preemptserve.bench.fidelity import at_served_speed
    from preemptserve.bench.workload import synthetic
    from preemptserve.sim.cost_model import load_profile

    args = argparse.Namespace(param=["kv_cache_bytes=1073741824"], policy_param=[],
                              no_progress=True, sim_seeds=2)
    model = load_profile("llama2-7b-a100")
    workload = synthetic("alpaca", 50, 5.0, seed=1, max_context_tokens=4096)
    served = [run_in_sim(args, workload, "fcfs", model, None, "x", noise_seed=s)[1]["summary"]
              for s in range(2)]
    # Servers exactly as fast as the model: the diagnosis reproduces the simulation.
    same = at_served_speed(args, workload, "fcfs", model, None, served, 1.0)
    assert same["speed_factor"] == 1.0 and abs(same["mean_jct_error"]) < 1e-9
    # Servers twice as slow per iteration: longer simulated JCTs.
    slow = at_served_speed(args, workload, "fcfs", model, None, served, 2.0)
    assert slow["speed_factor"] == 2.0 and slow["mean_jct_error"] > 0.5
    assert at_served_speed(args, workload, "fcfs", model, None, served, None) is None
