"""Migration downtime between two Ray instance actors, by context length: staged (Llumnix)
against one blocking copy, as deployed (``num_instances=2``), with the copy crossing
processes through the configured transport.

For each context length ``L`` (128 up to the model's maximum) a request of about ``L``
prompt tokens streams from instance 0 through the ``ClusterFrontend``; after a few tokens
it is moved to instance 1 (``ClusterFrontend.migrate``) and streams on. Reported per
length (median of ``--repeats``):

* ``downtime``: the instance's measure, from the stop on the source to the import on the
  destination (``MigrationResult.downtime_s``);
* ``client stall``: the longest gap between two tokens the client received around the
  move, minus the median gap before it (what a user sees);
* ``decode step``: the median gap between tokens before the move (one decode step of the
  source with this request).

The goal of the issue: staged downtime flat in length, within 1.5 decode steps.

    .venv/bin/python benchmarks/bench_cluster_downtime.py \\
        --out benchmarks/results/cluster-downtime-2026-11-30.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import machine_info, print_table

from preemptserve.bench.prompts import PromptBuilder
from preemptserve.cluster.frontend import ClusterFrontend
from preemptserve.cluster.migration import MigrationConfig
from preemptserve.cluster.ray_cluster import RayCluster
from preemptserve.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams

TOKENS_BEFORE, TOKENS_AFTER = 6, 30
METHODS = {"staged": MigrationConfig(), "blocking_copy": MigrationConfig(1, 10**6)}


def run_one(frontend: ClusterFrontend, prompt: str, config: MigrationConfig) -> dict:
    times: list[float] = []
    done = threading.Event()

    def on_output(output, error) -> None:
        times.append(time.perf_counter())
        if output.finished or error:
            done.set()

    sampling = SamplingParams(max_tokens=TOKENS_BEFORE + TOKENS_AFTER,
                              min_length=TOKENS_BEFORE + TOKENS_AFTER, temperature=0.0)
    request_id = frontend.submit(prompt, sampling, on_output)
    while len(times) < TOKENS_BEFORE:
        time.sleep(0.001)
    ended_before = sum(frontend.stats.migrations_ended.values())
    committed_before = frontend.stats.migrations_ended[("committed", "")]
    assert frontend.migrate(request_id, 1, config), "the move did not start"
    done.wait(300)
    while sum(frontend.stats.migrations_ended.values()) == ended_before:
        time.sleep(0.01)
    if frontend.stats.migrations_ended[("committed", "")] == committed_before:
        raise RuntimeError(f"the move did not commit: {dict(frontend.stats.migrations_ended)}")
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    step = statistics.median(gaps[:TOKENS_BEFORE - 1])
    return {"downtime_s": frontend.stats.recent_downtimes_s[-1], "step_s": step,
            "stall_s": max(gaps[TOKENS_BEFORE - 2:]) - step, "num_tokens": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 1900])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transport", default="object_store", choices=["object_store", "gloo"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    ray_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")
    config = ClusterConfig(num_instances=2, ray_temp_dir=ray_dir, enable_migration=False,
                           dispatch_policy="round_robin",
                           migration_transport=args.transport)
    engine = EngineConfig(device="cpu", scheduler=SchedulerConfig(policy="fcfs"),
                          cache=CacheConfig(kv_cache_bytes=160 * 2**20))
    cluster = RayCluster(config, engine)
    frontend = ClusterFrontend(cluster, config)
    frontend.start()
    prompts = PromptBuilder()
    rows, cells = [], []
    try:
        for length in args.lengths:
            prompt = prompts.prompts([length], seed=length)[0]
            by_method: dict[str, list[dict]] = {m: [] for m in METHODS}
            for _ in range(args.repeats):
                for method, migration in METHODS.items():
                    frontend._dispatcher._next = 0  # round robin: the request starts on 0
                    by_method[method].append(run_one(frontend, prompt, migration))
            cell = {"length": length}
            for method, runs in by_method.items():
                cell[method] = {key: statistics.median(r[key] for r in runs)
                                for key in ("downtime_s", "step_s", "stall_s")}
            step = cell["staged"]["step_s"]
            cells.append(cell)
            rows.append([str(length), f"{step * 1e3:.1f}",
                         f"{cell['staged']['downtime_s'] * 1e3:.1f}",
                         f"{cell['blocking_copy']['downtime_s'] * 1e3:.1f}",
                         f"{cell['staged']['stall_s'] * 1e3:.1f}",
                         f"{cell['blocking_copy']['stall_s'] * 1e3:.1f}",
                         f"{cell['staged']['downtime_s'] / step:.2f}"])
            print(f"length {length}: done", file=sys.stderr)
        ended = dict(frontend.stats.migrations_ended)
    finally:
        frontend.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    headers = ["context", "decode step ms", "staged downtime ms", "blocking downtime ms",
               "staged client stall ms", "blocking client stall ms", "staged / step"]
    print_table(f"Migration downtime between two Ray instances ({args.transport})", headers,
                rows, "markdown")
    result = {"kind": "cluster-downtime", "command": " ".join([Path(sys.executable).name,
                                                                 *sys.argv]),
              "date": started.isoformat(), "machine": machine_info(),
              "transport": args.transport, "repeats": args.repeats, "cells": cells,
              "migrations": {f"{k[0]}:{k[1]}": v for k, v in ended.items()},
              "table": {"headers": headers, "rows": rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
