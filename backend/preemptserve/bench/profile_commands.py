"""The ``profile`` and ``refit`` commands: fit this machine's cost model (the engine in
process, then a server's own iterations), or fit a saved profile again to its logs."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

from ..config import serving_config_from_parameters
from ..engine.iteration_stats import instance_log_path
from ..sim.cost_model import load_profile
from .commands import _pairs, _with_servers, parameters_for
from .report import finish_result, new_result


def profile(args: argparse.Namespace) -> int:
    from .profile import profile_engine, profile_serving, save_profile
    from .prompts import PromptBuilder

    started = time.time()
    params = parameters_for(args, "fcfs")
    model, facts = profile_engine(params, args.server_threads)
    source: dict[str, Any] = new_result("profile", engine=facts)
    if args.server:
        prompts = PromptBuilder()
        iteration_log = args.out.with_name(args.out.stem + "-iterations.jsonl")
        iteration_log.parent.mkdir(parents=True, exist_ok=True)
        args.param = [*args.param, f"iteration_stats_path={iteration_log}"]
        served = serving_config_from_parameters(params)
        block_bytes = model.kv_bytes_per_token * served.engine.cache.block_size
        # Several instances (num_instances): each logs to its own file.
        num_instances = served.cluster.num_instances
        logs = [iteration_log] if num_instances == 1 else [
            Path(instance_log_path(iteration_log, i)) for i in range(num_instances)]
        for log in logs:
            log.unlink(missing_ok=True)

        def body(policy: str, server: Any) -> None:
            nonlocal model
            model, source["serving"] = profile_serving(
                model, server.grpc_url, prompts, params, logs, block_bytes
            )

        args.policies = ["fcfs"]
        _with_servers(args, body)
        source["serving"]["iteration_logs"] = [str(log) for log in logs]
    finish_result(source)
    source["elapsed_s"] = time.time() - started
    path = save_profile(model, args.out, source)
    print(f"cost model written to {path}:\n{model}")
    return 0


def refit(args: argparse.Namespace) -> int:
    from ..sim.fit import refit_serving

    profile = load_profile(str(args.profile))
    served = serving_config_from_parameters(_pairs(args.param, "--param"))
    block_bytes = profile.kv_bytes_per_token * served.engine.cache.block_size
    model, serving = refit_serving(profile, args.logs, block_bytes)
    source = {**profile.source, "serving": serving,
              "refit": {"command": " ".join(sys.argv), "date": dt.datetime.now(
                  dt.timezone.utc).isoformat(), "from": str(args.profile)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(model, source=source).save(args.out)
    print(f"cost model written to {args.out}: coefficients {serving['coefficients']}, "
          f"co_running_slowdown {model.co_running_slowdown:.3f}, period fit error "
          f"{serving['period_fit_relative_error']}")
    return 0
