"""The commands behind ``python -m preemptserve.bench`` (argument parsing is in ``cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..sim.cluster import ClusterSimConfig, ClusterSimulator
from ..sim.cost_model import IterationCostModel, load_profile
from ..sim.simulator import SimConfig, Simulator
from .metrics import SLO, RequestTimeline, effective_throughput, summarize
from .report import finish_result, markdown, new_result, plot_cdfs, plot_sweep, save_json
from .server import counter_deltas, policy_server, scrape_metrics, served_parameters, wait_idle
from .workload import Workload, load_trace, synthetic

logger = logging.getLogger(__name__)


def build_workload(args: argparse.Namespace) -> Workload:
    if args.trace is not None:
        return load_trace(args.trace, args.time_scale, args.length_scale, args.max_context)
    return synthetic(
        args.workload,
        args.num_requests,
        args.rate,
        args.cv,
        args.seed,
        args.length_scale,
        args.max_context,
    )


def slo_of(args: argparse.Namespace) -> SLO | None:
    if (args.slo_ttft_s is None) != (args.slo_tbt_s is None):
        raise SystemExit("give both --slo-ttft-s and --slo-tbt-s, or neither")
    return None if args.slo_ttft_s is None else SLO(args.slo_ttft_s, args.slo_tbt_s)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def parameters_for(args: argparse.Namespace, policy: str) -> dict[str, str]:
    """config.pbtxt's parameters, then ``--param``, then this policy's ``--policy-param``."""
    params = {**served_parameters(), **_pairs(args.param, "--param")}
    mine = [p.split(":", 1)[1] for p in args.policy_param if p.split(":", 1)[0] == policy]
    params.update(_pairs(mine, "--policy-param"))
    params["scheduler_policy"] = policy
    return params


def _request_parameters(slo: SLO | None) -> dict[str, float] | None:
    if slo is None:
        return None
    return {"ttft_slo_ms": slo.ttft_s * 1e3, "tbt_slo_ms": slo.tbt_s * 1e3}


def _prompts(workload: Workload) -> list[str]:
    from .prompts import PromptBuilder

    return PromptBuilder().prompts(
        [r.input_tokens for r in workload.requests], seed=int(workload.meta.get("seed", 0))
    )


def _progress(total: int, label: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=disable, leave=False)


# -- one run --------------------------------------------------------------------------------


def run_on_server(
    args: argparse.Namespace,
    server: Any,
    workload: Workload,
    prompts: list[str],
    policy: str,
    slo: SLO | None,
    label: str,
) -> tuple[list[RequestTimeline], dict[str, Any]]:
    from .loadgen import run_open_loop

    before = scrape_metrics(server.metrics_url)
    timelines, facts = run_open_loop(
        server.grpc_url,
        workload,
        prompts,
        label=label,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        request_parameters=_request_parameters(slo),
    )
    if not wait_idle(server.metrics_url, 30):
        raise RuntimeError("requests still in flight after the run")
    counters = {
        k.removeprefix("preemptserve_"): v
        for k, v in counter_deltas(before, scrape_metrics(server.metrics_url)).items()
        if v
    }
    return timelines, {
        "policy": policy,
        "backend": "server",
        "summary": summarize(timelines, slo),
        "counters": {**facts, **counters},
    }


def run_in_sim(
    args: argparse.Namespace,
    workload: Workload,
    policy: str,
    cost_model: IterationCostModel,
    slo: SLO | None,
    label: str,
    noise_seed: int = 0,
) -> tuple[list[RequestTimeline], dict[str, Any]]:
    config = SimConfig.from_parameters(
        parameters_for(args, policy), cost_model, getattr(args, "check_invariants", False)
    )
    config = dataclasses.replace(config, noise_seed=noise_seed)
    bar = _progress(len(workload), label, getattr(args, "no_progress", False))
    result = Simulator(config, cost_model, workload, slo).run(on_finish=bar.update)
    bar.close()
    timelines = result.timelines()
    logger.info("%s: %d requests simulated in %.2f s", label, len(timelines), result.wall_s)
    return timelines, {
        "policy": policy,
        "backend": "sim",
        "summary": summarize(timelines, slo),
        "counters": result.counters(),
    }


def cluster_parameters_for(args: argparse.Namespace, policy: str) -> dict[str, str]:
    """``parameters_for``, then the cluster flags of ``simulate-cluster`` where given."""
    params = parameters_for(args, policy)
    params["num_instances"] = str(args.instances)
    if args.dispatch is not None:
        params["dispatch_policy"] = args.dispatch
    if args.migration is not None:
        params["enable_migration"] = "true" if args.migration else "false"
    if args.migrate_out_threshold is not None:
        params["migrate_out_threshold"] = str(args.migrate_out_threshold)
    return params


def run_in_cluster_sim(
    args: argparse.Namespace,
    workload: Workload,
    policy: str,
    cost_model: IterationCostModel,
    slo: SLO | None,
    label: str,
    noise_seed: int = 0,
) -> tuple[list[RequestTimeline], dict[str, Any]]:
    """One run of the cluster simulator (``sim/cluster.py``) with ``policy`` on every
    instance; the entry has the cluster's own metrics under ``cluster``."""
    config = ClusterSimConfig.from_parameters(
        cluster_parameters_for(args, policy), cost_model,
        getattr(args, "migration_cost", "auto"), getattr(args, "check_invariants", False))
    stage_cost = config.migration_cost
    if getattr(args, "migration_fixed_s", None) is not None:
        stage_cost = dataclasses.replace(stage_cost, fixed_s=args.migration_fixed_s,
                                         source="--migration-fixed-s")
    if getattr(args, "migration_bytes_per_s", None) is not None:
        stage_cost = dataclasses.replace(stage_cost, bytes_per_s=args.migration_bytes_per_s,
                                         source="--migration-bytes-per-s")
    config = dataclasses.replace(
        config, migration_cost=stage_cost,
        instance=dataclasses.replace(config.instance, noise_seed=noise_seed))
    bar = _progress(len(workload), label, getattr(args, "no_progress", False))
    result = ClusterSimulator(config, cost_model, workload, slo).run(on_finish=bar.update)
    bar.close()
    timelines = result.timelines()
    logger.info("%s: %d requests on %d instances simulated in %.2f s", label, len(timelines),
                result.num_instances, result.wall_s)
    return timelines, {
        "policy": policy,
        "backend": "sim-cluster",
        "summary": summarize(timelines, slo),
        "counters": result.counters(),
        "cluster": result.cluster_summary(),
    }


def _with_servers(
    args: argparse.Namespace, body: Callable[[str, Any], None], errors: dict[str, str] | None = None
) -> None:
    """``body(policy, server)`` for each policy, with a fresh server each (warmed up).

    A server that fails to start is recorded in ``errors`` (when given) and skipped.
    """
    from ..triton_server import TritonServerError
    from .loadgen import run_open_loop
    from .workload import RequestSpec

    workdir = Path(tempfile.mkdtemp(prefix="preemptserve-bench-"))
    warm = Workload("warm-up", tuple(RequestSpec(i, 0.0, 16, 8) for i in range(4)))
    try:
        for policy in args.policies:
            try:
                with policy_server(
                    parameters_for(args, policy), workdir, policy, args.server_threads
                ) as server:
                    run_open_loop(server.grpc_url, warm, _prompts(warm), progress=False)
                    body(policy, server)
            except TritonServerError as exc:
                if errors is None:
                    raise
                logger.error("%s: the server did not start: %s", policy, exc)
                errors[policy] = (
                    str(exc).splitlines()[0]
                    + " "
                    + " ".join(line for line in str(exc).splitlines() if "ValueError" in line)[:500]
                )
    except BaseException:
        logger.error("server logs kept in %s", workdir)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def workload_result(
    kind: str, args: argparse.Namespace, workload: Workload, slo: SLO | None,
    options: tuple[str, ...], **fields: Any,
) -> dict[str, Any]:
    """A report's header: the workload, the SLO and the named command-line options."""
    return new_result(kind, workload=workload.describe(), slo=slo and vars(slo),
                      parameters={name: getattr(args, name) for name in options}, **fields)


def _write(result: dict[str, Any], out: Path, cdfs: dict[str, list[RequestTimeline]]) -> None:
    finish_result(result)
    json_path = save_json(result, out.with_suffix(".json"))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    written = [json_path, out.with_suffix(".md")]
    if cdfs:
        written.append(plot_cdfs(cdfs, out.with_name(out.name + "-cdf.png"), result["kind"]))
    if result.get("sweep"):
        written.append(plot_sweep(result["sweep"], out.with_name(out.name + "-sweep.png")))
    print(text)
    print("written: " + ", ".join(str(p) for p in written))


# -- commands -------------------------------------------------------------------------------


def serve_compare(args: argparse.Namespace) -> int:
    workload, slo = build_workload(args), slo_of(args)
    prompts = _prompts(workload)
    result = workload_result("serve-compare", args, workload, slo,
                             ("param", "policy_param", "server_threads"), runs={})
    cdfs: dict[str, list[RequestTimeline]] = {}

    def body(policy: str, server: Any) -> None:
        cdfs[policy], result["runs"][policy] = run_on_server(
            args, server, workload, prompts, policy, slo, policy
        )

    result["server_errors"] = {}
    _with_servers(args, body, result["server_errors"])
    _write(result, args.out, cdfs)
    return 0


def simulate(args: argparse.Namespace) -> int:
    workload, slo = build_workload(args), slo_of(args)
    cost_model = load_profile(args.profile)
    result = workload_result("simulate", args, workload, slo,
                             ("profile", "param", "policy_param"), runs={})
    cdfs: dict[str, list[RequestTimeline]] = {}
    for policy in args.policies:
        cdfs[policy], result["runs"][policy] = run_in_sim(
            args, workload, policy, cost_model, slo, policy
        )
    _write(result, args.out, cdfs if len(workload) <= 20_000 else {})
    return 0


def simulate_cluster(args: argparse.Namespace) -> int:
    workload, slo = build_workload(args), slo_of(args)
    cost_model = load_profile(args.profile)
    result = workload_result(
        "simulate-cluster", args, workload, slo,
        ("profile", "instances", "dispatch", "migration", "migrate_out_threshold",
         "migration_cost", "migration_fixed_s", "migration_bytes_per_s", "param",
         "policy_param"), runs={})
    cdfs: dict[str, list[RequestTimeline]] = {}
    for policy in args.policies:
        cdfs[policy], result["runs"][policy] = run_in_cluster_sim(
            args, workload, policy, cost_model, slo, policy
        )
    _write(result, args.out, cdfs if len(workload) <= 20_000 else {})
    return 0


def sweep(args: argparse.Namespace) -> int:
    workload, slo = build_workload(args), slo_of(args)
    if slo is None:
        raise SystemExit("sweep needs --slo-ttft-s and --slo-tbt-s")
    if args.backend == "sim" and not args.profile:
        raise SystemExit("--backend sim needs --profile")
    result = workload_result("sweep", args, workload, slo,
                             ("backend", "profile", "rates", "param", "policy_param"),
                             sweep=[], attainment_target=args.attainment_target)

    def measure(policy: str, run: Callable[[Workload, str], tuple[Any, dict]]) -> None:
        for rate in sorted(args.rates):
            _, entry = run(workload.at_rate(rate), f"{policy} @ {rate:g}/s")
            s = entry["summary"]
            result["sweep"].append(
                {
                    "policy": policy,
                    "rate_rps": rate,
                    "mean_jct_s": s["jct_s"]["mean"],
                    "p99_jct_s": s["jct_s"]["p99"],
                    "mean_ttft_s": s["ttft_s"]["mean"],
                    "attainment": s["slo"]["attainment"],
                    "goodput_rps": s["slo"]["goodput_rps"],
                }
            )

    if args.backend == "sim":
        cost_model = load_profile(args.profile)
        for policy in args.policies:
            measure(
                policy, lambda w, label, p=policy: run_in_sim(args, w, p, cost_model, slo, label)
            )
    else:
        prompts = _prompts(workload)
        _with_servers(
            args,
            lambda policy, server: measure(
                policy, lambda w, label: run_on_server(args, server, w, prompts, policy, slo, label)
            ),
        )
    result["effective_throughput"] = {
        policy: effective_throughput(
            [(p["rate_rps"], p["attainment"]) for p in result["sweep"] if p["policy"] == policy],
            args.attainment_target,
        )
        for policy in args.policies
    }
    _write(result, args.out, {})
    return 0

