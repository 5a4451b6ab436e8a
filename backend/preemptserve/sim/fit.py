"""Fit an ``IterationCostModel`` to measured ``(BatchShape, seconds)`` samples. numpy only.

Least squares on relative error (each row weighted by 1 / measured time, so a 5 ms decode
step counts as much as a 500 ms prefill), with non-negative coefficients: a coefficient
that comes out negative is fixed at zero and the rest refitted, until none is negative.

The samples come from the engine timed in process (``bench/profile.py``) or from a
server's own iterations (``iteration_stats_path``): ``fit_served_iterations`` turns the
loop periods of those records into samples, and their spread into the simulator's noise.
With several instances on one machine, ``co_running`` gives each iteration the share of
it the other instances spent in steps of their own, and the fit separates that slowdown
(``co_running_slowdown``) from the batch's time. ``fit_serving`` is the whole served fit
(iterations, noise, request latency); ``refit_serving`` runs it again on a profile's saved
logs (``bench refit``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.iteration_stats import IterationStats, read_iteration_log
from .cost_model import COEFFICIENTS, BatchShape, IterationCostModel


def fit_iteration_coefficients(
    samples: Sequence[tuple[BatchShape, float]],
    fit: Sequence[str] = COEFFICIENTS,
    factors: np.ndarray | None = None,
) -> dict[str, float]:
    """Coefficients named in ``fit`` (others 0) minimising squared relative error; with
    ``factors``, of each sample's time as the model's times its factor."""
    if len(samples) < len(fit):
        raise ValueError(f"need at least {len(fit)} samples, got {len(samples)}")
    columns = [COEFFICIENTS.index(name) for name in fit]
    x = np.array([[shape.features()[c] for c in columns] for shape, _ in samples], dtype=float)
    if factors is not None:
        x *= np.asarray(factors, dtype=float)[:, None]
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


_CONTENTION_ROUNDS = 20
LONE_PROMPTS = (16, 64, 256)  # prompt tokens of the serving profile's lone requests


def co_running(instances: Sequence[Sequence[IterationStats]]) -> list[list[float]]:
    """For each instance's records (in its order), the share of each step's wall time
    during which the other instances were in a step of their own, averaged over them: 0
    alone, 1 all the others busy throughout. Instances on one machine contend for its
    cores and memory bandwidth; this is what the fit relates that to."""
    busy = []
    for records in instances:
        starts = np.array([r.timestamp for r in records], dtype=float)
        ends = starts + np.array([r.step_s for r in records], dtype=float)
        order = np.argsort(starts)
        starts, ends = starts[order], ends[order]
        # cumulative busy time up to each interval's end, for prefix sums
        busy.append((starts, ends, np.concatenate(([0.0], np.cumsum(ends - starts)))))
    shares = []
    for i, records in enumerate(instances):
        others = [b for j, b in enumerate(busy) if j != i]
        row = []
        for record in records:
            lo, hi = record.timestamp, record.timestamp + record.step_s
            if not others or hi <= lo:
                row.append(0.0)
                continue
            row.append(sum(_busy_within(b, lo, hi) for b in others) / len(others) / (hi - lo))
        shares.append(row)
    return shares


def _busy_within(busy: tuple[np.ndarray, np.ndarray, np.ndarray], lo: float,
                 hi: float) -> float:
    """Seconds of ``[lo, hi]`` covered by the sorted, disjoint intervals ``busy``."""
    starts, ends, cumulative = busy
    first = int(np.searchsorted(ends, lo, side="right"))  # first interval ending after lo
    last = int(np.searchsorted(starts, hi, side="left"))  # intervals starting before hi
    if last <= first:
        return 0.0
    covered = cumulative[last] - cumulative[first]
    covered -= max(0.0, lo - starts[first])
    covered -= max(0.0, ends[last - 1] - hi)
    return float(covered)


def fit_served_iterations(
    model: IterationCostModel,
    records: Sequence[IterationStats],
    block_bytes: int,
    shares: Sequence[float] | None = None,
) -> tuple[IterationCostModel, dict[str, Any]]:
    """The iteration coefficients, spread and autocorrelation fitted to a server's own
    iterations (``iteration_stats_path``). Swap copies and hidden-state recomputes are
    taken off each period with the in-process measurements of ``model``; what is left is
    fitted to the batch shape as in process.

    ``shares``: each record's ``co_running`` share (instances sharing one machine). Then
    the period is fitted as the batch shape's time x (1 + ``co_running_slowdown`` x
    share), the two alternately (each a linear least squares on relative error, so each
    round lowers the error), and the noise is what neither explains."""
    samples, x = [], []
    share_of = dict(zip(map(id, records), shares, strict=True)) if shares is not None else {}
    for record, period in iteration_periods(records):
        extra = _swap_and_recompute_s(model, record, block_bytes)
        if period - extra > 0:
            samples.append((record.shape, period - extra))
            x.append(share_of.get(id(record), 0.0))
    if len(samples) < 50:
        raise RuntimeError(f"only {len(samples)} usable server iterations to fit")
    share = np.array(x)
    times = np.array([t for _, t in samples])
    slowdown = 0.0
    coefficients = fit_iteration_coefficients(samples)
    if shares is not None and share.any():
        for _ in range(_CONTENTION_ROUNDS):
            current = model.with_coefficients(**coefficients)
            modelled = np.array([current.iteration_time_s(s) for s, _ in samples])
            # min sum(((t - m (1 + k x)) / t)^2) over k: linear in k
            w = modelled * share / times
            slowdown = max(0.0, float(np.dot(w, 1 - modelled / times) / np.dot(w, w)))
            coefficients = fit_iteration_coefficients(samples, factors=1 + slowdown * share)
    fitted = model.with_coefficients(**coefficients, co_running_slowdown=slowdown)
    ratios = np.array([t / (fitted.iteration_time_s(shape) * (1 + slowdown * x))
                       for (shape, t), x in zip(samples, share, strict=True)])
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
        "co_running_slowdown": slowdown,
        "mean_co_running_share": float(share.mean()),
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
    model: IterationCostModel, records: Sequence[IterationStats], block_bytes: int,
    shares: Sequence[float] | None = None,
) -> dict[str, Any]:
    """How a server's iterations compare with the cost model (noise left out): the ratio
    of their total measured period to the modelled one, overall and by batch size. This
    is a diagnosis of a run, never an input to a prediction. ``shares``: the records'
    ``co_running`` shares (several instances), for the model's ``co_running_slowdown``."""
    by_size: dict[str, list[float]] = {}
    measured = modelled = 0.0
    share_of = dict(zip(map(id, records), shares, strict=True)) if shares is not None else {}
    for record, period in iteration_periods(records):
        slowdown = 1 + model.co_running_slowdown * share_of.get(id(record), 0.0)
        predicted = model.iteration_time_s(record.shape) * slowdown + _swap_and_recompute_s(
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


def fit_serving(
    model: IterationCostModel,
    per_instance: Sequence[Sequence[Any]],
    block_bytes: int,
    lone_ttfts: Sequence[tuple[int, float]],
) -> tuple[IterationCostModel, dict[str, Any]]:
    """``profile_serving``'s fit, from each instance's iteration records and the lone
    requests' ``(prompt tokens, client TTFT)``: the iteration coefficients (with several
    instances on one machine, their ``co_running_slowdown``), the noise, the request
    latency."""
    # One instance's log after another: a period never spans two logs (iteration_periods
    # pairs consecutive iteration numbers only).
    records = [r for log in per_instance for r in log]
    # Several instances share this machine: the fit relates each iteration's time to how
    # much of it the others spent in steps of their own.
    shares = ([x for log in co_running(per_instance) for x in log]
              if len(per_instance) > 1 else None)
    fitted, facts = fit_served_iterations(model, records, block_bytes, shares)
    residuals = [ttft - fitted.prefill_time_s(n) for n, ttft in lone_ttfts]
    request_latency_s = max(0.0, float(np.median(residuals)))
    fitted = fitted.with_coefficients(request_latency_s=request_latency_s)
    return fitted, facts | {
        "lone_ttfts_s": [list(pair) for pair in lone_ttfts],
        "ttft_residuals_s": residuals,
        "request_latency_s": request_latency_s,
        "num_instances": len(per_instance),
    }


def refit_serving(profile: IterationCostModel, iteration_logs: Sequence[Path],
                  block_bytes: int) -> tuple[IterationCostModel, dict[str, Any]]:
    """A served profile fitted again to its own saved iteration logs (one per instance,
    as ``bench profile --server`` left them), with this version's fit: no server runs.
    The lone requests' TTFTs are the profile's (older profiles saved only their residuals
    against its model, from which they are recovered)."""
    serving = profile.source.get("serving", {})
    if "lone_ttfts_s" in serving:
        lone = [(int(n), float(t)) for n, t in serving["lone_ttfts_s"]]
    else:
        prompts = [n for n in LONE_PROMPTS for _ in range(3)]
        lone = [(n, r + profile.prefill_time_s(n))
                for n, r in zip(prompts, serving["ttft_residuals_s"], strict=True)]
    skip = serving.get("log_skip", [0] * len(iteration_logs))
    per_instance = [list(read_iteration_log(p))[n:]
                    for p, n in zip(iteration_logs, skip, strict=True)]
    fitted, facts = fit_serving(profile, per_instance, block_bytes, lone)
    return fitted, serving | facts | {"refitted_from": [str(p) for p in iteration_logs]}
