"""Generated workloads match their target statistics; traces replay and scale."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from preemptserve.bench.workload import (
    PRESETS,
    LengthDistribution,
    gamma_arrivals_s,
    load_trace,
    synthetic,
)


def test_lognormal_has_the_requested_mean_and_median() -> None:
    dist = LengthDistribution(mean_tokens=306, median_tokens=74)
    draws = dist.sample(np.random.default_rng(0), 400_000)
    assert np.median(draws) == pytest.approx(74, rel=0.02)
    assert draws.mean() == pytest.approx(306, rel=0.05)  # heavy tail: slower to converge


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_lengths_match_the_papers_statistics(preset: str) -> None:
    w = synthetic(preset, 50_000, rate_rps=10.0, seed=1)
    spec = PRESETS[preset]
    inputs = np.array([r.input_tokens for r in w.requests])
    outputs = np.array([r.output_tokens for r in w.requests])
    assert np.median(inputs) == pytest.approx(spec.input.median_tokens, rel=0.05)
    assert inputs.mean() == pytest.approx(spec.input.mean_tokens, rel=0.07)
    assert np.median(outputs) == pytest.approx(spec.output.median_tokens, rel=0.05)
    assert outputs.mean() == pytest.approx(spec.output.mean_tokens, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_arrivals_have_the_requested_rate_and_cv(cv: float) -> None:
    arrivals = gamma_arrivals_s(np.random.default_rng(2), 200_000, rate_rps=5.0, cv=cv)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and (gaps >= 0).all()
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_poisson_gaps_are_exponential() -> None:
    gaps = np.diff(gamma_arrivals_s(np.random.default_rng(3), 100_000, rate_rps=2.0))
    # P(gap > t) = exp(-rate t) for an exponential
    for t in (0.25, 0.5, 1.0):
        assert (gaps > t).mean() == pytest.approx(math.exp(-2.0 * t), abs=0.01)


def test_a_seed_reproduces_the_workload_and_another_does_not() -> None:
    a = synthetic("alpaca", 100, rate_rps=3.0, cv=2.0, seed=7)
    assert a == synthetic("alpaca", 100, rate_rps=3.0, cv=2.0, seed=7)
    assert a != synthetic("alpaca", 100, rate_rps=3.0, cv=2.0, seed=8)


def test_lengths_are_scaled_and_fit_the_context() -> None:
    full = synthetic("sharegpt", 2_000, rate_rps=1.0, seed=4)
    scaled = synthetic(
        "sharegpt", 2_000, rate_rps=1.0, seed=4, length_scale=0.5, max_context_tokens=512
    )
    for a, b in zip(full.requests, scaled.requests, strict=True):
        assert b.input_tokens >= 1 and b.output_tokens >= 1
        assert b.input_tokens + b.output_tokens <= 512
        if a.input_tokens + a.output_tokens <= 1000:  # not clipped: just halved
            # (the unrounded draw is scaled, so allow the rounding of both)
            assert abs(b.input_tokens - a.input_tokens * 0.5) <= 1
            assert abs(b.output_tokens - a.output_tokens * 0.5) <= 1
    assert any(b.input_tokens == 511 for b in scaled.requests)  # some were clipped


def test_at_rate_rescales_only_time() -> None:
    w = synthetic("alpaca", 200, rate_rps=2.0, seed=5)
    fast = w.at_rate(8.0)
    assert [r.input_tokens for r in fast.requests] == [r.input_tokens for r in w.requests]
    assert fast.duration_s == pytest.approx(w.duration_s / 4)
    assert fast.meta["rate_rps"] == 8.0


def test_trace_replay_sorts_shifts_and_scales(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(
        "arrival_time_s,input_tokens,output_tokens\n12.0,100,40\n10.0,20,8\n11.5,300,1\n"
    )
    w = load_trace(path, time_scale=2.0, length_scale=0.5)
    assert [r.arrival_time_s for r in w.requests] == [0.0, 3.0, 4.0]
    assert [(r.input_tokens, r.output_tokens) for r in w.requests] == [(10, 4), (150, 1), (50, 20)]
    out = tmp_path / "again.csv"
    w.to_csv(out)
    assert load_trace(out).requests == w.requests


def test_trace_with_a_missing_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("arrival_time_s,input_tokens\n0,5\n")
    with pytest.raises(ValueError, match="output_tokens"):
        load_trace(path)
