"""WaitingArrivals: apt's never-started requests, summed without a pass over them."""

from __future__ import annotations

import pytest

from preemptserve.core.request import Request, SamplingParams
from preemptserve.core.scheduler.arrivals import WaitingArrivals


def request(request_id: str) -> Request:
    return Request(request_id, [1, 2, 3], SamplingParams(max_tokens=4))


def test_sums_expiry_and_order_match_a_pass_over_every_request() -> None:
    waiting = WaitingArrivals()
    arrivals = {"a": (0.0, 1.0), "b": (0.5, 5.0), "c": (1.0, 1.2), "d": (2.0, 9.0)}
    for request_id, (arrival_s, deadline_s) in arrivals.items():
        waiting.add(request(request_id), arrival_s, deadline_s)
    waiting.remove("d")  # started
    now_s, scale = 3.0, 1e-6
    waiting.expire(now_s)
    assert waiting.is_lost("a") and waiting.is_lost("c") and not waiting.is_lost("b")
    expected = sum((now_s - arrivals[r][0]) * (scale if arrivals[r][1] < now_s else 1.0)
                   for r in "abc")
    assert waiting.summed_pending_s(now_s, scale) == pytest.approx(expected)
    # Most valuable first: b (within its SLO), then the lost ones, oldest first.
    assert [r.request_id for r in waiting.most_valuable(3)] == ["b", "a", "c"]
    assert [r.request_id for r in waiting.most_valuable(1)] == ["b"]
    for request_id in "abc":
        waiting.remove(request_id)
    waiting.expire(now_s)
    assert len(waiting) == 0 and waiting.summed_pending_s(now_s, scale) == 0.0
