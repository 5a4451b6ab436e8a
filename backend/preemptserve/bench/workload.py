"""Workloads: synthetic (lognormal lengths, Poisson or Gamma arrivals) or a replayed trace.

A workload is plain data: per request, an arrival time (seconds from the start) and exact
input and output token counts. Everything is drawn from one ``numpy`` generator seeded by
``seed``, so the same arguments give the same workload.

Length statistics (``../shared/design/papers.md``, "Workloads used by the papers"):

* ``sharegpt``: ShareGPT-GPT4 as reported by Llumnix: input mean 306 / median 74,
  output mean 500 / median 487 tokens.
* ``alpaca``: mean input 19 and output 58 tokens (vLLM paper). No median is published
  there; we take median = 0.8 x mean (lognormal sigma 0.67), an assumption.
* ``conversation`` (long-prompt conversation): input median 1000 / mean 1500, output
  median 180 / mean 250 tokens. Assumed shapes, stated in the project's issue for the
  policy matrix; not measured from a dataset.
* ``code`` (code completion): input median 1500 / mean 2000, output median 30 / mean 50
  tokens. Assumed shapes from the same issue, not measured.

A lognormal with ``mu = ln(median)`` and ``sigma = sqrt(2 ln(mean / median))`` has that
mean and median. Lengths are multiplied by ``length_scale`` (to fit a small model's
context or a CPU's speed), rounded, and clipped to ``[1, max_context_tokens]`` so that
input + output fits the context.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.request import HIGH_PRIORITY, NORMAL_PRIORITY


@dataclass(frozen=True)
class RequestSpec:
    index: int
    arrival_time_s: float
    input_tokens: int
    output_tokens: int
    priority: str = NORMAL_PRIORITY  # "high" or "normal" (the request_priority parameter)


@dataclass(frozen=True)
class LengthDistribution:
    """Lognormal token counts with a given mean and median."""

    mean_tokens: float
    median_tokens: float

    def __post_init__(self) -> None:
        if not 0 < self.median_tokens <= self.mean_tokens:
            raise ValueError("need 0 < median <= mean for a lognormal length distribution")

    @property
    def sigma(self) -> float:
        return math.sqrt(2 * math.log(self.mean_tokens / self.median_tokens))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.lognormal(math.log(self.median_tokens), self.sigma, n)


@dataclass(frozen=True)
class LengthPreset:
    input: LengthDistribution
    output: LengthDistribution
    source: str


PRESETS = {
    "sharegpt": LengthPreset(
        LengthDistribution(306, 74),
        LengthDistribution(500, 487),
        "ShareGPT-GPT4 statistics reported by Llumnix (OSDI'24)",
    ),
    "alpaca": LengthPreset(
        LengthDistribution(19, 15.2),
        LengthDistribution(58, 46.4),
        "Alpaca means from the vLLM paper (SOSP'23); median = 0.8 x mean assumed",
    ),
    "conversation": LengthPreset(
        LengthDistribution(1500, 1000),
        LengthDistribution(250, 180),
        "long-prompt conversation: assumed shapes from the project's issue (input median "
        "1000 / mean 1500, output median 180 / mean 250), not measured from a dataset",
    ),
    "code": LengthPreset(
        LengthDistribution(2000, 1500),
        LengthDistribution(50, 30),
        "code completion: assumed shapes from the project's issue (input median 1500 / "
        "mean 2000, output median 30 / mean 50), not measured from a dataset",
    ),
}


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[RequestSpec, ...]
    # How it was made (generator arguments or trace path), for reports.
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_time_s if self.requests else 0.0

    def scaled(
        self,
        time_scale: float = 1.0,
        length_scale: float = 1.0,
        max_context_tokens: int | None = None,
    ) -> Workload:
        """Arrival times x ``time_scale``; token counts x ``length_scale`` (then clipped)."""
        inputs = np.array([r.input_tokens for r in self.requests], dtype=float) * length_scale
        outputs = np.array([r.output_tokens for r in self.requests], dtype=float) * length_scale
        inputs, outputs = fit_context(inputs, outputs, max_context_tokens)
        requests = tuple(
            replace(
                r,
                arrival_time_s=r.arrival_time_s * time_scale,
                input_tokens=int(i),
                output_tokens=int(o),
            )
            for r, i, o in zip(self.requests, inputs, outputs, strict=True)
        )
        meta = {
            **self.meta,
            "time_scale": self.meta.get("time_scale", 1.0) * time_scale,
            "length_scale": self.meta.get("length_scale", 1.0) * length_scale,
        }
        return Workload(self.name, requests, meta)

    def at_rate(self, rate_rps: float) -> Workload:
        """The same requests with arrivals rescaled so the mean rate is ``rate_rps``."""
        current = self.meta.get("rate_rps")
        if not current:
            raise ValueError("this workload has no nominal rate to rescale")
        scaled = self.scaled(time_scale=current / rate_rps)
        return Workload(scaled.name, scaled.requests, {**scaled.meta, "rate_rps": rate_rps})

    def head(self, num_requests: int) -> Workload:
        return Workload(self.name, self.requests[:num_requests], self.meta)

    def with_priorities(self, high_share: float, seed: int = 0) -> Workload:
        """The same requests, each high-priority with probability ``high_share`` (drawn
        from ``seed``, independently of the lengths and arrivals), the rest normal."""
        if not 0 <= high_share <= 1:
            raise ValueError(f"high_share must be in [0, 1], got {high_share}")
        draws = np.random.default_rng(seed).random(len(self.requests))
        requests = tuple(
            replace(r, priority=HIGH_PRIORITY if d < high_share else NORMAL_PRIORITY)
            for r, d in zip(self.requests, draws, strict=True))
        return Workload(self.name, requests,
                        {**self.meta, "high_priority_share": high_share, "priority_seed": seed})

    def describe(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float]:
            a = np.asarray(values, dtype=float)
            return {
                "mean": float(a.mean()),
                "median": float(np.median(a)),
                "p99": float(np.percentile(a, 99)),
                "min": float(a.min()),
                "max": float(a.max()),
            }

        gaps = np.diff([r.arrival_time_s for r in self.requests])
        return {
            "name": self.name,
            "num_requests": len(self.requests),
            "input_tokens": stats([r.input_tokens for r in self.requests]),
            "output_tokens": stats([r.output_tokens for r in self.requests]),
            "duration_s": self.duration_s,
            "measured_rate_rps": len(gaps) / float(gaps.sum()) if gaps.sum() > 0 else None,
            "measured_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 else None,
            **{f"meta_{k}": v for k, v in self.meta.items()},
        }

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["arrival_time_s", "input_tokens", "output_tokens"])
            for r in self.requests:
                writer.writerow([f"{r.arrival_time_s:.6f}", r.input_tokens, r.output_tokens])


def fit_context(
    inputs: np.ndarray, outputs: np.ndarray, max_context_tokens: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Round to integers >= 1; with a context limit, input <= limit - 1, then output fits."""
    inputs = np.maximum(1, np.rint(inputs)).astype(np.int64)
    outputs = np.maximum(1, np.rint(outputs)).astype(np.int64)
    if max_context_tokens is not None:
        inputs = np.minimum(inputs, max_context_tokens - 1)
        outputs = np.minimum(outputs, max_context_tokens - inputs)
    return inputs, outputs


def gamma_arrivals_s(
    rng: np.random.Generator, n: int, rate_rps: float, cv: float = 1.0
) -> np.ndarray:
    """Arrival times of ``n`` requests, the first at 0: Gamma gaps (CV 1 is Poisson).

    Gaps have shape ``1 / cv**2`` and scale ``cv**2 / rate``: mean ``1 / rate``, coefficient
    of variation ``cv``.
    """
    if rate_rps <= 0 or cv <= 0:
        raise ValueError("need rate > 0 and cv > 0")
    gaps = rng.gamma(1.0 / cv**2, cv**2 / rate_rps, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(
    preset: str | LengthPreset,
    num_requests: int,
    rate_rps: float,
    cv: float = 1.0,
    seed: int = 0,
    length_scale: float = 1.0,
    max_context_tokens: int | None = None,
) -> Workload:
    """``num_requests`` requests with ``preset`` lengths and Gamma(``cv``) arrivals."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    rng = np.random.default_rng(seed)
    inputs = spec.input.sample(rng, num_requests) * length_scale
    outputs = spec.output.sample(rng, num_requests) * length_scale
    inputs, outputs = fit_context(inputs, outputs, max_context_tokens)
    arrivals = gamma_arrivals_s(rng, num_requests, rate_rps, cv)
    requests = tuple(
        RequestSpec(i, float(a), int(n_in), int(n_out))
        for i, (a, n_in, n_out) in enumerate(zip(arrivals, inputs, outputs, strict=True))
    )
    name = preset if isinstance(preset, str) else "custom"
    return Workload(
        name,
        requests,
        {
            "generator": name,
            "source": spec.source,
            "seed": seed,
            "rate_rps": rate_rps,
            "cv": cv,
            "length_scale": length_scale,
            "max_context_tokens": max_context_tokens,
        },
    )


def load_trace(
    path: str | Path,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_context_tokens: int | None = None,
) -> Workload:
    """A CSV trace with columns ``arrival_time_s,input_tokens,output_tokens``.

    Rows are sorted by arrival time; times are shifted so the first arrival is at 0.
    """
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"arrival_time_s", "input_tokens", "output_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append(
                    (
                        float(row["arrival_time_s"]),
                        float(row["input_tokens"]),
                        float(row["output_tokens"]),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    requests = tuple(
        RequestSpec(i, t - start, max(1, round(n_in)), max(1, round(n_out)))
        for i, (t, n_in, n_out) in enumerate(rows)
    )
    span = requests[-1].arrival_time_s
    trace = Workload(
        Path(path).stem,
        requests,
        {"trace": str(path), "rate_rps": (len(requests) - 1) / span if span > 0 else None},
    )
    return trace.scaled(time_scale, length_scale, max_context_tokens)
