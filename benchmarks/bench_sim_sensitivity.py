#!/usr/bin/env python3
"""How much a policy's simulated JCT moves when the cost model is off by a little.

A simulator is only as trustworthy as its cost model, and some policies amplify an error
in it: this script runs each policy on one workload in the simulator with the profile as
measured and with it perturbed, one perturbation at a time:

* ``speed xF``: every iteration coefficient times ``F`` (a machine ``F`` times slower);
* ``recompute xF``: the hidden-state recompute cost ``c`` times ``F``, both what the
  policy weighs and what the simulated step pays (``apt`` only; skipped otherwise);
* ``no noise``: the measured iteration noise left out.

Each cell is the mean over ``--seeds`` noise seeds of the mean JCT, with the mean number
of swap-outs. A policy whose mean JCT moves far more than ``F`` under ``speed xF`` sits
near a tipping point on that workload: one run of the real server there is one draw.
Results are printed and saved to ``benchmarks/results/sim-sensitivity-<date>.json`` with
the command, the machine and the date.

Usage (the fidelity workload of docs/simulator.md)::

    .venv/bin/python benchmarks/bench_sim_sensitivity.py \\
        --profile benchmarks/results/profile-cpu-served-2026-11-22.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from bench_common import machine_info, print_table  # noqa: E402

from preemptserve.bench.metrics import SLO, summarize  # noqa: E402
from preemptserve.bench.workload import synthetic  # noqa: E402
from preemptserve.sim.cost_model import COEFFICIENTS, IterationCostModel, load_profile  # noqa: E402
from preemptserve.sim.simulator import SimConfig, Simulator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def perturbations(model: IterationCostModel, factors: list[float]) -> dict[str, IterationCostModel]:
    variants = {"as measured": model,
                "no noise": model.with_coefficients(noise_trace=(), noise_quantiles=())}
    for f in factors:
        variants[f"speed x{f}"] = model.with_coefficients(
            **{name: getattr(model, name) * f for name in COEFFICIENTS})
    if model.hidden_recompute_s_per_block is not None:
        for f in factors:
            variants[f"recompute x{f}"] = model.with_coefficients(
                hidden_recompute_s_per_block=model.hidden_recompute_s_per_block * f)
    return variants


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True)
    p.add_argument("--policies", nargs="+", default=["fcfs", "skip_join_mlfq", "apt"])
    p.add_argument("--factors", nargs="+", type=float, default=[0.8, 0.9, 1.1, 1.2])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workload", default="sharegpt")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--length-scale", type=float, default=0.2)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[
        "kv_cache_bytes=33554432", "kv_cache_host_memory_bytes=134217728"])
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tbt-s", type=float, default=0.5)
    p.add_argument("--format", choices=("rich", "plain", "markdown"), default="rich")
    args = p.parse_args()

    model = load_profile(args.profile)
    slo = SLO(args.slo_ttft_s, args.slo_tbt_s)
    workload = synthetic(args.workload, args.num_requests, args.rate, seed=args.seed,
                         length_scale=args.length_scale, max_context_tokens=args.max_context)
    params = dict(item.split("=", 1) for item in args.param)
    variants = perturbations(model, args.factors)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for policy in args.policies:
        results[policy] = {}
        for name, variant in variants.items():
            if name.startswith("recompute") and policy != "apt":
                continue
            config = SimConfig.from_parameters({**params, "scheduler_policy": policy}, variant)
            jcts, swaps = [], []
            for seed in range(args.seeds):
                run = Simulator(dataclasses.replace(config, noise_seed=seed), variant,
                                workload, slo).run()
                jcts.append(summarize(run.timelines(), slo)["jct_s"]["mean"])
                swaps.append(run.num_swap_outs)
            results[policy][name] = {"mean_jct_s": float(np.mean(jcts)),
                                     "min_jct_s": min(jcts), "max_jct_s": max(jcts),
                                     "swap_outs": float(np.mean(swaps))}
    names = list(variants)
    rows = []
    for policy, cells in results.items():
        base = cells["as measured"]["mean_jct_s"]
        row = [policy]
        for name in names:
            cell = cells.get(name)
            row.append("" if cell is None else
                       f"{cell['mean_jct_s']:.2f} s ({cell['mean_jct_s'] / base:.2f}x, "
                       f"{cell['swap_outs']:.0f} swaps)")
        rows.append(row)
    print_table(f"mean JCT in the simulator ({args.workload}, {args.num_requests} requests at "
                f"{args.rate}/s, lengths x{args.length_scale}; mean of {args.seeds} noise seeds)",
                ["policy", *names], rows, args.format)
    date = dt.date.today().isoformat()
    out = RESULTS / f"sim-sensitivity-{date}.json"
    out.write_text(json.dumps({
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "workload": workload.describe(),
        "results": results,
    }, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
