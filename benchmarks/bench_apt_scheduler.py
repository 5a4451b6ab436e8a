#!/usr/bin/env python3
"""The apt policy's own time per iteration against the number of candidates it weighs.

Apt-Serve reports 0.3 ms for 50 candidates and 10.8 ms for 1,600. Here, for each ``N``
(``--candidates``), a fake clock and no model:

* ``N`` requests (``--prompt-tokens`` each, outputs far beyond the run) in a block pool
  of ``F`` times the KV blocks of all of them at the end of the run, for each ``F`` in
  ``--memory-fractions`` (hidden mode available, twice the tokens per block; a host tier
  big enough for all). ``F >= 1``: everything fits, every iteration serves all ``N``;
  ``F < 1``: the knapsack binds, every iteration chooses who runs and in which mode and
  the others are swapped out (the scheduler plans those swaps too);
* ``max_batch_size`` = ``N`` and a token budget large enough for all prompts, so no other
  limit than memory decides;
* after ``--warmup`` iterations (every request prefilled once), ``--iterations`` are
  timed: ``schedule()`` plus ``update_from_output()`` in this thread's CPU time.

The table gives the mean candidates per iteration (requests the knapsack weighed),
mean / P50 / P99 milliseconds, and the share of decode steps. Results are printed and
saved to ``benchmarks/results/apt-scheduler-<date>.json`` with the command, the machine
and the date.

Usage::

    .venv/bin/python benchmarks/bench_apt_scheduler.py [--candidates 50 1600]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from bench_common import machine_info, print_table  # noqa: E402

from preemptserve.config import SchedulerConfig  # noqa: E402
from preemptserve.core.block_manager import BlockManager  # noqa: E402
from preemptserve.core.cost_model import PrefillProfile  # noqa: E402
from preemptserve.core.request import Request, SamplingParams  # noqa: E402
from preemptserve.core.scheduler import create_scheduler  # noqa: E402
from preemptserve.core.scheduler.apt import AptScheduler  # noqa: E402

BLOCK_SIZE = 16
TOKEN_ID = 7
# 0.1 ms of prefill per token; 20 us of recompute per block per decode step.
PROFILE = PrefillProfile(((1, 0.0001), (4096, 0.4096)), hidden_recompute_s_per_block=2e-5)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def run(num_candidates: int, memory_fraction: float, args: argparse.Namespace
        ) -> dict[str, float]:
    max_tokens = args.warmup + args.iterations + 16  # none finishes during the run
    kv_blocks_each = -(-(args.prompt_tokens + args.warmup + args.iterations + 2) // BLOCK_SIZE)
    num_blocks = max(-(-(args.prompt_tokens + max_tokens) // BLOCK_SIZE),
                     int(memory_fraction * num_candidates * kv_blocks_each))
    config = SchedulerConfig(policy="apt", max_batch_size=num_candidates,
                             max_num_batched_tokens=num_candidates * args.prompt_tokens,
                             options={"ttft_slo_s": 10.0, "tbt_slo_s": 1.0})
    clock = FakeClock()
    bm = BlockManager(num_blocks, BLOCK_SIZE, num_host_blocks=2 * num_candidates
                      * kv_blocks_each, hidden_tokens_per_block=2 * BLOCK_SIZE)
    scheduler = create_scheduler(config, bm, clock, PROFILE)
    assert isinstance(scheduler, AptScheduler)
    for i in range(num_candidates):
        scheduler.add_request(Request(f"r{i}", [TOKEN_ID] * args.prompt_tokens,
                                      SamplingParams(max_tokens=max_tokens)))
    step_s = args.step_ms / 1000
    cpu_ms: list[float] = []
    candidates: list[int] = []
    num_decode_steps = 0
    for i in range(args.warmup + args.iterations):
        c0 = time.thread_time()
        output = scheduler.schedule()
        c1 = time.thread_time()
        sampled = {item.request_id: TOKEN_ID for item in output.scheduled if item.sample}
        c2 = time.thread_time()
        scheduler.update_from_output(output, sampled, step_s)
        c3 = time.thread_time()
        bm.check_invariants() if i == 0 else None
        clock.now_s += step_s
        if i >= args.warmup:
            cpu_ms.append((c1 - c0 + c3 - c2) * 1e3)
            candidates.append(scheduler.last_num_candidates)
            num_decode_steps += not any(item.is_prefill for item in output.scheduled)
    ordered = sorted(cpu_ms)
    return {
        "num_requests": num_candidates,
        "memory_fraction": memory_fraction,
        "num_blocks": num_blocks,
        "mean_candidates": statistics.fmean(candidates),
        "cpu_mean_ms": statistics.fmean(cpu_ms),
        "cpu_p50_ms": ordered[len(ordered) // 2],
        "cpu_p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "decode_step_share": num_decode_steps / len(cpu_ms),
        "swap_outs_per_iteration": scheduler.num_swap_outs / (args.warmup + args.iterations),
        "num_hidden_admissions_share": sum(
            1 for r in scheduler.requests.values() if r.hidden) / num_candidates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[50, 200, 800, 1600])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--memory-fractions", type=float, nargs="+", default=[2.0, 0.6])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--format", choices=["plain", "markdown", "rich"], default="plain")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    results = [run(n, f, args) for f in args.memory_fractions for n in args.candidates]
    rows = [[str(r["num_requests"]), f"{r['memory_fraction']:g}", f"{r['mean_candidates']:.0f}",
             f"{r['cpu_mean_ms']:.2f}", f"{r['cpu_p50_ms']:.2f}", f"{r['cpu_p99_ms']:.2f}",
             f"{r['decode_step_share']:.2f}", f"{r['num_hidden_admissions_share']:.2f}",
             f"{r['swap_outs_per_iteration']:.0f}"]
            for r in results]
    print_table("apt: schedule() + update_from_output() CPU time per iteration",
                ["requests", "memory", "candidates", "mean ms", "P50 ms", "P99 ms",
                 "decode steps", "hidden share", "swap-outs/iter"], rows, args.format)
    date = dt.date.today().isoformat()
    output = args.output or Path(__file__).parent / "results" / f"apt-scheduler-{date}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }, indent=1))
    print(f"\nsaved {output}")


if __name__ == "__main__":
    main()
