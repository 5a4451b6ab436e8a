"""Requests that have not started yet, with their summed pending time kept up to date.

``apt`` values a request by its pending time; a request that has never run has pending
time ``now - arrival`` until its TTFT SLO passes, and a tiny fraction of it after. In
overload thousands of requests wait, and computing each one's value every iteration made
an iteration's cost grow with the queue. Here the sums are kept as counts and sums of
arrival times (``sum(now - a) = n * now - sum(a)``), the requests past their deadline are
found through a heap of deadlines, and the most valuable waiting requests are the
oldest ones still within their SLO, then the oldest lost ones: arrival order. No torch.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from ..request import Request


class WaitingArrivals:
    """Never-started requests in arrival order, split by whether their TTFT SLO passed."""

    def __init__(self) -> None:
        self._fresh: dict[str, tuple[Request, float]] = {}  # id -> (request, arrival)
        self._lost: dict[str, tuple[Request, float]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._fresh_arrival_sum = self._lost_arrival_sum = 0.0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._lost)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._fresh or request_id in self._lost

    def add(self, request: Request, arrival_s: float, deadline_s: float) -> None:
        request_id = request.request_id
        self._fresh[request_id] = (request, arrival_s)
        self._fresh_arrival_sum += arrival_s
        heapq.heappush(self._deadlines, (deadline_s, next(self._seq), request_id))

    def remove(self, request_id: str) -> None:
        """It started, or finished (cancelled) before starting; absent ids are ignored."""
        entry = self._fresh.pop(request_id, None)
        if entry is not None:
            self._fresh_arrival_sum -= entry[1]
            return
        entry = self._lost.pop(request_id, None)
        if entry is not None:
            self._lost_arrival_sum -= entry[1]

    def expire(self, now_s: float) -> None:
        """Requests whose TTFT deadline has passed move to the lost ones."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now_s:
            _, _, request_id = heapq.heappop(deadlines)
            entry = self._fresh.pop(request_id, None)
            if entry is None:
                continue  # started or gone since
            self._fresh_arrival_sum -= entry[1]
            self._lost[request_id] = entry
            self._lost_arrival_sum += entry[1]
        if not self._fresh and not self._lost:
            # Every arrival has started: drop the stale deadlines and the float drift.
            deadlines.clear()
            self._fresh_arrival_sum = self._lost_arrival_sum = 0.0

    def is_lost(self, request_id: str) -> bool:
        return request_id in self._lost

    def summed_pending_s(self, now_s: float, lost_scale: float) -> float:
        """Sum of the waiting requests' values: pending time, scaled once lost."""
        fresh = len(self._fresh) * now_s - self._fresh_arrival_sum
        lost = len(self._lost) * now_s - self._lost_arrival_sum
        return fresh + lost_scale * lost

    def most_valuable(self, num_requests: int) -> Iterator[Request]:
        """Up to ``num_requests``, most valuable first: the oldest within their SLO, then
        the oldest lost ones."""
        source = itertools.chain(self._fresh.values(), self._lost.values())
        for request, _ in itertools.islice(source, num_requests):
            yield request
