"""Benchmark harness and simulator: workloads, server comparisons, simulation, profiling.

Commands (``--help`` on each for its options):

* ``generate``: write a workload as a trace CSV.
* ``serve-compare``: run one workload open loop through a real ``tritonserver`` per
  policy (restarted with each), one report.
* ``simulate``: the same workload through the simulator, per policy, with a saved cost
  model (``--profile``).
* ``simulate-cluster``: the same through the cluster simulator: many instances of each
  policy behind one frontend (dispatch, live migration; ``sim/cluster.py``).
* ``profile``: measure this machine's engine (and, with ``--server``, the serving
  overheads through Triton) and save the fitted cost model.
* ``fidelity``: the same workload on the server and in the simulator, per policy; the
  errors of the simulator's mean and P99 JCT.
* ``sweep``: a range of arrival rates (simulator or server), SLO attainment per rate and
  the effective throughput.
* ``matrix``: every policy in the simulator over workloads x loads (multiples of fcfs's
  measured capacity) x memory regimes; ratios to fcfs and the targets they miss.

Every command writes ``<out>.json``, ``<out>.md`` and PNG plots next to them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.global_scheduler import DISPATCH_POLICIES
from ..core.scheduler import available_policies
from ..sim.cluster_moves import MIGRATION_COST_NAMES
from . import commands, fidelity, matrix, profile_commands
from .commands import build_workload
from .workload import PRESETS

REPO_ROOT = Path(__file__).resolve().parents[3]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=sorted(PRESETS),
        default="sharegpt",
        help="synthetic length statistics (default: sharegpt)",
    )
    g.add_argument(
        "--trace",
        type=Path,
        help="replay a CSV trace instead (arrival_time_s,input_tokens,output_tokens)",
    )
    g.add_argument("--num-requests", type=int, default=100)
    g.add_argument("--rate", type=float, default=1.0, help="requests/s (synthetic)")
    g.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="coefficient of variation of the gaps: 1 Poisson, >1 burstier",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--length-scale", type=float, default=1.0)
    g.add_argument("--time-scale", type=float, default=1.0, help="trace only")
    g.add_argument(
        "--max-context", type=int, default=None, help="clip input + output to this many tokens"
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine and server")
    g.add_argument(
        "--policies",
        nargs="+",
        default=None,
        help=f"default: every registered policy ({', '.join(available_policies())})",
    )
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config.pbtxt parameter, for every policy",
    )
    g.add_argument(
        "--policy-param",
        action="append",
        default=[],
        metavar="POLICY:KEY=VALUE",
        help="a config.pbtxt parameter for one policy only",
    )
    g.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="torch threads in the server (0: torch's default)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds after the last arrival before a run counts as stuck",
    )


def add_report_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    g = parser.add_argument_group("SLO and output")
    g.add_argument("--slo-ttft-s", type=float, default=None)
    g.add_argument(
        "--slo-tbt-s",
        type=float,
        default=None,
        help="with --slo-ttft-s: a request meets the SLO if TTFT < it and its "
        "own P99 time between tokens < this; both are also sent with each request",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / default_name,
        help="output path without extension (.json, .md, .png are added)",
    )
    g.add_argument("--no-progress", action="store_true")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preemptserve.bench", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a workload as a trace CSV")
    add_workload_arguments(gen)
    gen.add_argument("out", type=Path)

    serve = sub.add_parser("serve-compare", help="policies through the real server")
    add_workload_arguments(serve)
    add_server_arguments(serve)
    add_report_arguments(serve, "serve-compare")

    sim = sub.add_parser("simulate", help="policies in the simulator")
    add_workload_arguments(sim)
    add_server_arguments(sim)
    add_report_arguments(sim, "simulate")
    sim.add_argument(
        "--profile", required=True, help="a cost model JSON, or the name of one in sim/profiles/"
    )
    sim.add_argument(
        "--check-invariants",
        action="store_true",
        help="check the block manager after every scheduler call (slow)",
    )

    csim = sub.add_parser("simulate-cluster",
                          help="policies in the cluster simulator (many instances)")
    add_workload_arguments(csim)
    add_server_arguments(csim)
    add_report_arguments(csim, "simulate-cluster")
    csim.add_argument(
        "--profile", required=True, help="a cost model JSON, or the name of one in sim/profiles/"
    )
    g = csim.add_argument_group("cluster (config.pbtxt's cluster parameters where not given)")
    g.add_argument("--instances", type=int, default=16, help="engine instances (default 16)")
    g.add_argument("--dispatch", choices=list(DISPATCH_POLICIES), default=None,
                   help="dispatch policy (default: dispatch_policy, load)")
    g.add_argument("--migration", action=argparse.BooleanOptionalAction, default=None,
                   help="live migration between instances (default: enable_migration, on)")
    g.add_argument("--migrate-out-threshold", type=float, default=None,
                   help="a source has fewer free decode steps per request than this "
                   "(default: migrate_out_threshold, 3)")
    g.add_argument("--migration-cost", choices=list(MIGRATION_COST_NAMES), default="auto",
                   help="stage time model: fitted object_store or gloo, or gpu (assumed); "
                   "auto: gpu for a GPU profile, else migration_transport")
    g.add_argument("--migration-fixed-s", type=float, default=None,
                   help="override the stage cost's fixed seconds")
    g.add_argument("--migration-bytes-per-s", type=float, default=None,
                   help="override the stage cost's bandwidth")
    csim.add_argument(
        "--check-invariants",
        action="store_true",
        help="check every block manager after every event (slow)",
    )

    prof = sub.add_parser("profile", help="fit this machine's cost model")
    add_server_arguments(prof)
    prof.add_argument(
        "--server",
        action="store_true",
        help="also calibrate the serving overheads through tritonserver",
    )
    prof.add_argument("--out", type=Path, default=RESULTS_DIR / "profile-cpu.json")

    refit = sub.add_parser("refit", help="a served profile fitted again to its saved "
                           "iteration logs (no server)")
    refit.add_argument("profile", type=Path, help="the profile (bench profile --server)")
    refit.add_argument("--logs", type=Path, nargs="+", required=True,
                       help="its iteration logs, one per instance, in instance order")
    refit.add_argument("--param", action="append", default=[],
                       help="KEY=VALUE the profile's server parameters (kv_block_size)")
    refit.add_argument("--out", type=Path, required=True)

    fid = sub.add_parser("fidelity", help="simulator against the server, per policy")
    add_workload_arguments(fid)
    add_server_arguments(fid)
    add_report_arguments(fid, "fidelity")
    fid.add_argument("--profile", required=True)
    fid.add_argument("--repeats", type=int, default=1,
                     help="server runs per policy, going round the policies (averaged)")
    fid.add_argument("--sim-seeds", type=int, default=5,
                     help="simulations per policy, one per noise seed (averaged)")

    sweep = sub.add_parser("sweep", help="SLO attainment against the arrival rate")
    add_workload_arguments(sweep)
    add_server_arguments(sweep)
    add_report_arguments(sweep, "sweep")
    sweep.add_argument("--rates", type=float, nargs="+", required=True)
    sweep.add_argument("--backend", choices=["sim", "server"], default="sim")
    sweep.add_argument("--profile", help="cost model (--backend sim)")
    sweep.add_argument("--attainment-target", type=float, default=0.9)

    mat = sub.add_parser("matrix", help="every policy over workloads x loads x memory regimes")
    g = mat.add_argument_group("grid")
    g.add_argument("--profile", nargs="+", default=[matrix.REFERENCE_PROFILE],
                   help="cost models (JSON paths or names in sim/profiles/)")
    g.add_argument("--workloads", nargs="+", choices=list(matrix.WORKLOADS),
                   default=list(matrix.WORKLOADS))
    g.add_argument("--loads", type=float, nargs="+", default=list(matrix.DEFAULT_LOADS),
                   help="arrival rates as multiples of fcfs's measured capacity")
    g.add_argument("--regimes", nargs="+", default=list(matrix.DEFAULT_REGIMES),
                   help="memory regimes (device and host KV) of each profile's table")
    g.add_argument("--regime-param", action="append", default=[],
                   metavar="REGIME:KEY=VALUE",
                   help="a config.pbtxt parameter for one regime (a new name adds a regime)")
    g.add_argument("--num-requests", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-context", type=int, default=4096,
                   help="clip input + output to this many tokens")
    g = mat.add_argument_group("engine and run")
    g.add_argument("--policies", nargs="+", default=None,
                   help=f"default: every registered policy ({', '.join(available_policies())})"
                   "; fcfs is always run (the baseline)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a config.pbtxt parameter for every cell (after the workload's "
                   "engine settings and the regime's memory)")
    g.add_argument("--policy-param", action="append", default=[], metavar="POLICY:KEY=VALUE")
    g.add_argument("--jobs", type=int, default=matrix.default_jobs(),
                   help="simulations in parallel (default: the usable CPUs)")
    g.add_argument("--slo-ttft-s", type=float, default=2.0)
    g.add_argument("--slo-tbt-s", type=float, default=0.2)
    g.add_argument("--out", type=Path, default=RESULTS_DIR / "matrix",
                   help="output path without extension (.json, .md, .png are added)")
    g.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    args = parser().parse_args(argv)
    if getattr(args, "policies", None) is None and hasattr(args, "policies"):
        args.policies = available_policies()
    if args.command == "generate":
        workload = build_workload(args)
        workload.to_csv(args.out)
        print(f"{len(workload)} requests written to {args.out}")
        return 0
    handler = {
        "serve-compare": commands.serve_compare,
        "simulate": commands.simulate,
        "simulate-cluster": commands.simulate_cluster,
        "profile": profile_commands.profile,
        "refit": profile_commands.refit,
        "fidelity": fidelity.fidelity,
        "sweep": commands.sweep,
        "matrix": matrix.matrix,
    }[args.command]
    return handler(args)
