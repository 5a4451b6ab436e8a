"""Fit an ``IterationCostModel`` to measured ``(BatchShape, seconds)`` samples. numpy only.

Least squares on relative error (each row weighted by 1 / measured time, so a 5 ms decode
step counts as much as a 500 ms prefill), with non-negative coefficients: a coefficient
that comes out negative is fixed at zero and the rest refitted, until none is negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .cost_model import COEFFICIENTS, BatchShape


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
