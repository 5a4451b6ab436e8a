#!/usr/bin/env python3
"""Live-migration downtime against context length (Llumnix Fig. 10): staged migration
against a blocking copy and against recomputation on the destination.

Two ``LLMEngine``s of the embedded default model (fp32, CPU, fcfs, the default pools) in
one process, torch limited to one thread (both engines share it). For each context length
``L`` a request of ``L - 12`` prompt tokens and exactly 12 greedy output tokens starts on
the source beside a short background request that decodes throughout; after 3 of its
decode steps it moves to the destination with each method:

* ``staged``: ``StagedMigration`` with the default ``MigrationConfig`` (3 stages, last
  stage at most 16 blocks), ``step()`` called between source steps until it returns, so the
  request keeps decoding during the stages before the last; downtime = ``downtime_s``;
* ``blocking_copy``: ``MigrationConfig(max_stages=1, last_stage_max_blocks=<all>)``: one
  stage that stops the request and copies every block; downtime = ``downtime_s``;
* ``recompute``: the source exports the request, the destination imports it without
  blocks and with nothing computed, so it prefills prompt + generated tokens again
  (chunked by ``max_num_batched_tokens`` = 512); downtime = from the stop until the
  destination produced the next token.

Block data crosses a copying transport as it would a process boundary: each rank's tensor
-> ``.numpy()`` -> ``pickle.dumps`` -> ``pickle.loads`` -> ``torch.from_numpy`` (the
snapshot is pickled too). "next token" is the time from the stop (for ``staged`` and
``blocking_copy``: from the start of the ``step()`` call that stopped it) until a
destination step returned the request's next token; the destination runs nothing else.
"decode step" is the median source step time of an unmoved run of the same request once
both requests decode. Every method's final tokens must equal the unmoved run's (greedy),
or the script fails. Each cell is the median of ``--repeats`` trials; in each repeat the
unmoved run and the three methods run one after another, in a rotating order.

Usage::

    .venv/bin/python benchmarks/bench_migration_downtime.py [--repeats 5]
        [--lengths 128 256 ...] [--out benchmarks/results/migration-downtime-2026-11-30.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import machine_info, print_table

from preemptserve.cluster.migration import MigrationConfig, MigrationStatus, StagedMigration
from preemptserve.config import EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine

NUM_OUTPUT = 12  # tokens the moved request generates in all
STEPS_BEFORE_MOVE = 3  # its decode steps on the source before the move starts
BACKGROUND = ([1] + [5 + 11 * i % 4000 for i in range(31)],
              SamplingParams(max_tokens=48, min_length=48, temperature=0.0))
METHODS = ("staged", "blocking_copy", "recompute")
TRANSPORT = "per rank: tensor.numpy() -> pickle.dumps -> pickle.loads -> torch.from_numpy"


def copying_transport(data):
    return [torch.from_numpy(pickle.loads(pickle.dumps(t.numpy(), protocol=5)))
            for t in data]


def prompt_of(length: int, vocab: int) -> list[int]:
    rng = random.Random(length)
    return [1] + [rng.randrange(3, vocab) for _ in range(length - NUM_OUTPUT - 1)]


def step(engine: LLMEngine, tokens: dict[str, list[int]]) -> list[str]:
    """One step; collect tokens; the ids of the requests that got one."""
    outputs = engine.step()
    for out in outputs:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return [out.request_id for out in outputs]


def start(source: LLMEngine, rid: str, prompt: list[int]) -> tuple[dict, list[float]]:
    """Background, then the request, on the source, up to the move; (tokens, times of the
    steps in which both decoded)."""
    tokens: dict[str, list[int]] = {}
    source.add_request(rid + "-bg", *BACKGROUND)
    step(source, tokens)  # the background's prefill
    source.add_request(rid, prompt, SamplingParams(max_tokens=NUM_OUTPUT,
                                                   min_length=NUM_OUTPUT, temperature=0.0))
    while not tokens.get(rid):
        step(source, tokens)  # the request's prefill, in chunks
    decode_s = []
    for _ in range(STEPS_BEFORE_MOVE):
        t0 = time.perf_counter()
        step(source, tokens)
        decode_s.append(time.perf_counter() - t0)
    return tokens, decode_s


def finish(source: LLMEngine, destination: LLMEngine, rid: str, tokens: dict) -> None:
    source.abort_request(rid + "-bg")
    for engine in (source, destination):
        while engine.has_unfinished_requests():
            step(engine, tokens)
        bm = engine.block_manager
        bm.commit_pending()
        assert bm.num_free_blocks == bm.num_blocks, "a block leaked"


def until_token(destination: LLMEngine, rid: str, tokens: dict) -> None:
    while rid not in step(destination, tokens):
        pass


def run_unmoved(source: LLMEngine, destination: LLMEngine, rid: str, prompt: list[int]):
    tokens, decode_s = start(source, rid, prompt)
    while len(tokens[rid]) < NUM_OUTPUT:
        t0 = time.perf_counter()
        step(source, tokens)
        decode_s.append(time.perf_counter() - t0)
    finish(source, destination, rid, tokens)
    return tokens[rid], {"decode_step_s": statistics.median(decode_s)}


def run_moved(method: str, source: LLMEngine, destination: LLMEngine, rid: str,
              prompt: list[int]):
    tokens, _ = start(source, rid, prompt)
    stats = {"context_tokens": len(prompt) + len(tokens[rid])}
    if method == "recompute":
        stopped = time.perf_counter()
        snapshot = pickle.loads(pickle.dumps(source.export_request(rid)))
        stats["blocks"] = snapshot.num_blocks
        destination.import_request(dataclasses.replace(snapshot, num_blocks=0,
                                                       num_computed_tokens=0))
        source.finish_export(rid)
        until_token(destination, rid, tokens)
        stats |= {"downtime_s": time.perf_counter() - stopped, "stages": 1,
                  "precopy_s": 0.0}
        stats["next_token_s"] = stats["downtime_s"]
    else:
        config = (MigrationConfig() if method == "staged" else
                  MigrationConfig(max_stages=1, last_stage_max_blocks=source.block_manager
                                  .num_blocks))
        migration = StagedMigration(source, destination, rid, config, copying_transport)
        precopy_s = 0.0
        while True:
            called = time.perf_counter()
            result = migration.step()
            if result is not None:
                break
            precopy_s += time.perf_counter() - called
            step(source, tokens)
        if result.status is not MigrationStatus.COMMITTED:
            raise RuntimeError(f"{method} at {len(prompt)} prompt tokens: {result}")
        until_token(destination, rid, tokens)
        stats |= {"downtime_s": result.downtime_s, "stages": result.num_stages,
                  "blocks": result.num_blocks, "bytes": result.num_bytes, "precopy_s": precopy_s,
                  "next_token_s": time.perf_counter() - called}
    finish(source, destination, rid, tokens)
    return tokens[rid], stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="context lengths (default: 128, 256, ... and max_model_len)")
    parser.add_argument("--format", choices=["rich", "plain", "markdown"], default="plain")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/migration-downtime-2026-11-30.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    def make() -> LLMEngine:
        return LLMEngine(EngineConfig(model_dir="default", device="cpu",
                                      scheduler=SchedulerConfig(policy="fcfs")))

    source, destination = make(), make()
    max_len = source.max_model_len
    lengths = args.lengths
    if lengths is None:
        lengths = [128 * 2**k for k in range(16) if 128 * 2**k < max_len] + [max_len]
    if max(lengths) > max_len or min(lengths) <= NUM_OUTPUT + 1:
        parser.error(f"lengths must be in ({NUM_OUTPUT + 1}, {max_len}]")
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info(torch=torch.__version__, torch_threads=1)
    print(f"{date}; torch {torch.__version__}, 1 thread; max_model_len {max_len}, block "
          f"size {source.block_manager.block_size}; transport: {TRANSPORT}", flush=True)

    run_unmoved(source, destination, "warmup", prompt_of(min(lengths), source.args.vocab_size))
    cells = []
    for length in lengths:
        prompt = prompt_of(length, source.args.vocab_size)
        samples: dict[str, list[dict]] = {m: [] for m in ("unmoved", *METHODS)}
        expected = None
        for rep in range(args.repeats):
            order = ["unmoved", *METHODS]
            order = order[rep % 4:] + order[:rep % 4]
            for method in order:
                rid = f"L{length}-{method}-{rep}"
                if method == "unmoved":
                    got, stats = run_unmoved(source, destination, rid, prompt)
                else:
                    got, stats = run_moved(method, source, destination, rid, prompt)
                if expected is None:
                    expected = got
                if got != expected or len(got) != NUM_OUTPUT:
                    sys.exit(f"FAIL: {method} at length {length} produced {got}, the "
                             f"{'unmoved run' if method != 'unmoved' else 'first run'} "
                             f"{expected}")
                samples[method].append(stats)
        med = {m: {k: statistics.median(s[k] for s in samples[m]) for k in samples[m][0]}
               for m in samples}
        cell = {"length": length, "prompt_tokens": len(prompt), "median": med,
                "samples": samples, "tokens_equal_unmoved": True}
        cells.append(cell)
        print(f"L={length}: decode {med['unmoved']['decode_step_s'] * 1e3:.1f} ms, " +
              ", ".join(f"{m} {med[m]['downtime_s'] * 1e3:.1f} ms" for m in METHODS),
              file=sys.stderr, flush=True)

    headers = ["length", "blocks", "decode step ms", "staged ms", "blocking copy ms",
               "recompute ms", "staged / decode step", "stages", "staged next tok ms",
               "blocking next tok ms", "staged pre-copy ms"]
    rows = []
    for c in cells:
        m = c["median"]
        ms = {k: m[k]["downtime_s"] * 1e3 for k in METHODS}
        decode_ms = m["unmoved"]["decode_step_s"] * 1e3
        rows.append([str(c["length"]), f"{m['blocking_copy']['blocks']:.0f}",
                     f"{decode_ms:.1f}", f"{ms['staged']:.1f}", f"{ms['blocking_copy']:.1f}",
                     f"{ms['recompute']:.1f}", f"{ms['staged'] / decode_ms:.2f}",
                     f"{m['staged']['stages']:g}",
                     f"{m['staged']['next_token_s'] * 1e3:.1f}",
                     f"{m['blocking_copy']['next_token_s'] * 1e3:.1f}",
                     f"{m['staged']['precopy_s'] * 1e3:.1f}"])
    print_table(f"migration downtime (ms), median of {args.repeats}; every method's tokens "
                "equal the unmoved run's", headers, rows, args.format)
    ratios = [c["median"]["staged"]["downtime_s"] / c["median"]["unmoved"]["decode_step_s"]
              for c in cells]
    print(f"staged downtime within 1.5 decode steps at every length: "
          f"{all(r <= 1.5 for r in ratios)} (max ratio {max(ratios):.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([".venv/bin/python", sys.argv[0], *sys.argv[1:]]),
        "date": date, "machine": {**machine, "load_average_1m_at_end": os.getloadavg()[0]},
        "setup": {"model": "embedded default", "policy": "fcfs", "device": "cpu",
                  "max_model_len": max_len, "block_size": source.block_manager.block_size,
                  "num_output_tokens": NUM_OUTPUT, "steps_before_move": STEPS_BEFORE_MOVE,
                  "transport": TRANSPORT, "repeats": args.repeats},
        "cells": cells}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
