"""Metrics computed on hand-made timelines."""

from __future__ import annotations

import pytest

from preemptserve.bench.metrics import (
    SLO,
    RequestTimeline,
    distribution,
    effective_throughput,
    summarize,
)


def timeline(rid: str, arrival: float, tokens: list[float]) -> RequestTimeline:
    return RequestTimeline(rid, arrival, 10, tokens, tokens[-1])


A = timeline("a", 0.0, [1.0, 1.5, 2.0, 4.0])  # TTFT 1, gaps .5 .5 2, JCT 4
B = timeline("b", 1.0, [1.5, 1.6])  # TTFT .5, gap .1, JCT .6
C = timeline("c", 2.0, [5.0])  # TTFT 3, no gaps, JCT 3


def test_per_request_metrics() -> None:
    assert A.ttft_s == 1.0 and A.jct_s == 4.0 and A.output_tokens == 4
    assert list(A.tbts_s()) == [0.5, 0.5, 2.0]
    assert A.tpot_s == pytest.approx(1.0)  # (4 - 1) / 3
    assert A.per_token_latency_s == 1.0
    assert C.tpot_s is None and C.p99_tbt_s() is None
    assert B.p99_tbt_s() == pytest.approx(0.1)
    # P99 of [.5, .5, 2] with linear interpolation: .5 + .98 * 1.5
    assert A.p99_tbt_s() == pytest.approx(0.5 + 0.98 * 1.5)


def test_distribution() -> None:
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "p99": pytest.approx(3.97)}
    assert distribution([]) == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_summary() -> None:
    s = summarize([A, B, C])
    assert s["num_requests"] == 3 and s["num_output_tokens"] == 7
    assert s["duration_s"] == 5.0  # first arrival 0, last finish 5
    assert s["throughput_rps"] == pytest.approx(0.6)
    assert s["ttft_s"]["mean"] == pytest.approx((1 + 0.5 + 3) / 3)
    assert s["jct_s"]["mean"] == pytest.approx((4 + 0.6 + 3) / 3)
    assert s["tbt_s"]["mean"] == pytest.approx((0.5 + 0.5 + 2 + 0.1) / 4)
    assert s["tpot_s"]["mean"] == pytest.approx((1.0 + 0.1) / 2)  # C has no TPOT
    assert s["per_token_latency_s"]["mean"] == pytest.approx((1 + 0.3 + 3) / 3)


def test_slo_uses_ttft_and_the_requests_own_p99_tbt() -> None:
    slo = SLO(ttft_s=1.5, tbt_s=1.0)
    assert not slo.met_by(A)  # TTFT ok, but its P99 TBT is ~1.97
    assert slo.met_by(B)
    assert not slo.met_by(C)  # TTFT 3
    assert SLO(ttft_s=3.5, tbt_s=0.01).met_by(C)  # one token: no TBT to miss
    assert not SLO(ttft_s=1.0, tbt_s=5).met_by(A)  # strictly below the TTFT SLO
    s = summarize([A, B, C], slo)
    assert s["slo"]["num_met"] == 1
    assert s["slo"]["attainment"] == pytest.approx(1 / 3)
    assert s["slo"]["goodput_rps"] == pytest.approx(1 / 5)


def test_effective_throughput_is_the_last_rate_before_the_first_miss() -> None:
    points = [(4.0, 0.85), (1.0, 0.99), (2.0, 0.95), (3.0, 0.91), (5.0, 0.95)]
    assert effective_throughput(points, 0.9) == 3.0  # 5.0 passes but 4.0 already missed
    assert effective_throughput(points, 0.999) is None
    assert effective_throughput(points, 0.5) == 5.0
