#!/usr/bin/env python3
"""Engine throughput of this checkout against another git revision, side by side.

For a change that must not slow the engine down: the same workload runs in the working
tree (``A``) and in ``--baseline`` (``B``, extracted with ``git archive`` into a temporary
directory), each run in a fresh process with ``PYTHONPATH`` pointing at one tree's
``backend/``. Runs alternate A, B, A, B, ... so that drift on a shared machine hits both
alike; each process does one untimed warm-up run, then ``--runs-per-process`` timed runs
and reports their median; a cell reports the median over its processes. The workload is that of
``bench_throughput.py``'s engine figure: ``B`` requests of ``--prompt-tokens`` ids each,
greedy, exactly ``--output-tokens`` tokens each, on the embedded default model (fp32, CPU),
all added at once and stepped to completion; tokens/s = generated tokens / wall time, and
per second of the process's CPU time (all threads; on this machine torch's two threads
stay busy for the whole run, so it tracked wall time to within 0.1%).

Usage::

    .venv/bin/python benchmarks/bench_engine_ab.py --baseline HEAD~5 \\
        [--policies fcfs skip_join_mlfq apt] [--batch-sizes 1 8 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench_common import machine_info, print_table

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process against one tree; only the engine API both trees share.
_WORKER = r"""
import json, sys, time
from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine

policy, batch_size, prompt_tokens, output_tokens, runs = sys.argv[1], *map(int, sys.argv[2:6])
engine = LLMEngine(EngineConfig(
    model_dir="default", device="cpu",
    scheduler=SchedulerConfig(policy=policy, max_batch_size=max(batch_size, 1),
                              max_num_batched_tokens=max(512, prompt_tokens)),
    cache=CacheConfig(kv_cache_bytes=256 * 2**20)))
sampling = SamplingParams(max_tokens=output_tokens, min_length=output_tokens,
                          temperature=0.0)
vocab = engine.args.vocab_size
prompts = [[1] + [3 + (7919 * (i * prompt_tokens + j)) % (vocab - 3)
                  for j in range(prompt_tokens - 1)] for i in range(batch_size)]

def run(tag):
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, sampling)
    num_tokens, start, start_cpu = 0, time.perf_counter(), time.process_time()
    while engine.has_unfinished_requests():
        num_tokens += len(engine.step())
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    assert num_tokens == batch_size * output_tokens, num_tokens
    return num_tokens / wall_s, num_tokens / cpu_s

run("warmup")
rates = [run(f"timed{i}") for i in range(runs)]
median = lambda values: sorted(values)[len(values) // 2]
print(json.dumps({"tokens_per_s": median([r[0] for r in rates]),
                  "tokens_per_cpu_s": median([r[1] for r in rates])}))
"""


def extract(revision: str, into: Path) -> Path:
    """The ``backend/`` of ``revision``, written under ``into``."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO_ROOT), "archive", revision, "backend"],
                       stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "backend"


def run_once(backend: Path, policy: str, batch_size: int,
             args: argparse.Namespace) -> dict[str, float]:
    """One process: ``{"tokens_per_s": wall-clock rate, "tokens_per_cpu_s": rate per
    second of the process's CPU time (all threads)}``."""
    env = {**os.environ, "PYTHONPATH": str(backend)}
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, policy, str(batch_size), str(args.prompt_tokens),
         str(args.output_tokens), str(args.runs_per_process)],
        env=env, capture_output=True, text=True, check=False, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"run in {backend} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--policies", nargs="+", default=["fcfs", "skip_join_mlfq", "apt"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5,
                        help="processes of each tree per cell (alternating)")
    parser.add_argument("--runs-per-process", type=int, default=3,
                        help="timed runs in each process; the process reports their median")
    parser.add_argument("--format", choices=["rich", "plain", "markdown"], default="rich")
    parser.add_argument("--out", type=Path, default=None, help="save the results as JSON")
    args = parser.parse_args()

    baseline = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short",
                               args.baseline], capture_output=True, text=True,
                              check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    cells = []
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        trees = {"this": REPO_ROOT / "backend", "baseline": extract(args.baseline, Path(tmp))}
        for policy in args.policies:
            for batch_size in args.batch_sizes:
                samples: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
                for _ in range(args.repeats):
                    for name, backend in trees.items():
                        samples[name].append(run_once(backend, policy, batch_size, args))
                cell = {"policy": policy, "batch_size": batch_size, "samples": samples}
                for metric in ("tokens_per_s", "tokens_per_cpu_s"):
                    this, base = (statistics.median(s[metric] for s in samples[k])
                                  for k in ("this", "baseline"))
                    cell[metric] = {"this": this, "baseline": base, "ratio": this / base}
                cells.append(cell)
                print(f"{policy} B={batch_size}: wall {cell['tokens_per_s']['ratio']:.3f}x, "
                      f"cpu {cell['tokens_per_cpu_s']['ratio']:.3f}x", file=sys.stderr,
                      flush=True)

    rows = [[c["policy"], str(c["batch_size"]),
             *(f"{c[m][k]:.1f}" if k != "ratio" else f"{c[m][k]:.3f}"
               for m in ("tokens_per_s", "tokens_per_cpu_s")
               for k in ("this", "baseline", "ratio"))] for c in cells]
    ratios = {m: statistics.geometric_mean(c[m]["ratio"] for c in cells)
              for m in ("tokens_per_s", "tokens_per_cpu_s")}
    rows.append(["all", "geomean", "", "", f"{ratios['tokens_per_s']:.3f}", "", "",
                 f"{ratios['tokens_per_cpu_s']:.3f}"])
    print_table(f"engine tokens/s: working tree ({head}+) vs {baseline}, median of "
                f"{args.repeats} alternating processes",
                ["policy", "B", "wall: this", "baseline", "ratio",
                 "per CPU s: this", "baseline", "ratio"], rows, args.format)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": dt.date.today().isoformat(), "machine": machine_info(),
            "head": head, "baseline": baseline, "workload": {
                "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                "runs_per_process": args.runs_per_process, "repeats": args.repeats},
            "geomean_ratio": ratios, "cells": cells}, indent=2))


if __name__ == "__main__":
    main()
