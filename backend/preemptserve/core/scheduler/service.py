"""What finished requests say about how long a running one will still take. No torch.

Least-attained-service scheduling (MLFQ demotion) pays off only where the output
length's distribution has a decreasing hazard: a job that has already produced many
tokens is expected to produce *more* than a fresh one, so it should yield. Where lengths
cluster (a chat workload whose answers are about as long as one another), the opposite
holds: a job that has run is closer to its end than a new one, and demoting it only
delays the job nearest to finishing (processor sharing instead of first come, first
served, worse mean latency). ``OutputLengthHistory`` keeps the output lengths of recently
finished requests and answers the one question the scheduler needs: is a request that
has produced ``n`` tokens expected to run longer than a request that has produced none?
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import accumulate


class OutputLengthHistory:
    """Output lengths of the last ``window`` finished requests; their mean residual life.

    ``mean_residual_tokens(n)`` is ``E[L - n | L > n]`` over the window. With fewer than
    ``min_samples`` lengths nothing is known and ``expects_longer_than_new`` answers True
    (the premise of least-attained-service scheduling, FastServe's behaviour).
    """

    def __init__(self, window: int = 1000, min_samples: int = 32) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self.min_samples = min_samples
        self._lengths: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []
        self._suffix_sums: list[int] = []  # _suffix_sums[i] = sum(_sorted[i:])
        self._dirty = False

    def __len__(self) -> int:
        return len(self._lengths)

    def observe(self, num_output_tokens: int) -> None:
        self._lengths.append(num_output_tokens)
        self._dirty = True

    def _refresh(self) -> None:
        # Rebuilt lazily: requests finish far more often than the scheduler asks.
        self._sorted = sorted(self._lengths)
        sums = list(accumulate(reversed(self._sorted)))
        sums.reverse()
        self._suffix_sums = sums + [0]
        self._dirty = False

    def mean_residual_tokens(self, num_tokens: int) -> float | None:
        """``E[L - n | L > n]``; None if no recorded length exceeds ``n``."""
        if self._dirty:
            self._refresh()
        i = bisect.bisect_right(self._sorted, num_tokens)
        count = len(self._sorted) - i
        if count == 0:
            return None
        return self._suffix_sums[i] / count - num_tokens

    def expects_longer_than_new(self, num_tokens: int) -> bool:
        """Whether a request with ``num_tokens`` outputs is expected to outlast a new one.

        True while fewer than ``min_samples`` lengths are known, and for a request longer
        than every recorded one.
        """
        if len(self._lengths) < self.min_samples:
            return True
        remaining = self.mean_residual_tokens(num_tokens)
        return remaining is None or remaining >= self.mean_residual_tokens(0)  # type: ignore[operator]
