"""``fidelity``: the same workload through real servers and through the simulator.

Server runs go round the policies ``--repeats`` times (a fresh server each), so that the
machine's drifts in speed fall on every policy alike; each policy is simulated with
``--sim-seeds`` noise seeds. Both sides are averaged, and the report gives each side's
range. The servers weigh costs from the simulator's own profile (``prefill_profile_path``)
and log their iterations (``iteration_stats_path``), which the report compares with the
cost model: a diagnosis of the runs, never an input to the prediction.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from ..engine.iteration_stats import read_log_when_idle
from ..sim.cost_model import COEFFICIENTS, IterationCostModel, load_profile, profile_path
from ..sim.fit import served_over_modelled
from ..sim.simulator import SimConfig
from .commands import (
    _prompts,
    _with_servers,
    _write,
    build_workload,
    parameters_for,
    run_in_sim,
    run_on_server,
    slo_of,
    workload_result,
)
from .metrics import SLO, RequestTimeline, relative_error
from .workload import Workload

logger = logging.getLogger(__name__)


FIDELITY_STATS = (("mean_jct", "jct_s", "mean"), ("p99_jct", "jct_s", "p99"),
                  ("mean_ttft", "ttft_s", "mean"))


def fidelity_row(policy: str, server: list[dict], sim: list[dict]) -> dict[str, Any]:
    """Server against simulator for one policy: each statistic averaged over the server's
    repeats and over the simulator's noise seeds, with the range of each side."""
    row: dict[str, Any] = {"policy": policy, "server_runs": len(server), "sim_runs": len(sim)}
    for key, metric, stat in FIDELITY_STATS:
        measured = [s[metric][stat] for s in server]
        predicted = [s[metric][stat] for s in sim]
        row[f"server_{key}_s"] = float(np.mean(measured))
        row[f"sim_{key}_s"] = float(np.mean(predicted))
        row[f"server_{key}_range_s"] = [min(measured), max(measured)]
        row[f"sim_{key}_range_s"] = [min(predicted), max(predicted)]
        row[f"{key}_error"] = relative_error(row[f"sim_{key}_s"], row[f"server_{key}_s"])
    return row


def fidelity(args: argparse.Namespace) -> int:
    workload, slo = build_workload(args), slo_of(args)
    cost_model = load_profile(args.profile)
    prompts = _prompts(workload)
    # Each server logs its iterations beside the report (<out>-<policy>-iterations.jsonl):
    # the report compares them with the cost model.
    logs = {policy: args.out.with_name(f"{args.out.name}-{policy}-iterations.jsonl")
            for policy in args.policies}
    for path in logs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
    args.policy_param = [*args.policy_param, *(
        f"{policy}:iteration_stats_path={path}" for policy, path in logs.items())]
    # The servers' policies weigh prefill and recompute costs from the same profile as
    # the simulated ones (not from a measurement of their own at startup).
    args.param = [*args.param, f"prefill_profile_path={profile_path(args.profile).resolve()}"]

    result = workload_result(
        "fidelity", args, workload, slo,
        ("profile", "param", "policy_param", "server_threads", "repeats", "sim_seeds"),
        runs={}, fidelity=[],
    )
    cdfs: dict[str, list[RequestTimeline]] = {}
    served: dict[str, list[dict[str, Any]]] = {policy: [] for policy in args.policies}

    def body(policy: str, server: Any) -> None:
        label = f"{policy} server" + (f" #{len(served[policy]) + 1}" if args.repeats > 1 else "")
        real, result["runs"][label] = run_on_server(
            args, server, workload, prompts, policy, slo, label
        )
        served[policy].append(result["runs"][label]["summary"])
        cdfs.setdefault(f"{policy} server", real)

    # Repeats go round the policies (a fresh server each time), so that the machine's
    # drifts in speed (minutes long on a shared machine) fall on every policy alike.
    result["server_errors"] = {}
    for _ in range(args.repeats):
        _with_servers(args, body, result["server_errors"])
    for policy in args.policies:
        if not served[policy]:
            continue
        simulated = []
        for seed in range(args.sim_seeds):
            label = f"{policy} sim" + (f" seed {seed}" if args.sim_seeds > 1 else "")
            timelines, run = run_in_sim(
                args, workload, policy, cost_model, slo, label, noise_seed=seed
            )
            simulated.append(run["summary"])
            if seed == 0:
                cdfs[f"{policy} sim"] = timelines
                result["runs"][label] = run
        row = fidelity_row(policy, served[policy], simulated)
        config = SimConfig.from_parameters(parameters_for(args, policy), cost_model)
        row["served_over_modelled_iterations"] = served_over_modelled(
            cost_model, read_log_when_idle(logs[policy]), config.block_bytes)
        row["at_served_speed"] = at_served_speed(
            args, workload, policy, cost_model, slo, served[policy],
            row["served_over_modelled_iterations"]["total"])
        result["fidelity"].append(row)
        logger.info(
            "%s: mean JCT error %+.1f%%, P99 JCT error %+.1f%%",
            policy,
            100 * row["mean_jct_error"],
            100 * row["p99_jct_error"],
        )
    _write(result, args.out, cdfs)
    return 0


def at_speed(cost_model: IterationCostModel,
             served_over_modelled: float) -> tuple[IterationCostModel, float]:
    """The cost model with its iteration times scaled to a measured speed (measured /
    modelled periods, ``served_over_modelled``), and the factor: that speed over the
    model's mean noise factor (the noise is replayed on top)."""
    trace = cost_model.noise_trace or cost_model.noise_quantiles or (1.0,)
    factor = served_over_modelled / float(np.mean(trace))
    return cost_model.with_coefficients(
        **{name: getattr(cost_model, name) * factor for name in COEFFICIENTS}), factor


def at_served_speed(
    args: argparse.Namespace,
    workload: Workload,
    policy: str,
    cost_model: IterationCostModel,
    slo: SLO | None,
    served: list[dict[str, Any]],
    served_over_modelled_total: float | None,
) -> dict[str, Any] | None:
    """A diagnosis, never the prediction: the simulation rerun with its iteration times
    scaled to the speed the servers' iterations actually had in these runs (measured /
    modelled, over the simulator's mean noise factor). What error is left is the
    scheduling dynamics'; the rest of the prediction error was the machine's speed
    drifting between the profile and the runs."""
    if not served_over_modelled_total:
        return None
    scaled, factor = at_speed(cost_model, served_over_modelled_total)
    simulated = [
        run_in_sim(args, workload, policy, scaled, slo, f"{policy} sim at served speed",
                   noise_seed=seed)[1]["summary"]
        for seed in range(args.sim_seeds)
    ]
    row = fidelity_row(policy, served, simulated)
    return {"speed_factor": factor} | {
        k: v for k, v in row.items() if k.startswith("sim_") or k.endswith("_error")}
