"""Serving metrics from per-request timelines. Pure: no I/O, no server, no clock.

Definitions (``../shared/design/papers.md``, "Metrics the field reports"):

* TTFT: first token - arrival.
* TBT (time between tokens): each gap between consecutive tokens of a request.
* TPOT: (finish - first token) / (output tokens - 1), per request (requests of one
  token have none).
* JCT: finish - arrival. Per-token latency: JCT / output tokens.
* SLO (Apt-Serve's definition): a request meets a ``(ttft_s, tbt_s)`` SLO if its TTFT <
  ``ttft_s`` and the P99 of its own TBTs < ``tbt_s`` (a one-token request: TTFT only).
* Attainment: the share of requests meeting the SLO. Goodput: requests meeting it per
  second of the run (first arrival to last finish).
* Effective throughput: the highest tested rate up to which every tested rate keeps at
  least the target attainment (``effective_throughput``).

Every distribution is reported as mean / P50 / P95 / P99 (numpy's linear percentiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

QUANTILES = (50, 95, 99)


@dataclass(frozen=True)
class RequestTimeline:
    """One request as the client saw it; every time on the same clock, in seconds."""

    request_id: str
    arrival_s: float
    input_tokens: int
    token_times_s: Sequence[float]  # one entry per output token, in order
    finish_s: float

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.arrival_s

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def per_token_latency_s(self) -> float:
        return self.jct_s / self.output_tokens

    def tbts_s(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times_s, dtype=float))

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        return None if n < 2 else (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1)

    def p99_tbt_s(self) -> float | None:
        gaps = self.tbts_s()
        return float(np.percentile(gaps, 99)) if gaps.size else None


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tbt_s: float

    def met_by(self, t: RequestTimeline) -> bool:
        p99_tbt = t.p99_tbt_s()
        return t.ttft_s < self.ttft_s and (p99_tbt is None or p99_tbt < self.tbt_s)


def distribution(values: Iterable[float] | np.ndarray) -> dict[str, float | None]:
    """``{"mean", "p50", "p95", "p99"}`` of ``values`` (None each when empty)."""
    a = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
    if a.size == 0:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    percentiles = np.percentile(a, QUANTILES)
    return {
        "mean": float(a.mean()),
        **{f"p{q}": float(p) for q, p in zip(QUANTILES, percentiles, strict=True)},
    }


def summarize(timelines: Sequence[RequestTimeline], slo: SLO | None = None) -> dict[str, Any]:
    """Every metric of a run. ``duration_s`` spans first arrival to last finish."""
    if not timelines:
        raise ValueError("no requests to summarize")
    start = min(t.arrival_s for t in timelines)
    end = max(t.finish_s for t in timelines)
    duration_s = end - start
    tbts = [t.tbts_s() for t in timelines]
    all_tbts = np.concatenate(tbts) if tbts else np.zeros(0)
    num_output = sum(t.output_tokens for t in timelines)
    summary: dict[str, Any] = {
        "num_requests": len(timelines),
        "num_output_tokens": num_output,
        "duration_s": duration_s,
        "throughput_rps": len(timelines) / duration_s if duration_s > 0 else None,
        "output_tokens_per_s": num_output / duration_s if duration_s > 0 else None,
        "ttft_s": distribution(t.ttft_s for t in timelines),
        "tbt_s": distribution(all_tbts),
        "tpot_s": distribution(v for t in timelines if (v := t.tpot_s) is not None),
        "jct_s": distribution(t.jct_s for t in timelines),
        "per_token_latency_s": distribution(t.per_token_latency_s for t in timelines),
    }
    if slo is not None:
        num_met = sum(slo.met_by(t) for t in timelines)
        summary["slo"] = {
            "ttft_s": slo.ttft_s,
            "tbt_s": slo.tbt_s,
            "num_met": num_met,
            "attainment": num_met / len(timelines),
            "goodput_rps": num_met / duration_s if duration_s > 0 else None,
        }
    return summary


def effective_throughput(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Highest rate of ``(rate, attainment)`` points with every rate up to it >= ``target``.

    Rates are taken in increasing order; the first rate below target ends the search.
    None when even the lowest rate misses the target.
    """
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted - measured) / measured
