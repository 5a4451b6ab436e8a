#!/usr/bin/env python3
"""Tensor parallelism on this machine: engine tokens/s at TP=1 and TP=2, and plan cost.

1. **tokens/s**: ``LLMEngine`` in this process on the embedded default model (fp32, CPU,
   ``fcfs``), ``B`` requests of ``--prompt-tokens`` token ids each, greedy, exactly
   ``--output-tokens`` generated per request; tokens/s = generated tokens / wall time
   (prefill included), median of ``--repeats`` runs after a warm-up. Three variants:
   TP=1 with all of torch's threads, TP=1 with as many threads as one TP=2 rank has, and
   TP=2 (``TensorParallelExecutor`` gives each rank its share of the threads).
   ``step ms`` is the mean wall time of one iteration.
2. **plan cost, in the engine**: what rank 0 spends per iteration to send the plan
   (pickling the ``SchedulerOutput`` and writing it to each worker's pipe), from the
   executor's own counters during the TP=2 runs: wall time and the thread's CPU time
   (writing to the pipe wakes the worker, which may take the sender's core), with the
   mean plan size; and rank 0's time inside ``all_reduce`` per iteration (its share of
   the collective plus waiting for the other rank to get there).
3. **plan transport, alone**: the plans recorded from a TP=1 run at the largest batch are
   sent to one worker process and acknowledged, one at a time, over (a) the pipe the
   engine uses and (b) ``torch.distributed.broadcast_object_list`` on gloo; the median
   round trip (send, decode on the worker, 1-byte ack) bounds the one-way latency.

Usage::

    .venv/bin/python benchmarks/bench_tp.py [--batch-sizes 1 8 32] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import pickle
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_common import machine_info, print_table  # noqa: E402

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from preemptserve.core.request import SamplingParams  # noqa: E402
from preemptserve.core.scheduler import SchedulerOutput  # noqa: E402
from preemptserve.engine.llm_engine import LLMEngine  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def make_engine(tp: int, max_batch_size: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            device="cpu",
            tensor_parallel_size=tp,
            scheduler=SchedulerConfig(
                policy="fcfs", max_batch_size=max_batch_size, max_num_batched_tokens=2048
            ),
            cache=CacheConfig(kv_cache_bytes=256 * 2**20),
        )
    )


def prompts_for(engine: LLMEngine, num_prompts: int, num_tokens: int) -> list[list[int]]:
    vocab = engine.args.vocab_size
    return [
        [1] + [(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(num_tokens - 1)]
        for i in range(num_prompts)
    ]


def run_once(
    engine: LLMEngine,
    prompts: list[list[int]],
    num_tokens: int,
    record: list[SchedulerOutput] | None = None,
) -> dict[str, float]:
    sampling = SamplingParams(max_tokens=num_tokens, min_length=num_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, sampling)
    if record is not None:
        schedule = engine.scheduler.schedule

        def recording() -> SchedulerOutput:
            output = schedule()
            record.append(output)
            return output

        engine.scheduler.schedule = recording  # type: ignore[method-assign]
    num_tokens_out, num_steps = 0, 0
    all_reduce_before = _ALL_REDUCE_S[0]
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        num_tokens_out += len(engine.step())
        num_steps += 1
    wall_s = time.perf_counter() - start
    if record is not None:
        engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    return {
        "tokens_per_s": num_tokens_out / wall_s,
        "step_ms": wall_s / num_steps * 1e3,
        "all_reduce_ms_per_step": (_ALL_REDUCE_S[0] - all_reduce_before) / num_steps * 1e3,
        "num_steps": num_steps,
    }


# Rank 0's time inside all-reduces (its own part of the collective plus waiting for the
# slower rank), accumulated by a wrapper around torch.distributed.all_reduce.
_ALL_REDUCE_S = [0.0]
_all_reduce = dist.all_reduce


def _timed_all_reduce(*args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return _all_reduce(*args, **kwargs)
    finally:
        _ALL_REDUCE_S[0] += time.perf_counter() - start


dist.all_reduce = _timed_all_reduce


def bench_engine(
    tp: int,
    num_threads: int,
    batch_sizes: Sequence[int],
    args: argparse.Namespace,
    record: list[SchedulerOutput],
) -> dict[int, dict[str, Any]]:
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    engine = make_engine(tp, max(batch_sizes))
    results: dict[int, dict[str, Any]] = {}
    try:
        threads_per_rank = torch.get_num_threads()
        for batch_size in batch_sizes:
            prompts = prompts_for(engine, batch_size, args.prompt_tokens)
            run_once(engine, prompts, 4)  # warm-up
            stats = getattr(engine.executor, "plan_stats", None)
            before = replace(stats) if stats else None
            keep = record if tp == 1 and batch_size == max(batch_sizes) and not record else None
            runs = [
                run_once(engine, prompts, args.output_tokens, keep if i == 0 else None)
                for i in range(args.repeats)
            ]
            row: dict[str, Any] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "step_ms": statistics.median(r["step_ms"] for r in runs),
                "all_reduce_ms_per_step": statistics.median(
                    r["all_reduce_ms_per_step"] for r in runs
                ),
                "num_steps": runs[0]["num_steps"],
                "torch_threads_per_rank": threads_per_rank,
            }
            if stats and before:
                num_plans = stats.num_plans - before.num_plans
                row["plan_bytes"] = (stats.num_bytes - before.num_bytes) / num_plans
                row["plan_send_us"] = (stats.send_s - before.send_s) / num_plans * 1e6
                row["plan_send_cpu_us"] = (stats.send_cpu_s - before.send_cpu_s) / num_plans * 1e6
            results[batch_size] = row
            logging.info("TP=%d, %d threads, batch %d: %s", tp, num_threads, batch_size, row)
    finally:
        engine.shutdown()
        torch.set_num_threads(saved_threads)
    return results


# -- plan transport alone ------------------------------------------------------------------


def _echo_worker(port: int, conn: Any, num_plans: int) -> None:
    torch.set_num_threads(1)
    for _ in range(num_plans):
        pickle.loads(conn.recv_bytes())
        conn.send_bytes(b"k")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=1,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    for _ in range(num_plans):
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        conn.send_bytes(b"k")
    dist.destroy_process_group()


def bench_transport(plans: list[SchedulerOutput]) -> dict[str, float]:
    from preemptserve.engine.tp_executor import _free_port

    context = torch_mp.get_context("spawn")
    conn, child = context.Pipe()
    port = _free_port()
    worker = context.Process(target=_echo_worker, args=(port, child, len(plans)))
    worker.start()
    pipe_s, object_list_s = [], []
    for plan in plans:
        start = time.perf_counter()
        conn.send_bytes(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
        conn.recv_bytes()
        pipe_s.append(time.perf_counter() - start)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    for plan in plans:
        start = time.perf_counter()
        dist.broadcast_object_list([plan], src=0)
        conn.recv_bytes()
        object_list_s.append(time.perf_counter() - start)
    dist.destroy_process_group()
    worker.join(30)
    sizes = [len(pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)) for p in plans]
    return {
        "num_plans": len(plans),
        "plan_bytes_mean": statistics.mean(sizes),
        "pipe_round_trip_us": statistics.median(pipe_s) * 1e6,
        "broadcast_object_list_round_trip_us": statistics.median(object_list_s) * 1e6,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: benchmarks/results/tp-<date>.json)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = dt.datetime.now()
    info = machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads())
    recorded: list[SchedulerOutput] = []
    all_threads = torch.get_num_threads()
    rank_threads = max(1, all_threads // 2)
    variants = {
        "tp1": (1, all_threads),
        "tp1_rank_threads": (1, rank_threads),
        "tp2": (2, all_threads),
    }
    engine_results = {
        name: bench_engine(tp, threads, args.batch_sizes, args, recorded)
        for name, (tp, threads) in variants.items()
    }
    transport = bench_transport(recorded)
    result = {
        "benchmark": "bench_tp",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "repeats": args.repeats,
            "policy": "fcfs",
            "dtype": "float32",
        },
        "engine": engine_results,
        "plan_transport": transport,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    fmt = "markdown" if args.markdown else "plain"
    rows = []
    for b in args.batch_sizes:
        one, few, two = (engine_results[name][b] for name in variants)
        rows.append(
            [
                str(b),
                f"{one['tokens_per_s']:.0f}",
                f"{few['tokens_per_s']:.0f}",
                f"{two['tokens_per_s']:.0f}",
                f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}",
                f"{one['step_ms']:.1f}",
                f"{few['step_ms']:.1f}",
                f"{two['step_ms']:.1f}",
            ]
        )
    print_table(
        f"Engine tokens/s, default model, fp32 CPU ({all_threads} threads in all)",
        [
            "batch",
            f"TP=1 {all_threads}t",
            f"TP=1 {rank_threads}t",
            f"TP=2 {rank_threads}t/rank",
            "TP=2 / TP=1",
            "TP=1 step ms",
            f"TP=1 {rank_threads}t step ms",
            "TP=2 step ms",
        ],
        rows,
        fmt,
    )
    plan_rows = []
    for b in args.batch_sizes:
        two = engine_results["tp2"][b]
        plan_rows.append(
            [
                str(b),
                f"{two['plan_bytes']:.0f}",
                f"{two['plan_send_us']:.0f}",
                f"{two['plan_send_cpu_us']:.0f}",
                f"{two['plan_send_us'] / 10 / two['step_ms']:.2f}",
                f"{two['all_reduce_ms_per_step']:.1f}",
            ]
        )
    print_table(
        "Plan sent by rank 0 per iteration, TP=2 (and rank 0's time in all-reduces)",
        ["batch", "bytes", "wall us", "CPU us", "wall % of step", "all-reduce ms/step"],
        plan_rows,
        fmt,
    )
    print_table(
        f"Plan transport round trip ({transport['num_plans']} plans of batch "
        f"{max(args.batch_sizes)}, mean {transport['plan_bytes_mean']:.0f} bytes)",
        ["transport", "median round trip us"],
        [
            ["pickle + pipe (used)", f"{transport['pipe_round_trip_us']:.0f}"],
            [
                "broadcast_object_list (gloo)",
                f"{transport['broadcast_object_list_round_trip_us']:.0f}",
            ],
        ],
        fmt,
    )
    out_path = args.out or RESULTS_DIR / f"tp-{started:%Y-%m-%d}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
