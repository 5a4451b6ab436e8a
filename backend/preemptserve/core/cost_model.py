"""What the scheduler may know about time: a prefill cost model. No torch.

The engine measures prefill time against prompt length (at startup, or loads a saved
profile) and hands the scheduler this plain object; the scheduler never runs the model.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class CostModel(Protocol):
    def prefill_time_s(self, num_tokens: int) -> float:
        """Estimated time of the iteration that prefills a prompt of ``num_tokens``."""
        ...


@dataclass(frozen=True)
class PrefillProfile:
    """Measured ``(num_tokens, seconds)`` points; linear in between and beyond.

    ``hidden_recompute_s_per_block``: the extra time of a decode step per KV-sized block of
    context a request keeps as hidden states (K/V recomputed each step), where measured.
    """

    points: tuple[tuple[int, float], ...]
    hidden_recompute_s_per_block: float | None = None

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            raise ValueError("a prefill profile needs at least two points")
        lengths = [n for n, _ in self.points]
        if lengths != sorted(set(lengths)) or lengths[0] <= 0:
            raise ValueError("profile lengths must be positive and strictly increasing")

    def prefill_time_s(self, num_tokens: int) -> float:
        pts = self.points
        i = bisect.bisect_left([n for n, _ in pts], num_tokens)
        i = min(max(i, 1), len(pts) - 1)  # the segment to inter- or extrapolate on
        (n0, t0), (n1, t1) = pts[i - 1], pts[i]
        return max(0.0, t0 + (t1 - t0) * (num_tokens - n0) / (n1 - n0))

    def save(self, path: str | Path) -> None:
        data: dict[str, object] = {"prefill_points": [list(p) for p in self.points]}
        if self.hidden_recompute_s_per_block is not None:
            data["hidden_recompute_s_per_block"] = self.hidden_recompute_s_per_block
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PrefillProfile:
        data = json.loads(Path(path).read_text())
        recompute = data.get("hidden_recompute_s_per_block")
        return cls(tuple((int(n), float(t)) for n, t in data["prefill_points"]),
                   None if recompute is None else float(recompute))
