"""Fitting the cost model to a server's iteration log (``iteration_stats_path`` records)."""

from __future__ import annotations

import dataclasses
import json
from statistics import NormalDist

import numpy as np
import pytest

from preemptserve.core.scheduler.output import (
    BatchShape,
    BlockSwap,
    ScheduledRequest,
    SchedulerOutput,
)
from preemptserve.engine.iteration_stats import IterationLog, IterationStats, read_iteration_log
from preemptserve.sim.cost_model import IterationCostModel
from preemptserve.sim.fit import (
    autocorrelation,
    co_running,
    fit_served_iterations,
    iteration_periods,
    noise_block_length,
    served_over_modelled,
)
from preemptserve.sim.simulator import SimConfig, Simulator

TRUTH = IterationCostModel(
    fixed_s=0.008,
    per_prefill_token_s=2e-4,
    per_decode_token_s=6e-4,
    per_decode_context_token_s=2e-6,
    per_sampled_token_s=3e-4,
    swap_fixed_s=0.001,
    swap_bytes_per_s=1e9,
    kv_bytes_per_token=1000,
)
BLOCK_BYTES = 16 * 1000


def record(i: int, start_s: float, shape: BatchShape, unfinished: int = 5,
           swap_blocks: int = 0) -> IterationStats:
    return IterationStats(
        iteration=i, timestamp=0.0, start_s=start_s, step_s=0.0, num_scheduled=1,
        **shape._asdict(), hidden_recompute_blocks=0, num_preemptions=0,
        num_swap_outs=1 if swap_blocks else 0, num_swap_ins=0,
        swap_out_blocks=swap_blocks, swap_in_blocks=0, num_unfinished=unfinished,
        num_waiting=0, num_running=1, num_preempted=0, num_blocks_used=0,
        num_host_blocks_used=0)


def served_log(n: int, rho: float, sigma: float = 0.1, seed: int = 0,
               shares: np.ndarray | None = None,
               slowdown: float = 0.0) -> list[IterationStats]:
    """Iterations whose periods are TRUTH x lognormal AR(1) noise, with swaps and idles;
    with ``shares``, also x (1 + ``slowdown`` x the iteration's share)."""
    rng = np.random.default_rng(seed)
    records, t, z = [], 0.0, 0.0
    for i in range(n):
        decodes = int(rng.integers(0, 24))
        prefill = int(rng.integers(0, 300)) if rng.random() < 0.3 or not decodes else 0
        shape = BatchShape(prefill, decodes, decodes * int(rng.integers(16, 400)), 0,
                           decodes + (prefill > 0))
        swap_blocks = int(rng.integers(1, 8)) if rng.random() < 0.1 else 0
        idle = rng.random() < 0.05
        records.append(record(i, t, shape, unfinished=0 if idle else 5, swap_blocks=swap_blocks))
        z = rho * z + np.sqrt(1 - rho**2) * rng.normal()
        period = TRUTH.iteration_time_s(shape) * np.exp(sigma * z)
        if shares is not None:
            period *= 1 + slowdown * shares[i]
        period += TRUTH.swap_time_s(swap_blocks * BLOCK_BYTES) if swap_blocks else 0.0
        t += period + (5.0 if idle else 0.0)  # an idle engine waits for its next arrival
    return records


def test_periods_skip_idle_gaps_and_missing_iterations() -> None:
    shape = BatchShape(0, 1, 20, 0, 1)
    records = [record(0, 0.0, shape), record(1, 0.02, shape, unfinished=0),
               record(2, 9.0, shape), record(4, 9.5, shape), record(5, 9.53, shape)]
    periods = iteration_periods(records)
    assert [(r.iteration, round(p, 6)) for r, p in periods] == [(0, 0.02), (4, 0.03)]


def test_the_fit_recovers_coefficients_spread_and_autocorrelation() -> None:
    start = dataclasses.replace(TRUTH, fixed_s=0.0, per_prefill_token_s=0.0,
                                per_decode_token_s=0.0, per_decode_context_token_s=0.0,
                                per_sampled_token_s=0.0)
    fitted, facts = fit_served_iterations(start, served_log(4000, rho=0.7), BLOCK_BYTES)
    for name in ("fixed_s", "per_prefill_token_s", "per_decode_context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUTH, name), rel=0.15), name
    # per-decode and per-sampled are nearly collinear; their sum is what the data fixes
    assert fitted.per_decode_token_s + fitted.per_sampled_token_s == pytest.approx(
        TRUTH.per_decode_token_s + TRUTH.per_sampled_token_s, rel=0.1)
    assert facts["noise_autocorrelation"]["1"] == pytest.approx(0.7, abs=0.08)
    # the trace is the measured/modelled ratios in order; blocks keep its runs:
    # 0.7 ** lag falls below 0.05 at lag 9
    assert len(fitted.noise_trace) == facts["num_fitted_periods"]
    assert 14 <= fitted.noise_block_iterations <= 24
    q = fitted.noise_quantiles
    assert q[20] == pytest.approx(1.0, abs=0.03)  # the median period is the model's
    assert q[36] == pytest.approx(np.exp(0.1 * NormalDist().inv_cdf(0.9)), rel=0.05)
    assert facts["num_fitted_periods"] < 4000  # idle gaps left out
    independent, _ = fit_served_iterations(start, served_log(4000, rho=0.0), BLOCK_BYTES)
    assert independent.noise_block_iterations == 2


def test_the_fit_separates_the_other_instances_slowdown_from_the_batch() -> None:
    start = dataclasses.replace(TRUTH, fixed_s=0.0, per_prefill_token_s=0.0)
    # busier batches come with busier neighbours (the same load drives both)
    rng = np.random.default_rng(1)
    shares = np.clip(rng.random(4000) + rng.normal(0, 0.2, 4000), 0, 1)
    records = served_log(4000, rho=0.5, shares=shares, slowdown=0.6)
    fitted, facts = fit_served_iterations(start, records, BLOCK_BYTES, shares)
    assert fitted.co_running_slowdown == pytest.approx(0.6, rel=0.1)
    assert facts["co_running_slowdown"] == fitted.co_running_slowdown
    for name in ("fixed_s", "per_prefill_token_s", "per_decode_context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUTH, name), rel=0.15), name
    assert fitted.noise_quantiles[20] == pytest.approx(1.0, abs=0.03)
    # without the shares, the slowdown is spread into the coefficients and the noise
    blind, blind_facts = fit_served_iterations(start, records, BLOCK_BYTES)
    assert blind.co_running_slowdown == 0.0
    assert (blind_facts["period_fit_relative_error"]["median_abs"]
            > 1.5 * facts["period_fit_relative_error"]["median_abs"])
    # the diagnosis of a run counts the slowdown in the modelled time when given shares
    assert served_over_modelled(fitted, records, BLOCK_BYTES, shares)["total"] == (
        pytest.approx(1.0, abs=0.03))
    assert served_over_modelled(fitted, records, BLOCK_BYTES)["total"] > 1.2
    # alone (shares 0), there is nothing to fit: no slowdown
    alone, _ = fit_served_iterations(start, served_log(2000, rho=0.5), BLOCK_BYTES,
                                     np.zeros(2000))
    assert alone.co_running_slowdown == 0.0


def test_block_length_and_autocorrelation_edge_cases() -> None:
    alternating = np.array([1.0, 2.0] * 50)
    assert autocorrelation(alternating, 1) == pytest.approx(-1.0, abs=0.02)
    assert noise_block_length(alternating) == 2
    assert autocorrelation(np.ones(10), 1) == 0.0
    trend = np.exp(np.linspace(0, 1, 200))  # never decorrelates: a tenth of the trace
    assert noise_block_length(trend) == 20


def test_the_simulator_replays_the_trace_in_blocks() -> None:
    trace = tuple(1.0 + i / 1000 for i in range(1000))  # value -> position
    model = TRUTH.with_coefficients(noise_trace=trace, noise_block_iterations=50.0,
                                    noise_quantiles=(9.0, 9.0))
    config = SimConfig.from_parameters({"kv_cache_bytes": str(64 * BLOCK_BYTES)}, model)
    sim = Simulator(config, model, workload=None)
    draws = [sim._noise_factor() for _ in range(20_000)]
    assert set(draws) <= set(trace)  # the trace, not the quantiles
    positions = np.round((np.array(draws) - 1.0) * 1000).astype(int)
    jumps = np.mean(np.diff(positions) % 1000 != 1)
    assert jumps == pytest.approx(1 / 50, abs=0.005)
    assert len(set(draws)) > 900  # random block starts cover the trace
    for bad in ({"noise_block_iterations": 0.5}, {"noise_trace": (1.0, 0.0)}):
        with pytest.raises(ValueError):
            TRUTH.with_coefficients(**bad)


def test_records_round_trip_through_the_log(tmp_path) -> None:
    plan = SchedulerOutput(
        3,
        (ScheduledRequest("a", (5,) * 10, 0, (0,), True),
         ScheduledRequest("b", (7,), 40, (1, 2, 3), True, hidden=True)),
        preempted_ids=("c",),
        swap_out=(BlockSwap("c", ((4, 0), (5, 1)), blocking=True),),
    )
    stats = IterationStats.of_step(3, plan, 1.0, 2.0, 0.05, 16, num_unfinished=3,
                                   num_waiting=1, num_running=2, num_preempted=1,
                                   num_blocks_used=9, num_host_blocks_used=2)
    assert stats.shape == BatchShape(10, 1, 41, 100, 2)
    assert (stats.hidden_recompute_blocks, stats.num_preemptions) == (3, 1)
    assert (stats.num_swap_outs, stats.swap_out_blocks, stats.swap_in_blocks) == (1, 2, 0)
    log = IterationLog(tmp_path / "sub" / "it.jsonl")
    log.write(stats)
    log.write(dataclasses.replace(stats, iteration=4))
    log.close()
    assert [r.iteration for r in read_iteration_log(tmp_path / "sub" / "it.jsonl")] == [3, 4]
    assert json.loads((tmp_path / "sub" / "it.jsonl").read_text().splitlines()[0])["step_s"] == 0.05


def busy(i: int, timestamp: float, step_s: float) -> IterationStats:
    return dataclasses.replace(record(i, timestamp, BatchShape(0, 1, 16, 0, 1)),
                               timestamp=timestamp, step_s=step_s)


def test_co_running_is_the_share_of_a_step_the_others_spend_in_steps_of_their_own():
    a = [busy(0, 0.0, 1.0), busy(1, 2.0, 1.0), busy(2, 10.0, 2.0)]
    b = [busy(0, 0.5, 1.0), busy(1, 1.6, 0.2), busy(2, 2.9, 0.05)]
    c = [busy(0, 10.5, 0.5), busy(1, 11.0, 2.0)]
    two = co_running([a, b])
    # b covers 0.5-1 of a's 0-1 and 2.9-2.95 of a's 2-3; a covers half of b's 0.5-1.5
    # and all of b's 2.9-2.95
    assert two[0] == pytest.approx([0.5, 0.05, 0.0])
    assert two[1] == pytest.approx([0.5, 0.0, 1.0])
    shares = co_running([a, b, c])
    # a's last step (10-12): b idle, c busy 10.5-12 (0.5 + 1.0 of its steps): 1.5 / 2 / 2
    assert shares[0][2] == pytest.approx(1.5 / 2 / 2)
    # c's first step (10.5-11): a busy throughout, b idle: (1 + 0) / 2
    assert shares[2][0] == pytest.approx(0.5)
    assert co_running([a]) == [[0.0, 0.0, 0.0]]


def test_refit_fits_a_saved_profile_again_to_its_logs(tmp_path) -> None:
    from preemptserve.bench.cli import main

    logs = []
    for i in range(2):
        path = tmp_path / f"p-iterations-instance{i}.jsonl"
        path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n"
                                for r in served_log(1500, rho=0.5, seed=i)))
        logs.append(str(path))
    # an older profile: its lone requests' TTFTs saved only as residuals against it
    old = dataclasses.replace(TRUTH, fixed_s=0.02, source={
        "serving": {"ttft_residuals_s": [0.02] * 9, "coefficients": {}}})
    old.save(tmp_path / "old.json")
    assert main(["refit", str(tmp_path / "old.json"), "--logs", *logs,
                 "--param", "kv_block_size=16", "--out", str(tmp_path / "new.json")]) == 0
    new = IterationCostModel.load(tmp_path / "new.json")
    assert new.fixed_s == pytest.approx(TRUTH.fixed_s, rel=0.15)
    serving = new.source["serving"]
    assert serving["refitted_from"] == logs and serving["num_instances"] == 2
    # TTFT = residual + the old model's prefill; the new residual is against the new model
    assert new.request_latency_s == pytest.approx(
        0.02 + old.prefill_time_s(64) - new.prefill_time_s(64), rel=0.05)
    assert serving["lone_ttfts_s"][0][0] == 16
