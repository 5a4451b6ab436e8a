"""The policy matrix: every policy in the simulator over workloads x loads x memory regimes.

A **cell** is (profile, memory regime, workload, load). Loads are multiples of ``fcfs``'s
measured **capacity** on that workload, profile and regime: ``fcfs`` simulated with every
request arriving at 0, finished requests / (last finish - first arrival). Each cell runs
every policy on ``workload.at_rate(load * capacity)`` and reports absolute metrics and
their ratios to ``fcfs`` in the same cell, then checks the targets (``evaluate_targets``).

Every simulation is one independent task (its workload regenerated from the seed in the
worker), so a pool of any size gives the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sim.cost_model import load_profile
from ..sim.simulator import SimConfig
from .commands import _pairs, _write, parameters_for, run_in_sim
from .matrix_report import plot_matrix
from .metrics import SLO
from .report import new_result
from .targets import (
    BASELINE,
    GOODPUT_LOADS,
    GOODPUT_SHARE,
    MLFQ_LOADS,
    MLFQ_POLICY,
    MLFQ_SPEEDUP,
    RATIO_TARGETS,
    evaluate_targets,
    mlfq_speedup,
    ratio,
)
from .workload import PRESETS, Workload, synthetic

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class MatrixWorkload:
    preset: str  # length statistics (``workload.PRESETS``)
    cv: float  # of the arrival gaps (1: Poisson)
    engine: Mapping[str, int]  # config.pbtxt parameters for this workload


# FastServe's artifact settings for the ShareGPT/Alpaca runs; the long-prompt workloads
# get a larger batch and token budget.
_SMALL_BATCH = {"max_batch_size": 16, "max_num_tokens": 2048}
_LARGE_BATCH = {"max_batch_size": 64, "max_num_tokens": 4096}
WORKLOADS: dict[str, MatrixWorkload] = {
    "sharegpt": MatrixWorkload("sharegpt", 1.0, _SMALL_BATCH),
    "bursty": MatrixWorkload("sharegpt", 3.0, _SMALL_BATCH),  # ShareGPT lengths, Gamma CV 3
    "alpaca": MatrixWorkload("alpaca", 1.0, _SMALL_BATCH),
    "conversation": MatrixWorkload("conversation", 1.0, _LARGE_BATCH),
    "code": MatrixWorkload("code", 1.0, _LARGE_BATCH),
}

# Device and host KV per memory regime, per profile (config.pbtxt parameters).
REFERENCE_PROFILE = "llama2-7b-a100"
REGIMES: dict[str, dict[str, dict[str, int]]] = {
    REFERENCE_PROFILE: {
        "ample": {"kv_cache_bytes": 16 * GIB, "kv_cache_host_memory_bytes": 64 * GIB},
        "tight": {"kv_cache_bytes": 4 * GIB, "kv_cache_host_memory_bytes": 16 * GIB},
    },
}

DEFAULT_LOADS = (0.5, 0.8, 0.9, 1.0, 1.2, 1.5)
DEFAULT_REGIMES = ("ample", "tight")

METRICS = (
    "mean_jct_s",
    "p99_jct_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "p99_tbt_s",
    "output_tokens_per_s",
    "goodput_rps",
    "attainment",
    "num_recomputed_tokens",
    "swapped_bytes",
)
COUNTS = (
    "num_recomputations",
    "num_swap_outs",
    "num_swap_ins",
    "num_blocks_swapped_out",
    "num_blocks_swapped_in",
    "num_preemptions",
    "num_rejected",
)


def heavy_tailed(name: str) -> bool:
    """A workload whose input or output length has a coefficient of variation above 1
    (the exponential's): for a lognormal, ``sqrt(exp(sigma^2) - 1) > 1``."""
    spec = PRESETS[WORKLOADS[name].preset]
    return any(math.exp(d.sigma**2) - 1 > 1 for d in (spec.input, spec.output))


def matrix_workload(name: str, num_requests: int, seed: int, max_context: int | None) -> Workload:
    """The cell's requests at a nominal 1 request/s (``at_rate`` rescales them)."""
    spec = WORKLOADS[name]
    w = synthetic(spec.preset, num_requests, 1.0, spec.cv, seed, 1.0, max_context)
    return Workload(name, w.requests, {**w.meta, "matrix_workload": name})


def regimes_for(
    profile: str, kv_bytes_per_token: int, overrides: Sequence[str] = ()
) -> dict[str, dict[str, str]]:
    """This profile's regimes as config.pbtxt parameters, then ``REGIME:KEY=VALUE`` overrides.

    A profile without its own table gets the reference one scaled by its KV bytes per
    token (the same number of tokens fit).
    """
    key = profile if profile in REGIMES else Path(profile).stem
    if key in REGIMES:
        table = REGIMES[key]
    else:
        scale = kv_bytes_per_token / load_profile(REFERENCE_PROFILE).kv_bytes_per_token
        table = {
            name: {k: int(v * scale) for k, v in params.items()}
            for name, params in REGIMES[REFERENCE_PROFILE].items()
        }
    regimes = {name: {k: str(v) for k, v in params.items()} for name, params in table.items()}
    for item in overrides:
        name, sep, pair = item.partition(":")
        if not sep:
            raise SystemExit(f"--regime-param {item!r}: expected REGIME:KEY=VALUE")
        regimes.setdefault(name, {}).update(_pairs([pair], "--regime-param"))
    return regimes


# -- one simulation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One simulation; ``load`` None is the capacity run (every request at 0)."""

    profile: str
    regime: str
    workload: str
    load: float | None
    rate_rps: float | None
    policy: str
    param: tuple[str, ...]  # KEY=VALUE, later ones win
    policy_param: tuple[str, ...]
    num_requests: int
    seed: int
    max_context: int | None
    slo: tuple[float, float]

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.profile, self.regime, self.workload, self.load, self.policy)


def run_task(task: Task) -> dict[str, Any]:
    """Simulate one task; plain data back (it crosses a process boundary). A simulation
    that raises comes back as ``{"task", "error"}`` so that the other cells still finish."""
    started = time.perf_counter()
    try:
        return _run_task(task, started)
    except Exception as exc:  # reported per cell
        logger.exception("%s failed", task)
        return {"task": task, "error": f"{type(exc).__name__}: {exc}",
                "wall_s": time.perf_counter() - started}


def _run_task(task: Task, started: float) -> dict[str, Any]:
    cost_model = load_profile(task.profile)
    args = argparse.Namespace(param=list(task.param), policy_param=list(task.policy_param),
                              no_progress=True)
    config = SimConfig.from_parameters(parameters_for(args, task.policy), cost_model)
    workload = matrix_workload(task.workload, task.num_requests, task.seed, task.max_context)
    workload = workload.scaled(time_scale=0.0) if task.load is None else workload.at_rate(
        task.rate_rps)
    label = f"{task.profile}/{task.regime}/{task.workload}@{task.load}/{task.policy}"
    quiet = logging.getLogger(run_in_sim.__module__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per simulation: the report has their times
    try:
        _, run = run_in_sim(args, workload, task.policy, cost_model, SLO(*task.slo), label)
    finally:
        quiet.setLevel(level)
    s, c = run["summary"], run["counters"]
    # (the capacity run's arrivals are all at 0: no rate or CV)
    described = (workload.describe() if task.load is not None
                 else {"measured_rate_rps": None, "measured_cv": None})
    metrics = {
        "mean_jct_s": s["jct_s"]["mean"],
        "p99_jct_s": s["jct_s"]["p99"],
        "mean_ttft_s": s["ttft_s"]["mean"],
        "p99_ttft_s": s["ttft_s"]["p99"],
        "p99_tbt_s": s["tbt_s"]["p99"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "throughput_rps": s["throughput_rps"],
        "goodput_rps": s["slo"]["goodput_rps"],
        "attainment": s["slo"]["attainment"],
        # Counters the simulator may not have yet read as 0.
        "num_recomputed_tokens": c.get("num_recomputed_tokens", 0),
        "swapped_bytes": (c.get("num_blocks_swapped_out", 0) + c.get("num_blocks_swapped_in", 0))
        * config.block_bytes,
        **{k: c.get(k, 0) for k in COUNTS},
        "num_finished": s["num_requests"],
    }
    return {
        "task": task,
        "metrics": metrics,
        "summary": s,
        "counters": {k: v for k, v in c.items() if k != "wall_s"},
        "measured_rate_rps": described["measured_rate_rps"],
        "measured_cv": described["measured_cv"],
        "sim_wall_s": c.get("wall_s"),
        "wall_s": time.perf_counter() - started,
    }


def run_tasks(tasks: Sequence[Task], jobs: int, progress: bool, label: str) -> list[dict]:
    """Every task, in a pool of ``jobs`` processes (in this one for 1); results in order."""
    from tqdm import tqdm

    # Highest loads (the slowest to simulate) first, so the pool does not wait on one at
    # the end.
    order = sorted(range(len(tasks)), key=lambda i: -(tasks[i].load or 0.0))
    results: list[dict | None] = [None] * len(tasks)
    pool = None
    if jobs > 1 and len(tasks) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = context.Pool(min(jobs, len(tasks)))
    bar = tqdm(total=len(tasks), desc=label, unit="sim", disable=not progress)
    try:
        todo = [tasks[i] for i in order]
        done: Iterable[dict] = (
            pool.imap_unordered(run_task, todo, chunksize=1) if pool else map(run_task, todo)
        )
        index = {t.key: i for i, t in enumerate(tasks)}
        for r in done:
            results[index[r["task"].key]] = r
            bar.update(1)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return [r for r in results if r is not None]


# -- the command ----------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> list[str]:
    policies = [p for p in dict.fromkeys(args.policies) if p != BASELINE]
    if BASELINE not in args.policies:
        logger.info("fcfs added: the ratios and capacities are relative to it")
    policies.insert(0, BASELINE)  # first in every table
    if any(load <= 0 for load in args.loads):
        raise SystemExit("--loads must be positive")
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    return policies


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    """The whole matrix as a result dict (``report`` renders it)."""
    started = time.perf_counter()
    policies = _check_args(args)
    loads = sorted(set(args.loads))
    slo = SLO(args.slo_ttft_s, args.slo_tbt_s)
    regimes = {}
    for profile in args.profile:
        regimes[profile] = regimes_for(profile, load_profile(profile).kv_bytes_per_token,
                                       args.regime_param)
        missing = [r for r in args.regimes if r not in regimes[profile]]
        if missing:
            raise SystemExit(f"{profile}: no regime {missing}; known: {sorted(regimes[profile])}"
                             " (add one with --regime-param NAME:KEY=VALUE)")

    def task(profile: str, regime: str, workload: str, load: float | None,
             rate: float | None, policy: str) -> Task:
        engine = [f"{k}={v}" for k, v in WORKLOADS[workload].engine.items()]
        memory = [f"{k}={v}" for k, v in regimes[profile][regime].items()]
        return Task(profile, regime, workload, load, rate, policy,
                    (*engine, *memory, *args.param), tuple(args.policy_param),
                    args.num_requests, args.seed, args.max_context,
                    (slo.ttft_s, slo.tbt_s))

    grid = [(p, r, w) for p in args.profile for r in args.regimes for w in args.workloads]
    progress = not args.no_progress
    capacity_runs = run_tasks([task(*g, None, None, BASELINE) for g in grid], args.jobs,
                              progress, "capacity")
    capacity, errors = {}, []
    for g, r in zip(grid, capacity_runs, strict=True):
        m = r.get("metrics") or {}
        if not m.get("throughput_rps"):
            errors.append({"profile": g[0], "regime": g[1], "workload": g[2], "load": None,
                           "policy": BASELINE,
                           "error": r.get("error", "no capacity measured")})
            continue
        capacity[g] = {
            "profile": g[0], "regime": g[1], "workload": g[2],
            "capacity_rps": m["throughput_rps"],
            "output_tokens_per_s": m["output_tokens_per_s"],
            "num_finished": m["num_finished"], "num_rejected": m["num_rejected"],
            "duration_s": r["summary"]["duration_s"],
            "num_recomputed_tokens": m["num_recomputed_tokens"],
            "sim_wall_s": r["sim_wall_s"],
        }
    capacity_wall_s = time.perf_counter() - started

    grid = [g for g in grid if g in capacity]
    tasks = [
        task(*g, load, load * capacity[g]["capacity_rps"], policy)
        for g in grid for load in loads for policy in policies
    ]
    runs = {r["task"].key: r for r in run_tasks(tasks, args.jobs, progress, "matrix")}
    cells = []
    for g in grid:
        for load in loads:
            mine = {p: runs[(*g, load, p)] for p in policies}
            errors += [{"profile": g[0], "regime": g[1], "workload": g[2], "load": load,
                        "policy": p, "error": r["error"]} for p, r in mine.items() if "error" in r]
            cells.append(_cell(g, load, capacity[g]["capacity_rps"], mine))
    heavy = {w: heavy_tailed(w) for w in args.workloads}
    targets = evaluate_targets(cells, heavy)
    speedups = [
        {"profile": c["profile"], "regime": c["regime"], "workload": c["workload"],
         "load": c["load"], "heavy_tailed": heavy[c["workload"]], "speedup": mlfq_speedup(c)}
        for c in cells if MLFQ_LOADS[0] <= c["load"] <= MLFQ_LOADS[1] and MLFQ_POLICY in policies
    ]
    options = ("profile", "workloads", "loads", "regimes", "num_requests", "seed",
               "max_context", "param", "policy_param", "regime_param", "jobs")
    return new_result(
        "matrix",
        parameters={name: getattr(args, name) for name in options},
        slo=vars(slo),
        policies=policies,
        workloads={
            w: {"preset": WORKLOADS[w].preset, "cv": WORKLOADS[w].cv,
                "engine": dict(WORKLOADS[w].engine), "heavy_tailed": heavy[w],
                "source": PRESETS[WORKLOADS[w].preset].source,
                "description": matrix_workload(w, args.num_requests, args.seed,
                                               args.max_context).describe()}
            for w in args.workloads
        },
        regimes={p: {r: regimes[p][r] for r in args.regimes} for p in args.profile},
        targets_definition={
            "ratio_to_fcfs": [{"target": n, "metric": k, "op": op, "bound": b}
                              for n, k, op, b in RATIO_TARGETS],
            "goodput_overload": {"loads": GOODPUT_LOADS, "share": GOODPUT_SHARE},
            "apt_attainment": ">= fcfs",
            "mlfq_speedup": {"loads": MLFQ_LOADS, "bound": MLFQ_SPEEDUP,
                             "heavy_tailed": "input or output length CV > 1"},
        },
        capacity=list(capacity.values()),
        cells=cells,
        targets=targets,
        misses=[t for t in targets if t["met"] is False],
        errors=errors,
        mlfq_speedup=speedups,
        timing={"capacity_wall_s": capacity_wall_s,
                "wall_s": time.perf_counter() - started,
                "sim_wall_s_total": sum(c["sim_wall_s"] for c in cells)
                + sum(c["sim_wall_s"] or 0.0 for c in capacity.values())},
    )


def _cell(grid: tuple[str, str, str], load: float, capacity_rps: float,
          runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One cell from its policies' runs; ratios to fcfs (None where fcfs failed)."""
    base = runs[BASELINE].get("metrics")
    first = runs[BASELINE]
    out: dict[str, Any] = {
        "profile": grid[0], "regime": grid[1], "workload": grid[2], "load": load,
        "capacity_rps": capacity_rps, "rate_rps": load * capacity_rps,
        "measured_rate_rps": first.get("measured_rate_rps"),
        "measured_cv": first.get("measured_cv"),
        "sim_wall_s": sum(r.get("sim_wall_s") or 0.0 for r in runs.values()),
        "runs": {},
    }
    for policy, r in runs.items():
        if "error" in r:
            out["runs"][policy] = {"error": r["error"], "wall_s": r["wall_s"]}
            continue
        m = r["metrics"]
        out["runs"][policy] = {
            "metrics": m,
            "ratios": {k: ratio(m[k], base[k] if base else None) for k in METRICS},
            "counters": r["counters"],
            "summary": r["summary"],
            "sim_wall_s": r["sim_wall_s"],
            "wall_s": r["wall_s"],
        }
    return out


def matrix(args: argparse.Namespace) -> int:
    result = run_matrix(args)
    out = Path(args.out)
    png = plot_matrix(result, out.with_name(out.name + ".png"))
    _write(result, out, {})
    print(f"plot: {png}")
    return 0


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
