"""The simulator's event queue and its tie-breaking rule.

Events are ordered by the key ``(time_s, kind, seq)``:

1. ``time_s``: earlier first.
2. ``kind`` at the same instant, in ``EventKind`` order: an iteration's results are
   applied first (``ITERATION_END``), then requests that arrived are queued
   (``ARRIVAL``), then the next iteration is planned (``STEP``). This is the engine
   loop's own order: ``step()`` returns, the loop drains its inbox, ``step()`` again; a
   request arriving exactly when an iteration ends is seen by the next plan.

   The cluster simulator (``sim/cluster.py``) adds two kinds between them: a migration
   stage's copy ends (``STAGE_END``) right after iterations end, and the polling tick
   (``TICK``: load reports, then migration pairing) comes next, so that a report at an
   instant includes everything that ended then, and a request arriving at that instant
   is dispatched on it. With auto-scaling, an added instance comes up (``INSTANCE_UP``)
   last: it reports at the next tick.
3. ``seq``: the order of ``push`` calls, so equal events keep insertion (FIFO) order and
   the payloads themselves are never compared.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any


class EventKind(enum.IntEnum):
    ITERATION_END = 0
    STAGE_END = 1  # cluster: a migration stage's copy is done
    TICK = 2  # cluster: load reports and migration pairing (every polling interval)
    ARRIVAL = 3
    STEP = 4
    INSTANCE_UP = 5  # cluster, auto-scaling: an added instance finished starting


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, EventKind, int, Any]] = []
        self._seq = itertools.count()

    def push(self, time_s: float, kind: EventKind, payload: Any = None) -> None:
        # The kind goes in as the enum member (an int: it orders as its value), so that
        # pop returns it without a conversion.
        heapq.heappush(self._heap, (time_s, kind, next(self._seq), payload))

    def pop(self) -> tuple[float, EventKind, Any]:
        time_s, kind, _, payload = heapq.heappop(self._heap)
        return time_s, kind, payload

    def peek_time_s(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
