"""Fit an ``IterationCostModel`` to measured ``(BatchShape, seconds)`` samples. numpy only.

Least squares on relative error (each row weighted by 1 / measured time, so a 5 ms decode
step counts as much as a 500 ms prefill), with non-negative coefficients: a coefficient
that comes out negative is fixed at zero and the rest refitted, until none is negative.

The samples come from the engine timed in process (``bench/profile.py``) or from a
server's own iterations (``iteration_stats_path``): ``fit_served_iterations`` turns the
loop periods of those records into samples, and their spread into the simulator's noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .cost_model import COEFFICIENTS, BatchShape, IterationCostModel

if TYPE_CHECKING:  # plain records; importing them at run time is not needed
    from ..engine.iteration_stats import IterationStats


def fit_iteration_coefficients(
    samples: Sequence[tuple[BatchShape, float]],
    fit: Sequence[str] = COEFFICIENTS,
) -> dict[str, float]:
    """Coefficients named in ``fit`` (others 0) minimising squared relative error."""
    if len(samples) < len(fit):
        raise ValueError(f"need at least {len(fit)} samples, got {len(samples)}")
    columns = [COEFFICIENTS.index(name) for name in fit]
    x = np.array([[shape.features()[c] for c in columns] for shape, _ in samples], dtype=float)
    y = np.array([t for _, t in samples], dtype=float)
    if (y <= 0).any():
        raise ValueError("measured times must be positive")
    w = 1.0 / y
    active = list(range(len(columns)))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        negative = [a for a, c in zip(active, coef, strict=True) if c < 0]
        if not negative:
            break
        active = [a for a in active if a not in negative]
        if not active:
            coef = np.zeros(0)
            break
    values = dict.fromkeys(fit, 0.0)
    for a, c in zip(active, coef, strict=True):
        values[fit[a]] = float(c)
    return values


def relative_errors(samples: Sequence[tuple[BatchShape, float]], predict: object) -> np.ndarray:
    """(predicted - measured) / measured per sample; ``predict(shape) -> seconds``."""
    return np.array([(predict(s) - t) / t for s, t in samples])  # type: ignore[operator]


def fit_swap(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """``(fixed_s, bytes_per_s)`` from ``(bytes, seconds)`` samples (plain least squares)."""
    b = np.array([n for n, _ in samples], dtype=float)
    t = np.array([s for _, s in samples], dtype=float)
    slope, intercept = np.polyfit(b, t, 1)
    if slope <= 0:
        raise ValueError("swap time does not grow with size; cannot fit a bandwidth")
    return max(0.0, float(intercept)), float(1.0 / slope)


def iteration_periods(records: Sequence[IterationStats]) -> list[tuple[IterationStats, float]]:
    """``(record, seconds)``: each non-empty iteration's loop period, from its start to the
    next one's, where the loop went straight on (requests were left, so it did not wait for
    an arrival). The period is what the simulator's iteration stands for: the step, plus
    handing the outputs to the sender thread and draining the inbox, on cores shared with
    Triton, the response thread and the client."""
    periods = []
    for current, following in itertools.pairwise(records):
        if (current.num_unfinished and current.num_scheduled
                and following.iteration == current.iteration + 1):
            periods.append((current, following.start_s - current.start_s))
    return periods


def fit_served_iterations(
    model: IterationCostModel, records: Sequence[IterationStats], block_bytes: int
) -> tuple[IterationCostModel, dict[str, Any]]:
    """The iteration coefficients, spread and autocorrelation fitted to a server's own
    iterations (``iteration_stats_path``). Swap copies and hidden-state recomputes are
    taken off each period with the in-process measurements of ``model``; what is left is
    fitted to the batch shape as in process."""
    samples = []
    for record, period in iteration_periods(records):
        extra = _swap_and_recompute_s(model, record, block_bytes)
        if period - extra > 0:
            samples.append((record.shape, period - extra))
    if len(samples) < 50:
        raise RuntimeError(f"only {len(samples)} usable server iterations to fit")
    coefficients = fit_iteration_coefficients(samples)
    fitted = model.with_coefficients(**coefficients)
    ratios = np.array([t / fitted.iteration_time_s(shape) for shape, t in samples])
    fitted = fitted.with_coefficients(
        noise_quantiles=tuple(float(q) for q in np.quantile(ratios, np.linspace(0, 1, 41))),
        noise_trace=tuple(round(float(r), 4) for r in ratios),
        noise_block_iterations=float(noise_block_length(ratios)),
    )
    quality = fit_quality(ratios)
    facts = {
        "num_iterations": len(records),
        "num_fitted_periods": len(samples),
        "coefficients": coefficients,
        "measured_over_model": quality["measured_over_model"],
        "period_fit_relative_error": quality["relative_error"],
        "noise_autocorrelation": {str(lag): autocorrelation(ratios, lag)
                                  for lag in (1, 2, 5, 10, 20, 50, 100)},
        "noise_block_iterations": fitted.noise_block_iterations,
    }
    return fitted, facts


def _swap_and_recompute_s(
    model: IterationCostModel, record: IterationStats, block_bytes: int
) -> float:
    """What the simulator adds to an iteration's batch-shape time for its swaps (copied
    synchronously, as on a CPU) and its hidden-state recomputes."""
    return (
        model.swap_fixed_s * (record.num_swap_outs + record.num_swap_ins)
        + (record.swap_out_blocks + record.swap_in_blocks) * block_bytes / model.swap_bytes_per_s
        + (model.hidden_recompute_s_per_block or 0.0) * record.hidden_recompute_blocks
    )


def served_over_modelled(
    model: IterationCostModel, records: Sequence[IterationStats], block_bytes: int
) -> dict[str, Any]:
    """How a server's iterations compare with the cost model (noise left out): the ratio
    of their total measured period to the modelled one, overall and by batch size. This
    is a diagnosis of a run, never an input to a prediction."""
    by_size: dict[str, list[float]] = {}
    measured = modelled = 0.0
    for record, period in iteration_periods(records):
        predicted = model.iteration_time_s(record.shape) + _swap_and_recompute_s(
            model, record, block_bytes)
        measured, modelled = measured + period, modelled + predicted
        size = record.num_scheduled
        bucket = "1" if size == 1 else "2-4" if size <= 4 else "5-16" if size <= 16 else "17+"
        sums = by_size.setdefault(bucket, [0.0, 0.0, 0])
        sums[0], sums[1], sums[2] = sums[0] + period, sums[1] + predicted, sums[2] + 1
    return {
        "total": measured / modelled if modelled else None,
        "by_batch_size": {k: {"ratio": m / p, "iterations": n}
                          for k, (m, p, n) in sorted(by_size.items())},
    }


def fit_quality(ratios: np.ndarray) -> dict[str, dict[str, float]]:
    """Measured / modelled time ratios summarised, and the model's relative errors."""
    errors = 1 / ratios - 1
    return {
        "measured_over_model": {
            "mean": float(ratios.mean()),
            "p50": float(np.median(ratios)),
            "p99": float(np.percentile(ratios, 99)),
        },
        "relative_error": {
            "median_abs": float(np.median(np.abs(errors))),
            "p90_abs": float(np.percentile(np.abs(errors), 90)),
            "mean": float(errors.mean()),
        },
    }


def autocorrelation(ratios: np.ndarray, lag: int) -> float:
    """Autocorrelation of ``log(ratios)`` at ``lag`` (0 when there are too few)."""
    if len(ratios) < lag + 3:
        return 0.0
    x = np.log(ratios)
    x = x - x.mean()
    denominator = float(np.dot(x, x))
    return float(np.dot(x[:-lag], x[lag:]) / denominator) if denominator else 0.0


def noise_block_length(ratios: np.ndarray, threshold: float = 0.05) -> int:
    """The mean block length for replaying ``ratios``: twice the first lag at which their
    autocorrelation falls below ``threshold`` (so blocks keep the runs of slow iterations),
    at most a tenth of the trace."""
    longest = max(1, len(ratios) // 10)
    for lag in range(1, longest + 1):
        if autocorrelation(ratios, lag) < threshold:
            return min(2 * lag, longest)
    return longest
