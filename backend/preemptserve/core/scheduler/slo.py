"""Each request's pending time and whether it can still meet its latency SLO. No torch.

Apt-Serve values a request by its *pending time*: the time since its last token (since
arrival before the first). A request that has missed its SLO (TTFT over its TTFT SLO, or
more time-between-tokens misses than its P99 allows) is worth ``LOST_VALUE_SCALE`` of
that, so hopeless requests only get what is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..request import Request

# The value of a request that already missed its SLO, relative to its pending time.
LOST_VALUE_SCALE = 1e-6
# The least pending time a request has (seconds): a request that got its token at this
# very instant (the simulator's clock) must keep a positive value, or the knapsack drops
# it and the batch rotates to whoever sat out the last step.
MIN_PENDING_S = 1e-6
# Share of a request's time-between-tokens gaps allowed over the TBT SLO (its P99).
TBT_MISS_FRACTION = 0.01


class SLOTracker:
    """Arrival and last-token times, TBT misses and lost requests; SLOs default to the
    policy's and are overridden per request."""

    def __init__(self, ttft_slo_s: float, tbt_slo_s: float) -> None:
        self.default_ttft_slo_s = ttft_slo_s
        self.default_tbt_slo_s = tbt_slo_s
        self._arrival_s: dict[str, float] = {}
        self._last_token_s: dict[str, float] = {}
        self._num_tbt_misses: dict[str, int] = {}
        self._lost: set[str] = set()

    def ttft_slo_s(self, request: Request) -> float:
        slo = request.ttft_slo_s
        return self.default_ttft_slo_s if slo is None else slo

    def tbt_slo_s(self, request: Request) -> float:
        slo = request.tbt_slo_s
        return self.default_tbt_slo_s if slo is None else slo

    def add(self, request: Request, now_s: float,
            state: Mapping[str, Any] | None = None) -> None:
        """Track a request from ``now_s``, or with the ``state`` another engine's tracker
        exported (ages, not clock readings: clocks differ between processes)."""
        request_id = request.request_id
        if state:
            self._arrival_s[request_id] = now_s - float(state["age_s"])
            self._last_token_s[request_id] = now_s - float(state["pending_s"])
            self._num_tbt_misses[request_id] = int(state["num_tbt_misses"])
            if state["lost"]:
                self._lost.add(request_id)
            return
        self._arrival_s[request_id] = self._last_token_s[request_id] = now_s
        self._num_tbt_misses[request_id] = 0

    def export(self, request_id: str, now_s: float) -> dict[str, Any]:
        return {"age_s": now_s - self._arrival_s[request_id],
                "pending_s": now_s - self._last_token_s[request_id],
                "num_tbt_misses": self._num_tbt_misses[request_id],
                "lost": request_id in self._lost}

    def arrival_s(self, request_id: str) -> float:
        return self._arrival_s[request_id]

    def remove(self, request_id: str) -> None:
        for table in (self._arrival_s, self._last_token_s, self._num_tbt_misses):
            table.pop(request_id, None)
        self._lost.discard(request_id)

    def value(self, request: Request, now_s: float) -> float:
        """Pending time, scaled down once the request can no longer meet its SLO."""
        request_id = request.request_id
        pending_s = now_s - self._last_token_s[request_id]
        if pending_s < MIN_PENDING_S:  # max(), without the builtin's cost: per request, per step
            pending_s = MIN_PENDING_S
        lost = request_id in self._lost or (
            not request.output_token_ids and pending_s > self.ttft_slo_s(request))
        return pending_s * LOST_VALUE_SCALE if lost else pending_s

    def record_token(self, request: Request, now_s: float) -> None:
        """A token was sampled for ``request`` at ``now_s``: check its TTFT or TBT."""
        request_id = request.request_id
        if request.num_output_tokens == 1:
            if now_s - self._arrival_s[request_id] > self.ttft_slo_s(request):
                self._lost.add(request_id)
        elif now_s - self._last_token_s[request_id] > self.tbt_slo_s(request):
            self._num_tbt_misses[request_id] += 1
            allowed = TBT_MISS_FRACTION * (request.sampling.max_tokens - 1)
            if self._num_tbt_misses[request_id] > allowed:
                self._lost.add(request_id)
        self._last_token_s[request_id] = now_s
