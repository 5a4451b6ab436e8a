"""Cluster scheduling at Llumnix's scale, in the cluster simulator: 16 instances of the
A100 LLaMA-2-7B profile (``sim/profiles``), fcfs beside every other setup in the same run.

Experiments (``--experiments``, all by default):

* ``dispatch``: round robin vs freeness dispatch (INFaaS++-like) vs Llumnix (freeness
  dispatch + live migration, the shortest running request moves) vs ``llumnix-fcw``
  (the same, the first waiting request moving first), fcfs inside each instance
  (vLLM's), on ShareGPT-like
  lengths with Poisson (CV 1) and Gamma (CV 2, 4, 8) arrivals, at loads 0.5-1.5x of the
  cluster's capacity, in two memory regimes: ``a10`` (7 GiB of KV per instance, what a
  24 GB A10 has left beside LLaMA-7B, Llumnix's setting) and ``a100`` (56 GiB: an 80 GB
  A100's). The compute is the A100 profile's in both.
* ``local``: the global setup (``--global-setup``, below) over ``skip_join_mlfq`` and
  over ``apt`` against the same setup over fcfs (the ``dispatch`` rows), the same cells
  (``a10`` regime).
* ``priority``: 10% of the requests high-priority; the global setup with the
  high-priority headroom (``priority_headroom_blocks`` = all blocks but 100, as
  Llumnix's artifact: an instance holding a high-priority request behaves as if it had
  100 blocks) vs without it ("<setup>-base"), CV 2-8.
* ``scaling``: auto-scaling between 1 and 16 instances (the paper's [10, 60] freeness
  band and two others) vs a fixed 16, the global setup over fcfs, instance-seconds
  (cost) and P99 TTFT.

The global setup of ``local``, ``priority`` and ``scaling`` is what the server ships
(``load+migration``: the dispatch without herding, no moves into queued instances)
unless ``--global-setup llumnix`` asks for Llumnix's own rules.

Capacity (requests/s) is the matrix's definition (``bench/matrix.py``) for one instance
(fcfs, every request arriving at 0, finished requests / makespan) times 16. One seed per
cell: results are single samples, the tables say so.

    cd benchmarks && PYTHONPATH=../backend ../.venv/bin/python bench_cluster_policies.py \\
        --jobs 2 --out results/cluster-policies-2026-11-30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_common import machine_info, print_table

from preemptserve.bench.metrics import SLO, RequestTimeline, summarize
from preemptserve.bench.server import served_parameters
from preemptserve.bench.workload import Workload, synthetic
from preemptserve.sim.cluster import ClusterSimConfig, ClusterSimulator
from preemptserve.sim.cost_model import load_profile
from preemptserve.sim.simulator import SimConfig, Simulator

GIB = 2**30
PROFILE = "llama2-7b-a100"
INSTANCES = 16
# vLLM's max_num_seqs (Llumnix serves with vLLM); prompts chunked at 4096 tokens.
ENGINE = {"max_batch_size": "256", "max_num_tokens": "4096", "kv_block_size": "16"}
REGIMES = {
    "a10": {"kv_cache_bytes": str(7 * GIB), "kv_cache_host_memory_bytes": str(28 * GIB)},
    "a100": {"kv_cache_bytes": str(56 * GIB), "kv_cache_host_memory_bytes": str(64 * GIB)},
}
SETUPS: dict[str, dict[str, str]] = {
    "round_robin": {"dispatch_policy": "round_robin", "enable_migration": "false"},
    # The paper's setups: Llumnix's dispatch freeness, in overload too.
    "infaas++": {"dispatch_policy": "load_llumnix", "enable_migration": "false"},
    "llumnix": {"dispatch_policy": "load_llumnix", "enable_migration": "true",
                "migrate_into_waiting": "true"},
    # Beyond the paper's setups: the first waiting request moves first (no cache to copy),
    # else the shortest running one.
    "llumnix-fcw": {"dispatch_policy": "load_llumnix", "enable_migration": "true",
                    "migrate_into_waiting": "true", "migration_request_policy": "FCWSR"},
    # What the server ships: the freeness while an instance's queue fits in its free
    # blocks, the block deficit past that (core/global_scheduler.py); moves only into
    # instances with no waiting request.
    "load": {"dispatch_policy": "load", "enable_migration": "false"},
    "load+migration": {"dispatch_policy": "load", "enable_migration": "true"},
    # The shipped dispatch with Llumnix's pairing (moves into queued instances too).
    "load+migration-into-waiting": {"dispatch_policy": "load", "enable_migration": "true",
                                    "migrate_into_waiting": "true"},
}
SCALING_BANDS = ((10.0, 60.0), (5.0, 30.0), (20.0, 120.0))  # (up below, down above)
PRIORITY_KEEP_BLOCKS = 100  # Llumnix's artifact: the instance behaves as if it had 100
SLO_DEFAULT = SLO(2.0, 0.2)


@dataclass(frozen=True)
class Task:
    experiment: str
    regime: str
    cv: float
    load: float
    rate_rps: float
    setup: str  # a SETUPS key, or "<setup>-base" / "scaling[up,down]" / "fixed"
    policy: str  # the local policy
    params: tuple[tuple[str, str], ...]
    num_requests: int
    seed: int
    high_share: float = 0.0
    startup_s: float = 20.0

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.experiment, self.regime, self.cv, self.load, self.setup, self.policy)


def make_workload(task: Task) -> Workload:
    w = synthetic("sharegpt", task.num_requests, task.rate_rps, task.cv, task.seed, 1.0, 4096)
    return w.with_priorities(task.high_share, task.seed) if task.high_share else w


def _metrics(timelines: Sequence[RequestTimeline], slo: SLO) -> dict[str, Any]:
    s = summarize(timelines, slo)
    return {"mean_jct_s": s["jct_s"]["mean"], "p99_jct_s": s["jct_s"]["p99"],
            "mean_ttft_s": s["ttft_s"]["mean"], "p99_ttft_s": s["ttft_s"]["p99"],
            "mean_tbt_s": s["tbt_s"]["mean"], "p99_tbt_s": s["tbt_s"]["p99"],
            "attainment": s["slo"]["attainment"], "num_requests": s["num_requests"]}


def run_task(task: Task) -> dict[str, Any]:
    started = time.perf_counter()
    cost = load_profile(PROFILE)
    params = {**served_parameters(), **dict(task.params), "scheduler_policy": task.policy}
    config = ClusterSimConfig.from_parameters(params, cost, startup_s=task.startup_s)
    workload = make_workload(task)
    result = ClusterSimulator(config, cost, workload, SLO_DEFAULT).run()
    timelines = result.timelines()
    out: dict[str, Any] = {"task": asdict(task), "metrics": _metrics(timelines, SLO_DEFAULT),
                           "cluster": result.cluster_summary(),
                           "counters": result.counters(), "wall_s": 0.0}
    if task.high_share:
        priority = {str(r.index): r.priority for r in workload.requests}
        for level in ("high", "normal"):
            chosen = [t for t in timelines if priority[t.request_id] == level]
            out[f"metrics_{level}"] = _metrics(chosen, SLO_DEFAULT) if chosen else None
    out["wall_s"] = time.perf_counter() - started
    return out


def herding(capacity: float, loads: Sequence[float], num_requests: int, seed: int) -> None:
    """Freeness dispatch between two load reports (a10, CV 1), Llumnix's rule
    (``infaas++``) and the shipped one (``load``): how often every request dispatched in
    one 50 ms tick went to one instance, and how many requests went to an instance whose
    dispatch freeness was negative."""
    for load, setup in ((x, s) for x in loads for s in ("infaas++", "load")):
        seen = _dispatches(Task("herding", "a10", 1.0, load, load * capacity, setup,
                                "fcfs", cluster_params("a10", SETUPS[setup]),
                                num_requests, seed))
        ticks: dict[int, list[int]] = {}
        for tick, instance, _ in seen:
            ticks.setdefault(tick, []).append(instance)
        several = [v for v in ticks.values() if len(v) > 1]
        one = sum(len(set(v)) == 1 for v in several)
        negative = sum(n for _, _, n in seen)
        print(f"{setup}, load {load:g}: {one} of {len(several)} ticks with several dispatches sent "
              f"them all to one instance ({one / max(1, len(several)):.0%}); {negative} of "
              f"{len(seen)} requests went to an instance with negative freeness")


def _dispatches(task: Task) -> list[tuple[int, int, bool]]:
    """(tick, instance, its dispatch freeness was negative) of every dispatch."""
    cost = load_profile(PROFILE)
    params = {**served_parameters(), **dict(task.params), "scheduler_policy": task.policy}
    sim = ClusterSimulator(ClusterSimConfig.from_parameters(params, cost), cost,
                           make_workload(task), SLO_DEFAULT)
    choose, seen = sim.dispatcher.choose, []

    def recording(*args: Any, **kwargs: Any) -> int:
        instance = choose(*args, **kwargs)
        report = sim.dispatcher.load(instance)
        seen.append((int(sim.now_s / 0.05), instance,
                     report is not None and report.dispatch_freeness < 0))
        return instance

    sim.dispatcher.choose = recording  # type: ignore[method-assign]
    sim.run()
    return seen


def capacity_rps(regime: str, num_requests: int, seed: int) -> float:
    """One instance's fcfs capacity (every request at 0), times the instances."""
    cost = load_profile(PROFILE)
    params = {**served_parameters(), **ENGINE, **REGIMES[regime], "scheduler_policy": "fcfs"}
    config = SimConfig.from_parameters(params, cost)
    w = synthetic("sharegpt", num_requests, 1.0, 1.0, seed, 1.0, 4096).scaled(time_scale=0.0)
    result = Simulator(config, cost, w).run()
    makespan = max(result.finish_s.values())
    return len(result.finish_s) / makespan * INSTANCES


def cluster_params(regime: str, setup: Mapping[str, str], **extra: str) -> tuple:
    return tuple({**ENGINE, **REGIMES[regime], "num_instances": str(INSTANCES),
                  **setup, **extra}.items())


def build_tasks(args: argparse.Namespace, capacity: Mapping[str, float]) -> list[Task]:
    tasks: list[Task] = []
    n, seed = args.num_requests, args.seed

    def add(experiment: str, regime: str, cv: float, load: float, setup: str, policy: str,
            params: tuple, **kw: Any) -> None:
        tasks.append(Task(experiment, regime, cv, load, load * capacity[regime], setup,
                          policy, params, n, seed, **kw))

    g = args.global_setup
    if "dispatch" in args.experiments or "local" in args.experiments:
        for regime in args.regimes:
            for cv in (args.cvs if regime == "a10" else args.a100_cvs):
                for load in (args.loads if regime == "a10" else args.a100_loads):
                    setups = list(args.setups)
                    if "local" in args.experiments and regime == "a10" and g not in setups:
                        setups.append(g)  # the local table's fcfs reference
                    for name in setups:
                        add("dispatch", regime, cv, load, name, "fcfs",
                            cluster_params(regime, SETUPS[name]))
    if "local" in args.experiments:
        for cv in args.cvs:
            for load in args.loads:
                for policy in ("skip_join_mlfq", "apt"):
                    add("local", "a10", cv, load, g, policy, cluster_params("a10", SETUPS[g]))
    if "priority" in args.experiments:
        num_blocks = int(REGIMES["a10"]["kv_cache_bytes"]) // block_bytes()
        variants = [(g if keep == PRIORITY_KEEP_BLOCKS else f"{g}-keep{keep}",
                     str(num_blocks - keep)) for keep in args.priority_keep_blocks]
        for cv in (2.0, 4.0, 8.0):
            for load in args.priority_loads:
                for name, blocks in (*variants, (f"{g}-base", "0")):
                    add("priority", "a10", cv, load, name, "fcfs",
                        cluster_params("a10", SETUPS[g], priority_headroom_blocks=blocks),
                        high_share=0.1)
    if "scaling" in args.experiments:
        for cv in (1.0, 4.0):
            for load in args.scaling_loads:
                add("scaling", "a10", cv, load, "fixed", "fcfs", cluster_params("a10", SETUPS[g]))
                for up, down in SCALING_BANDS:
                    add("scaling", "a10", cv, load, f"scaling[{up:g},{down:g}]", "fcfs",
                        cluster_params("a10", SETUPS[g], enable_scaling="true",
                                       min_instances="1", max_instances=str(INSTANCES),
                                       scale_up_threshold=str(up),
                                       scale_down_threshold=str(down)),
                        startup_s=args.startup_s)
    return tasks


def block_bytes() -> int:
    cost = load_profile(PROFILE)
    params = {**served_parameters(), **ENGINE, **REGIMES["a10"]}
    return SimConfig.from_parameters(params, cost).block_bytes


def run_all(tasks: Sequence[Task], jobs: int) -> list[dict[str, Any]]:
    order = sorted(tasks, key=lambda t: -t.load)  # the slowest first
    results: dict[tuple, dict[str, Any]] = {}
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_task, order, chunksize=1), 1):
            t = Task(**{k: (tuple(tuple(p) for p in v) if k == "params" else v)
                        for k, v in r["task"].items()})
            results[t.key] = r
            print(f"[{i}/{len(order)}] {t.experiment} {t.regime} cv{t.cv:g} x{t.load:g} "
                  f"{t.setup}/{t.policy}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return [results[t.key] for t in tasks]


# -- tables -------------------------------------------------------------------------------


def _f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _by(results: Iterable[dict[str, Any]], experiment: str) -> dict[tuple, dict[str, Any]]:
    return {(r["task"]["regime"], r["task"]["cv"], r["task"]["load"], r["task"]["setup"],
             r["task"]["policy"]): r for r in results if r["task"]["experiment"] == experiment}


def dispatch_tables(results: Sequence[dict[str, Any]], fmt: str) -> None:
    cells = _by(results, "dispatch")
    for regime in sorted({k[0] for k in cells}):
        rows = []
        for (reg, cv, load, setup, _), r in sorted(cells.items()):
            if reg != regime:
                continue
            m, c = r["metrics"], r["cluster"]
            # (the references, when the run has them)
            rr = cells.get((reg, cv, load, "round_robin", "fcfs"), {}).get("metrics", {})
            inf = cells.get((reg, cv, load, "infaas++", "fcfs"), {}).get("metrics", {})
            loss = c["preemption_loss"]["preempted_s_per_request"]
            rows.append([
                f"cv {cv:g} x{load:g}", setup, _f(m["p99_ttft_s"]), _f(m["mean_jct_s"]),
                _f(m["p99_jct_s"]), _f(m["p99_tbt_s"], 1e3, 0), _f(loss, 1, 3),
                str(c["migrations"]["committed"]),
                _ratio(rr.get("p99_ttft_s"), m["p99_ttft_s"]),
                _ratio(inf.get("p99_ttft_s"), m["p99_ttft_s"]),
                _ratio(rr.get("mean_jct_s"), m["mean_jct_s"]),
                _ratio(rr.get("p99_jct_s"), m["p99_jct_s"])])
        print_table(f"dispatch, regime {regime} ({INSTANCES} instances, fcfs local)",
                    ["cell", "setup", "P99 TTFT s", "mean JCT s", "P99 JCT s", "P99 TBT ms",
                     "preempted s/req", "moves", "TTFT RR/x", "TTFT INFaaS++/x",
                     "mean JCT RR/x", "P99 JCT RR/x"], rows, fmt)


def local_tables(results: Sequence[dict[str, Any]], fmt: str, global_setup: str) -> None:
    base = _by(results, "dispatch")
    cells = _by(results, "local")
    rows = []
    for (reg, cv, load, setup, policy), r in sorted(cells.items()):
        f = base.get((reg, cv, load, setup, "fcfs"))
        if f is None:
            continue
        m, fm = r["metrics"], f["metrics"]
        rows.append([f"cv {cv:g} x{load:g}", policy, _f(m["p99_ttft_s"]), _f(fm["p99_ttft_s"]),
                     _f(m["mean_jct_s"]), _f(fm["mean_jct_s"]), _f(m["p99_jct_s"]),
                     _f(fm["p99_jct_s"]), _f(m["attainment"], 100, 1),
                     _f(fm["attainment"], 100, 1),
                     _ratio(fm["mean_jct_s"], m["mean_jct_s"])])
    print_table(f"local policies under {global_setup} (a10 regime): policy vs fcfs",
                ["cell", "policy", "P99 TTFT s", "fcfs", "mean JCT s", "fcfs", "P99 JCT s",
                 "fcfs", "SLO %", "fcfs", "mean JCT fcfs/x"], rows, fmt)


def priority_tables(results: Sequence[dict[str, Any]], fmt: str, global_setup: str) -> None:
    cells = _by(results, "priority")
    rows = []
    for (reg, cv, load, setup, policy), r in sorted(cells.items()):
        if setup.endswith("-base"):
            continue
        b = next(cells[k] for k in cells if k[:3] == (reg, cv, load) and k[4] == policy
                 and k[3].endswith("-base"))
        for level in ("high", "normal"):
            m, bm = r[f"metrics_{level}"], b[f"metrics_{level}"]
            rows.append([f"cv {cv:g} x{load:g}", f"{setup}: {level}",
                         _f(m["mean_jct_s"]), _f(bm["mean_jct_s"]),
                         _ratio(bm["mean_jct_s"], m["mean_jct_s"]),
                         _f(m["mean_ttft_s"]), _f(bm["mean_ttft_s"]),
                         _ratio(bm["mean_ttft_s"], m["mean_ttft_s"]),
                         _ratio(bm["p99_ttft_s"], m["p99_ttft_s"]),
                         _f(m["mean_tbt_s"], 1e3, 1), _f(bm["mean_tbt_s"], 1e3, 1),
                         _ratio(bm["mean_tbt_s"], m["mean_tbt_s"])])
    g = global_setup
    print_table(f"priorities, 10% high (a10 regime): {g} with headroom ({g}: all "
                f"blocks but 100; {g}-keepK: all but K) vs without (base)",
                ["cell", "requests", "mean JCT s", "base", "base/x", "mean TTFT s", "base",
                 "base/x", "P99 TTFT base/x", "mean TBT ms", "base", "base/x"], rows, fmt)


def scaling_tables(results: Sequence[dict[str, Any]], fmt: str, global_setup: str) -> None:
    cells = _by(results, "scaling")
    rows = []
    for (reg, cv, load, setup, policy), r in sorted(cells.items()):
        fixed = cells[(reg, cv, load, "fixed", policy)]
        m, c = r["metrics"], r["cluster"]
        s = c["scaling"] or {}
        rows.append([f"cv {cv:g} x{load:g}", setup, _f(c["instance_seconds"], 1, 0),
                     _f(1 - c["instance_seconds"] / fixed["cluster"]["instance_seconds"],
                        100, 1),
                     _f(s.get("mean_on"), 1, 1), f"{s.get('min_on', '-')}-{s.get('max_on', '-')}",
                     _f(m["p99_ttft_s"]), _f(fixed["metrics"]["p99_ttft_s"]),
                     _f(m["mean_jct_s"]), _f(fixed["metrics"]["mean_jct_s"])])
    print_table(f"auto-scaling 1-16 vs fixed 16 (a10 regime, {global_setup} over fcfs)",
                ["cell", "setup", "instance-s", "saving %", "mean on", "range",
                 "P99 TTFT s", "fixed", "mean JCT s", "fixed"], rows, fmt)


def report(result: Mapping[str, Any], fmt: str) -> None:
    runs = result["runs"]
    setup = result.get("global_setup", "llumnix")  # (runs saved before the option)
    experiments = {r["task"]["experiment"] for r in runs}
    if "dispatch" in experiments:
        dispatch_tables(runs, fmt)
    if "local" in experiments:
        local_tables(runs, fmt, setup)
    if "priority" in experiments:
        priority_tables(runs, fmt, setup)
    if "scaling" in experiments:
        scaling_tables(runs, fmt, setup)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+",
                        default=["dispatch", "local", "priority", "scaling"],
                        choices=["dispatch", "local", "priority", "scaling"])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--cvs", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--a100-cvs", type=float, nargs="+", default=[1.0, 4.0],
                        help="arrival CVs of the a100 regime's dispatch cells")
    parser.add_argument("--a100-loads", type=float, nargs="+", default=None,
                        help="loads of the a100 regime's dispatch cells (default --loads)")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2, 1.5])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS),
                        help="the dispatch experiment's setups (round_robin and infaas++ "
                        "are the tables' references: keep them)")
    parser.add_argument("--global-setup", default="load+migration",
                        choices=[s for s in SETUPS if SETUPS[s]["enable_migration"] == "true"],
                        help="the setup the local, priority and scaling experiments run "
                        "(default: what the server ships; llumnix: Llumnix's own rules)")
    parser.add_argument("--priority-loads", type=float, nargs="+", default=[0.8, 1.0])
    parser.add_argument("--priority-keep-blocks", type=int, nargs="+",
                        default=[PRIORITY_KEEP_BLOCKS],
                        help="the headroom leaves an instance holding a high-priority "
                        "request this many blocks for normal ones (Llumnix's artifact: 100); "
                        "several values: one headroom setup each, beside one base")
    parser.add_argument("--scaling-loads", type=float, nargs="+", default=[0.3, 0.6])
    parser.add_argument("--startup-s", type=float, default=20.0,
                        help="an added instance's start-up (model load) time")
    parser.add_argument("--num-requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--format", choices=["plain", "markdown", "rich"], default="plain")
    parser.add_argument("--out", type=Path, default=None, help="PATH (writes PATH.json)")
    parser.add_argument("--herding", type=float, nargs="+", default=None, metavar="LOAD",
                        help="only the herding diagnostic of freeness dispatch at these loads")
    parser.add_argument("--report", type=Path, default=None,
                        help="print the tables of a saved PATH.json and exit")
    args = parser.parse_args()
    args.a100_loads = args.a100_loads or args.loads
    return args


def main() -> int:
    args = parse_args()
    if args.report is not None:
        report(json.loads(args.report.read_text()), args.format)
        return 0
    if args.herding:
        herding(capacity_rps("a10", 1000, args.seed), args.herding, args.num_requests,
                args.seed)
        return 0
    started = time.perf_counter()
    regimes = set(args.regimes) | ({"a10"} if set(args.experiments) - {"dispatch"} else set())
    capacity = {r: capacity_rps(r, 1000, args.seed) for r in sorted(regimes)}
    print("capacity (requests/s, 16 instances):",
          {k: round(v, 2) for k, v in capacity.items()}, file=sys.stderr)
    tasks = build_tasks(args, capacity)
    runs = run_all(tasks, args.jobs)
    result = {
        "benchmark": "cluster-policies",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "profile": PROFILE, "instances": INSTANCES, "engine": ENGINE, "regimes": REGIMES,
        "global_setup": args.global_setup, "capacity_rps": capacity,
        "slo": {"ttft_s": SLO_DEFAULT.ttft_s, "tbt_s": SLO_DEFAULT.tbt_s},
        "wall_s": time.perf_counter() - started,
        "runs": runs,
    }
    if args.out is not None:  # before the tables: a run's results outlive a table's bug
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path = args.out.with_suffix(".json")
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {path}", file=sys.stderr)
    report(result, args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
