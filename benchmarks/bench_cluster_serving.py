"""Two engine instances behind one Triton model: round robin vs freeness dispatch vs
freeness dispatch + live migration (Llumnix's three setups: RR, INFaaS++, Llumnix), on
one bursty workload through a real tritonserver per setup.

Each setup serves the same requests (same arrivals, lengths and prompts) with the same
local policy in both instances, ``--repeats`` times, the setups taking turns; the table
gives P99 TTFT and P99 JCT of each repeat (and the means over all), the migrations the
server counted, and the cluster simulator's prediction for the same setup
(``sim/cluster.py`` on this machine's fitted cost model, moves costed as the object
store's stages measured here), with its error on the mean and P99 JCT and the runs'
iteration speed against the profile (a diagnosis, from each run's iteration logs).

The profile should be one of two instances sharing this machine (each instance's
iterations while the other runs; ``bench profile --server --param num_instances=2``,
docs/simulator.md "Fidelity of the cluster simulator").

    .venv/bin/python benchmarks/bench_cluster_serving.py \
        --out benchmarks/results/cluster-serving-2026-11-30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_common import machine_info, print_table

from preemptserve.bench.commands import run_on_server
from preemptserve.bench.fidelity import at_speed
from preemptserve.bench.metrics import summarize
from preemptserve.bench.server import policy_server, served_parameters
from preemptserve.bench.workload import Workload, synthetic
from preemptserve.engine.iteration_stats import instance_log_path, read_iteration_log
from preemptserve.sim.cluster import ClusterSimConfig, ClusterSimulator
from preemptserve.sim.cost_model import load_profile
from preemptserve.sim.fit import co_running, served_over_modelled
from preemptserve.sim.simulator import SimConfig

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = {
    "round_robin": {"dispatch_policy": "round_robin", "enable_migration": "false"},
    "freeness": {"dispatch_policy": "load", "enable_migration": "false"},
    "freeness+migration": {"dispatch_policy": "load", "enable_migration": "true",
                           "migrate_into_waiting": "true"},
    # Llumnix's threshold (3 free decode steps per request) is in blocks; with this
    # model's short requests an instance rarely falls 3 below zero: 0 moves requests as
    # soon as the head of a queue cannot start.
    "freeness+migration@0": {"dispatch_policy": "load", "enable_migration": "true",
                             "migrate_into_waiting": "true", "migrate_out_threshold": "0"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="sharegpt")
    parser.add_argument("--num-requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=2.5, help="requests/s")
    parser.add_argument("--cv", type=float, default=3.0, help="gap CV (Gamma arrivals)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-scale", type=float, default=0.2)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--policy", default="fcfs", help="the local policy of each instance")
    parser.add_argument("--param", action="append", default=[],
                        help="KEY=VALUE config.pbtxt parameter for every setup")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--profile", type=Path,
                        default=RESULTS / "profile-cpu-served-2x-2026-11-30.json",
                        help="cost model of one instance beside another, for the predictions "
                        "(bench profile --server --param num_instances=2 ...)")
    parser.add_argument("--fit-profile", action="store_true",
                        help="first fit the profile on this machine, now (bench profile "
                        "--server with these instances), saved as OUT-profile.json with "
                        "its iteration logs, and predict with it: a profile and the runs "
                        "it predicts must share the machine's state")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sim-seeds", type=int, default=20,
                        help="noise seeds the predicted mean and P99 JCT are averaged over "
                        "(the P99 of a few hundred requests moves by up to 4x from seed "
                        "to seed: a slow stretch of the machine, or none)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="keep each run's iteration logs (one per instance) in DIR; "
                        "with --at-served-speed, read the runs' speed against --profile "
                        "from the logs kept there")
    parser.add_argument("--out", type=Path, help="path without extension (required unless "
                        "--at-served-speed)")
    parser.add_argument("--at-served-speed", type=Path, default=None, metavar="PATH.json",
                        help="a diagnosis of a saved run, never the prediction: each setup "
                        "simulated again at the speed its runs' iterations had (measured / "
                        "modelled), against what they measured; then exit")
    args = parser.parse_args()
    if args.out is None and args.at_served_speed is None:
        parser.error("--out is required")
    args.no_progress = True
    return args


def prompts_for(workload: Workload) -> list[str]:
    from preemptserve.bench.prompts import PromptBuilder

    return PromptBuilder().prompts([r.input_tokens for r in workload.requests], seed=0)


def fit_profile(base: dict[str, str], params: list[str], out: Path) -> Path:
    """``bench profile --server`` for the setups' instances (migration off); its path."""
    path = out.with_name(out.name + "-profile.json")
    ray_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")
    overrides = {key: base[key] for key in ("num_instances", "cpus_per_instance",
                                            "kv_cache_bytes", "kv_cache_host_memory_bytes")}
    overrides |= dict(p.split("=", 1) for p in params)
    overrides |= {"enable_migration": "false", "ray_temp_dir": ray_dir}
    command = [sys.executable, "-m", "preemptserve.bench", "profile", "--server",
               "--out", str(path)]
    for key, value in overrides.items():
        command += ["--param", f"{key}={value}"]
    print(" ".join(command[1:]), file=sys.stderr)
    try:
        subprocess.run(command, check=True)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    return path


def predict(args, parameters: dict[str, str], workload: Workload) -> dict | None:
    """The cluster simulator's summary of one setup (None without a cost model): noise
    seed 0's, with the mean and P99 JCT averaged over ``--sim-seeds`` noise seeds."""
    try:
        cost_model = load_profile(str(args.profile.resolve()))
    except (OSError, ValueError) as exc:
        print(f"no prediction: {exc}", file=sys.stderr)
        return None
    return simulate(parameters, cost_model, workload, args.sim_seeds)


def simulate(parameters: dict[str, str], cost_model, workload: Workload,
             seeds: int) -> dict:
    config = ClusterSimConfig.from_parameters(parameters, cost_model, "object_store")
    runs = []
    for seed in range(seeds):
        seeded = replace(config, instance=replace(config.instance, noise_seed=seed))
        result = ClusterSimulator(seeded, cost_model, workload, None).run()
        runs.append({**summarize(result.timelines()), "cluster": result.cluster_summary()})
    return {**runs[0], "seeds": seeds,
            "jct_mean_over_seeds": sum(r["jct_s"]["mean"] for r in runs) / seeds,
            "jct_p99_over_seeds": sum(r["jct_s"]["p99"] for r in runs) / seeds,
            "jct_p99_by_seed": [r["jct_s"]["p99"] for r in runs]}


def seed_range(sim: dict) -> str:
    """The 10th-90th percentile of the simulated P99 JCT over the noise seeds."""
    low, high = np.percentile(sim["jct_p99_by_seed"], [10, 90])
    return f"{low:.2f}-{high:.2f}"


def served_speed(args, parameters: dict[str, str], log: Path) -> float | None:
    """The run's iterations against the profile (measured / modelled loop periods, both
    instances; a diagnosis, never an input to the prediction)."""
    try:
        cost_model = load_profile(str(args.profile.resolve()))
    except (OSError, ValueError):
        return None
    per_instance = [list(read_iteration_log(instance_log_path(log, i)))
                    for i in range(int(parameters["num_instances"]))
                    if Path(instance_log_path(log, i)).exists()]
    records = [r for records in per_instance for r in records]
    shares = [x for row in co_running(per_instance) for x in row]
    block_bytes = SimConfig.from_parameters(parameters, cost_model).block_bytes
    return served_over_modelled(cost_model, records, block_bytes, shares)["total"]


def at_served_speed(args) -> None:
    """Each setup of a saved run simulated at its runs' mean iteration speed (the cost
    model's coefficients times measured / modelled over the noise trace's mean): the error
    left is the simulator's dynamics; the rest of the prediction's was the machine's
    speed moving between the profile and the runs."""
    saved = json.loads(args.at_served_speed.read_text())
    meta = saved["workload"]
    workload = synthetic(meta["name"], meta["num_requests"], meta["meta_rate_rps"],
                         meta["meta_cv"], meta["meta_seed"], meta["meta_length_scale"],
                         meta["meta_max_context_tokens"])
    cost_model = load_profile(str(args.profile.resolve()))
    rows = []
    for name, entries in saved["runs"].items():
        if args.keep_logs is not None:  # the runs' speed against this profile, from logs
            parameters = {**saved["parameters"], **SETUPS[name]}
            for repeat, entry in enumerate(entries):
                log = args.keep_logs / f"{name}-{repeat}-iterations.jsonl"
                entry["served_over_modelled"] = served_speed(args, parameters, log)
        speeds = [e["served_over_modelled"] for e in entries if e.get("served_over_modelled")]
        if not speeds:
            continue
        scaled, factor = at_speed(cost_model, sum(speeds) / len(speeds))
        parameters = {**saved["parameters"], **SETUPS[name]}
        mean_jct = sum(e["summary"]["jct_s"]["mean"] for e in entries) / len(entries)
        p99_jct = sum(e["summary"]["jct_s"]["p99"] for e in entries) / len(entries)
        row = [name, f"{mean_jct:.2f}", f"{p99_jct:.2f}"]
        for model in (cost_model, scaled):
            sim = simulate(parameters, model, workload, args.sim_seeds)
            row += [f"{sim['jct_mean_over_seeds']:.2f}",
                    f"{sim['jct_mean_over_seeds'] / mean_jct - 1:+.1%}",
                    f"{sim['jct_p99_over_seeds']:.2f} ({seed_range(sim)})",
                    f"{sim['jct_p99_over_seeds'] / p99_jct - 1:+.1%}"]
        rows.append([*row[:3], f"{factor:.3f}", *row[3:]])
    print_table(f"{args.at_served_speed.name}: the prediction ({args.sim_seeds} noise seeds) "
                "and, as a diagnosis, the simulation at the runs' speed",
                ["setup", "mean JCT s", "P99 JCT s", "runs' speed x profile",
                 "sim mean JCT s", "error", "sim P99 JCT s (seeds' 10-90%)", "error",
                 "at runs' speed: mean JCT s", "error", "P99 JCT s", "error"], rows,
                "markdown")


def main() -> int:
    args = parse_args()
    if args.at_served_speed is not None:
        at_served_speed(args)
        return 0
    workload = synthetic(args.workload, args.num_requests, args.rate, args.cv, args.seed,
                         args.length_scale, args.max_context)
    prompts = prompts_for(workload)
    base = {**served_parameters(), "scheduler_policy": args.policy, "num_instances": "2",
            "cpus_per_instance": "1",
            "kv_cache_bytes": str(32 * 2**20), "kv_cache_host_memory_bytes": str(128 * 2**20)}
    base.update(dict(p.split("=", 1) for p in args.param))
    started = dt.datetime.now(dt.timezone.utc)
    if args.fit_profile:
        args.profile = fit_profile(base, args.param, args.out)
    predictions = {name: predict(args, {**base, **SETUPS[name]}, workload)
                   for name in args.setups}
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    runs: dict[str, list[dict]] = {name: [] for name in args.setups}
    try:
        for repeat in range(args.repeats):
            for name in args.setups:
                label = f"{name}-{repeat}"
                log = workdir / f"{label}-iterations.jsonl"
                parameters = {**base, **SETUPS[name], "iteration_stats_path": str(log),
                              "ray_temp_dir": tempfile.mkdtemp(prefix="psray", dir="/tmp")}
                with policy_server(parameters, workdir, label, torch_threads=1) as server:
                    _, entry = run_on_server(args, server, workload, prompts, args.policy,
                                             None, label)
                shutil.rmtree(parameters["ray_temp_dir"], ignore_errors=True)
                entry["served_over_modelled"] = served_speed(args, parameters, log)
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for path in workdir.glob(f"{label}-iterations*.jsonl"):
                        shutil.copy(path, args.keep_logs / path.name)
                runs[name].append(entry)
                print(f"{label}: done", file=sys.stderr)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".partial.json").write_text(
                    json.dumps(runs, default=str))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    headers = ["setup", "P99 TTFT s (each run)", "mean TTFT s", "P99 JCT s (each run)",
               "mean JCT s", "migrations committed / aborted", "sim P99 TTFT s",
               "sim P99 JCT s (seeds' 10-90%)", "sim mean JCT s", "sim migrations",
               "mean JCT error", "P99 JCT error", "served iteration time / model"]
    rows = []
    for name, entries in runs.items():
        summaries = [e["summary"] for e in entries]
        done = aborted = 0.0
        for entry in entries:
            for key, value in entry["counters"].items():
                if key.startswith("migrations_total") and "committed" in key:
                    done += value
                elif key.startswith("migrations_total") and "aborted" in key:
                    aborted += value
        sim = predictions.get(name)
        mean_jct = sum(s["jct_s"]["mean"] for s in summaries) / len(summaries)
        p99_jct = sum(s["jct_s"]["p99"] for s in summaries) / len(summaries)
        rows.append([
            name, " / ".join(f"{s['ttft_s']['p99']:.2f}" for s in summaries),
            f"{sum(s['ttft_s']['mean'] for s in summaries) / len(summaries):.2f}",
            " / ".join(f"{s['jct_s']['p99']:.2f}" for s in summaries),
            f"{mean_jct:.2f}",
            f"{done:.0f} / {aborted:.0f}",
            f"{sim['ttft_s']['p99']:.2f}" if sim else "-",
            f"{sim['jct_p99_over_seeds']:.2f} ({seed_range(sim)})" if sim else "-",
            f"{sim['jct_mean_over_seeds']:.2f}" if sim else "-",
            f"{sim['cluster']['migrations']['committed']}" if sim else "-",
            # simulated minus measured (the mean over the repeats), relative to measured
            f"{sim['jct_mean_over_seeds'] / mean_jct - 1:+.1%}" if sim else "-",
            f"{sim['jct_p99_over_seeds'] / p99_jct - 1:+.1%}" if sim else "-",
            " / ".join(f"{e['served_over_modelled']:.3f}" if e.get("served_over_modelled")
                       else "-" for e in entries)])
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print_table(f"2 instances, {args.policy} inside; {args.workload} x{args.num_requests} at "
                f"{args.rate:g}/s, Gamma CV {args.cv:g}, length scale {args.length_scale:g}",
                headers, rows, "markdown")
    result = {"kind": "cluster-serving", "command": command, "date": started.isoformat(),
              "wall_s": time.time() - started.timestamp(), "machine": machine_info(),
              "workload": workload.describe(), "parameters": base, "runs": runs,
              "predictions": predictions, "table": {"headers": headers, "rows": rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
