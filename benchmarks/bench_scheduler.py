#!/usr/bin/env python3
"""The scheduler's own CPU time per iteration: no torch, no model, a fake clock.

For each policy (``fcfs``, ``skip_join_mlfq``) and each number of waiting requests:

* a block manager big enough that memory never runs out (16-token blocks);
* ``max_batch_size`` 256 and a token budget of ``--budget`` (it allows 256 decodes);
* 256 requests (``--prompt-tokens`` each, ``max_tokens`` far beyond the run) admitted
  first and stepped until all of them decode: the batch is full of decodes;
* then ``W`` waiting requests with long prompts (``--waiting-prompt-tokens``): fcfs
  queues them behind the full batch; skip-join MLFQ puts them in a lower queue (their
  estimated prefill time, 0.1 ms per token, exceeds the top quanta).

MLFQ runs with its default quanta (50 ms * 2**i, six queues), starvation threshold (5 s)
and reserve (10 %). The fake clock advances ``--step-ms`` (default 0.1 ms) per iteration,
so that no demotion or promotion happens during the run: every iteration is the same
steady decode step for both policies, 256 requests of 1 token each (checked).

Each iteration times ``schedule()`` and ``update_from_output()`` (the fabricated sampled
tokens are built outside the timed region) in this thread's CPU time
(``time.thread_time``: what the scheduler itself costs) and in wall-clock time
(``time.perf_counter``: adds whatever else ran on the machine meanwhile). After
``--warmup`` untimed iterations, ``--iterations`` are timed; each configuration runs
``--repeats`` times, interleaved with the others, and the table shows min, mean, P50,
P99 and max of schedule + update over all the repeats' iterations (the min is the floor
that other processes' load does not raise). The goal: under 1 ms per
iteration at 256 running + 10,000 waiting.

``--profile`` also runs the MLFQ case with the most waiting requests under cProfile and
prints where the time goes. A last measurement times one MLFQ ``schedule()`` in which
every waiting request has just reached the starvation threshold (the default 5 s) and is
promoted at once: the cost of that single iteration.

Results are printed and saved to ``benchmarks/results/scheduler-<date>.json`` with the
command, the machine and the date. Timings on a shared machine are noisy: compare only
runs taken together.

Usage::

    .venv/bin/python benchmarks/bench_scheduler.py [--waiting 10000 1000 100] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from bench_common import machine_info  # noqa: E402

from preemptserve.config import SchedulerConfig  # noqa: E402
from preemptserve.core.block_manager import BlockManager  # noqa: E402
from preemptserve.core.cost_model import PrefillProfile  # noqa: E402
from preemptserve.core.request import Request, SamplingParams  # noqa: E402
from preemptserve.core.scheduler import (  # noqa: E402
    BlockSwap,
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
    create_scheduler,
)

POLICIES = ("fcfs", "skip_join_mlfq")
NUM_RUNNING = 256
BLOCK_SIZE = 16
# Prefill time grows by 0.1 ms per prompt token: a 32-token prompt is estimated at
# 3.2 ms (joins Q0 of 50 ms), a 2048-token one at 205 ms (joins Q3 of 400 ms).
PROFILE = PrefillProfile(((1, 0.0001), (4096, 0.4096)))
TOKEN_ID = 7


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int) -> Request:
    return Request(request_id, [TOKEN_ID] * num_prompt_tokens, SamplingParams(max_tokens))


def build(policy: str, num_waiting: int, args: argparse.Namespace
          ) -> tuple[Scheduler, FakeClock]:
    """A scheduler with 256 requests decoding and ``num_waiting`` queued behind them."""
    # Past the setup (one prompt's prefill may take several iterations) and the run.
    num_prefill_steps = -(-NUM_RUNNING * args.prompt_tokens // args.budget) + NUM_RUNNING
    max_tokens = num_prefill_steps + args.warmup + args.iterations + 64
    blocks_per_running = -(-(args.prompt_tokens + max_tokens) // BLOCK_SIZE)
    blocks_per_waiting = -(-(args.waiting_prompt_tokens + 16) // BLOCK_SIZE)
    # Twice the running requests' whole lives, plus one waiting request (add_request
    # checks it fits): memory never runs out, the MLFQ reserve is never touched.
    num_blocks = 2 * NUM_RUNNING * blocks_per_running + blocks_per_waiting
    # Defaults for everything else, MLFQ's quanta, threshold and reserve included.
    config = SchedulerConfig(
        policy=policy, max_batch_size=NUM_RUNNING, max_num_batched_tokens=args.budget)
    clock = FakeClock()
    scheduler = create_scheduler(config, BlockManager(num_blocks, BLOCK_SIZE), clock, PROFILE)
    for i in range(NUM_RUNNING):
        scheduler.add_request(make_request(f"run{i}", args.prompt_tokens, max_tokens))
    # Prefill all of them (chunked by the budget) until every one decodes.
    while True:
        output = scheduler.schedule()
        step(scheduler, output, clock, args.step_ms / 1000)
        if len(output.scheduled) == NUM_RUNNING and all(
            item.num_tokens == 1 for item in output.scheduled
        ):
            break
    for i in range(num_waiting):
        scheduler.add_request(make_request(f"wait{i}", args.waiting_prompt_tokens, 16))
    return scheduler, clock


def step(scheduler: Scheduler, output: SchedulerOutput, clock: FakeClock, step_s: float
         ) -> None:
    sampled = {item.request_id: TOKEN_ID for item in output.scheduled if item.sample}
    scheduler.update_from_output(output, sampled, step_s)
    clock.now_s += step_s


@dataclass
class Samples:
    """Seconds per timed iteration: wall clock and this thread's CPU time."""

    schedule_wall_s: list[float] = field(default_factory=list)
    update_wall_s: list[float] = field(default_factory=list)
    schedule_cpu_s: list[float] = field(default_factory=list)
    update_cpu_s: list[float] = field(default_factory=list)

    def extend(self, other: Samples) -> None:
        for name in ("schedule_wall_s", "update_wall_s", "schedule_cpu_s", "update_cpu_s"):
            getattr(self, name).extend(getattr(other, name))

    def summary(self) -> dict[str, float]:
        wall_ms = [(a + b) * 1e3 for a, b in zip(self.schedule_wall_s, self.update_wall_s,
                                                 strict=True)]
        cpu_ms = [(a + b) * 1e3 for a, b in zip(self.schedule_cpu_s, self.update_cpu_s,
                                                strict=True)]
        return {
            "cpu_min_ms": min(cpu_ms),
            "cpu_mean_ms": statistics.fmean(cpu_ms),
            "cpu_p50_ms": percentile(cpu_ms, 50),
            "cpu_p99_ms": percentile(cpu_ms, 99),
            "cpu_max_ms": max(cpu_ms),
            "wall_mean_ms": statistics.fmean(wall_ms),
            "wall_p50_ms": percentile(wall_ms, 50),
            "wall_p99_ms": percentile(wall_ms, 99),
            "wall_max_ms": max(wall_ms),
            "schedule_cpu_mean_ms": statistics.fmean(self.schedule_cpu_s) * 1e3,
            "update_cpu_mean_ms": statistics.fmean(self.update_cpu_s) * 1e3,
        }


def measure(scheduler: Scheduler, clock: FakeClock, args: argparse.Namespace) -> Samples:
    """Time ``schedule()`` and ``update_from_output()`` of each iteration after warm-up."""
    step_s = args.step_ms / 1000
    samples = Samples()
    wall, cpu = time.perf_counter, time.thread_time
    for i in range(args.warmup + args.iterations):
        w0, c0 = wall(), cpu()
        output = scheduler.schedule()
        w1, c1 = wall(), cpu()
        sampled = {item.request_id: TOKEN_ID for item in output.scheduled if item.sample}
        w2, c2 = wall(), cpu()
        scheduler.update_from_output(output, sampled, step_s)
        w3, c3 = wall(), cpu()
        clock.now_s += step_s
        # The measurement is of the steady decode step; anything else would mislead.
        assert len(output.scheduled) == NUM_RUNNING, len(output.scheduled)
        assert output.num_batched_tokens == NUM_RUNNING
        assert not output.swap_out and not output.swap_in and not output.preempted_ids
        if i >= args.warmup:
            samples.schedule_wall_s.append(w1 - w0)
            samples.update_wall_s.append(w3 - w2)
            samples.schedule_cpu_s.append(c1 - c0)
            samples.update_cpu_s.append(c3 - c2)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def profile(scheduler: Scheduler, clock: FakeClock, args: argparse.Namespace,
            top: int = 15) -> list[dict]:
    """Run the timed loop under cProfile; the top functions by own time, per iteration."""
    num_iterations = args.warmup + args.iterations
    step_s = args.step_ms / 1000
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    for _ in range(num_iterations):  # the timed loop without its clocks
        step(scheduler, scheduler.schedule(), clock, step_s)
    profiler.disable()
    # Raw entries, not pstats: pstats keys functions by (file, line, name), and every
    # dataclass-generated __init__ is "<string>:2(__init__)", so they would merge.
    generated = {cls.__init__.__code__: f"{cls.__qualname__}.__init__ (generated)"
                 for cls in (ScheduledRequest, SchedulerOutput, BlockSwap, Request)
                 if hasattr(cls.__init__, "__code__")}
    rows = []
    for entry in profiler.getstats():
        code = entry.code
        if isinstance(code, str):
            label = code
        else:
            label = generated.get(code) or (
                f"{Path(code.co_filename).name}:{code.co_firstlineno}({code.co_name})")
        rows.append({
            "function": label,
            "calls_per_iteration": entry.callcount / num_iterations,
            "own_us_per_iteration": entry.inlinetime / num_iterations * 1e6,
            "cumulative_us_per_iteration": entry.totaltime / num_iterations * 1e6,
        })
    rows.sort(key=lambda r: -r["own_us_per_iteration"])
    total_us = sum(r["own_us_per_iteration"] for r in rows)
    for row in rows:
        row["share_of_own_time"] = row["own_us_per_iteration"] / total_us
    return rows[:top]


def mass_promotion_ms(num_waiting: int, args: argparse.Namespace) -> float:
    """One MLFQ schedule() in which every waiting request has starved at once.

    The policy promotes at most a batch's worth per iteration; the rest follow.
    """
    scheduler, clock = build("skip_join_mlfq", num_waiting, args)
    clock.now_s += scheduler.options.starvation_threshold_s  # all waited that long
    gc.collect()
    t0 = time.thread_time()
    scheduler.schedule()
    elapsed_ms = (time.thread_time() - t0) * 1e3
    promoted = scheduler.num_promotions  # type: ignore[attr-defined]
    assert promoted >= min(num_waiting, scheduler.config.max_batch_size), promoted
    return elapsed_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, nargs="+", default=[10_000, 1_000, 100])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each configuration, interleaved and pooled")
    parser.add_argument("--budget", type=int, default=2048,
                        help="max_num_batched_tokens (>= 256: allows 256 decodes)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--waiting-prompt-tokens", type=int, default=2048)
    parser.add_argument("--step-ms", type=float, default=0.1,
                        help="fake clock advance per iteration (small: no demotion)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the MLFQ case with the most waiting requests")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/scheduler-<date>.json)")
    args = parser.parse_args()
    if args.budget < NUM_RUNNING:
        parser.error(f"--budget must allow {NUM_RUNNING} decodes")
    if args.waiting_prompt_tokens < args.prompt_tokens:
        parser.error("--waiting-prompt-tokens below --prompt-tokens: MLFQ would run the "
                     "waiting requests first, and the step would not be a steady decode")

    started = dt.datetime.now().astimezone()
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "setup": {
            "num_running": NUM_RUNNING, "max_batch_size": NUM_RUNNING,
            "max_num_batched_tokens": args.budget, "block_size": BLOCK_SIZE,
            "prompt_tokens": args.prompt_tokens,
            "waiting_prompt_tokens": args.waiting_prompt_tokens,
            "iterations": args.iterations, "warmup": args.warmup, "repeats": args.repeats,
            "step_ms": args.step_ms,
            "timed": "schedule() + update_from_output() per iteration",
        },
        "runs": [],
    }
    # Repeats interleave the configurations, so that a burst of load on a shared machine
    # hits all of them; the statistics pool every repeat's iterations.
    samples = {(policy, w): Samples() for w in args.waiting for policy in POLICIES}
    repeat_means: dict[tuple[str, int], list[float]] = {key: [] for key in samples}
    for _ in range(args.repeats):
        for num_waiting in args.waiting:
            for policy in POLICIES:
                scheduler, clock = build(policy, num_waiting, args)
                gc.collect()
                run = measure(scheduler, clock, args)
                assert scheduler.num_waiting == num_waiting
                samples[policy, num_waiting].extend(run)
                repeat_means[policy, num_waiting].append(run.summary()["cpu_mean_ms"])
                del scheduler
    print("milliseconds per iteration, schedule() + update_from_output(); CPU time of this "
          "thread (wall clock: adds time taken by other processes)")
    print(f"{'policy':<16} {'waiting':>7} | {'cpu min':>7} {'mean':>6} {'p50':>6} {'p99':>6} "
          f"{'max':>6} | {'wall mean':>9} {'p50':>6} {'p99':>6} | {'schedule':>8} {'update':>6}")
    for (policy, num_waiting), run in samples.items():
        stats = run.summary()
        result["runs"].append({
            "policy": policy, "num_waiting": num_waiting,
            "num_samples": len(run.schedule_cpu_s), **stats,
            "cpu_mean_ms_per_repeat": repeat_means[policy, num_waiting]})
        print(f"{policy:<16} {num_waiting:>7} | {stats['cpu_min_ms']:>7.3f} "
              f"{stats['cpu_mean_ms']:>6.3f} {stats['cpu_p50_ms']:>6.3f} "
              f"{stats['cpu_p99_ms']:>6.3f} {stats['cpu_max_ms']:>6.3f} | "
              f"{stats['wall_mean_ms']:>9.3f} "
              f"{stats['wall_p50_ms']:>6.3f} {stats['wall_p99_ms']:>6.3f} | "
              f"{stats['schedule_cpu_mean_ms']:>8.3f} {stats['update_cpu_mean_ms']:>6.3f}")

    most = max(args.waiting)
    spike_ms = mass_promotion_ms(most, args)
    result["mlfq_mass_promotion"] = {"num_waiting": most, "schedule_ms": spike_ms}
    print(f"\nskip_join_mlfq: one schedule() promoting all {most} starved waiting requests: "
          f"{spike_ms:.1f} ms")

    if args.profile:
        scheduler, clock = build("skip_join_mlfq", most, args)
        rows = profile(scheduler, clock, args)
        result["mlfq_profile"] = {"num_waiting": most, "top_by_own_time": rows}
        print(f"\ncProfile, skip_join_mlfq, {most} waiting; per iteration, under the "
              "profiler's overhead: share of own time, own us, cumulative us, calls")
        for row in rows:
            print(f"  {row['share_of_own_time']:6.1%} {row['own_us_per_iteration']:7.1f} "
                  f"{row['cumulative_us_per_iteration']:7.1f} {row['calls_per_iteration']:6.0f}"
                  f"  {row['function']}")

    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (dt.datetime.now().astimezone() - started).total_seconds()
    path = args.output or (Path(__file__).resolve().parent / "results"
                           / f"scheduler-{started.date().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['date']}  {result['machine']['cpu_model']}, "
          f"{result['machine']['num_cpus_usable']} CPUs usable, python "
          f"{result['machine']['python']}\ncommand: {result['command']}\nsaved: {path}")


if __name__ == "__main__":
    main()
