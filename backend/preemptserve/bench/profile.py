"""Profile this machine's engine and fit the simulator's cost model (imports torch).

Three measurements, none taken on the workloads the model is later judged on:

1. In process: ``LLMEngine.step()`` timed over varied batches (lone prefills, decode
   batches of 1 to 32 requests at several contexts, a random mix), each step's plan
   recorded; the iteration coefficients are fitted to these ``(shape, seconds)`` pairs.
2. In process: swap-out and swap-in copies of 1 to 64 blocks -> fixed + bytes/bandwidth.
3. Through a real ``tritonserver`` (optional, ``--server``): the iterations as served.
   The server writes every iteration (``iteration_stats_path``) while it runs profiling
   workloads of its own; the iteration coefficients are refitted to those loop periods
   (the in-process fit misses what serving adds: Triton, the response thread and the
   client share the cores), and the spread of measured / modelled periods and its lag-1
   autocorrelation become the simulator's noise. Lone short requests give the request
   latency (client TTFT - modelled prefill).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import serving_config_from_parameters
from ..core.request import SamplingParams
from ..core.scheduler import BlockSwap, SchedulerOutput
from ..engine.iteration_stats import read_iteration_log, read_log_when_idle
from ..engine.llm_engine import LLMEngine
from ..engine.profiling import measure_hidden_recompute_cost
from ..sim.cost_model import BatchShape, IterationCostModel, batch_shape
from ..sim.fit import (
    LONE_PROMPTS,
    fit_iteration_coefficients,
    fit_quality,
    fit_serving,
    fit_swap,
)
from .workload import RequestSpec, Workload

logger = logging.getLogger(__name__)

PREFILL_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_PROMPTS = (16, 128, 384)
SWAP_BLOCKS = (1, 4, 16, 64)
# The server profile's own workloads (kind, requests, rate, length scale, seed): short
# Alpaca-like requests in small batches, then longer ShareGPT-like ones that fill the KV
# cache (preemptions, long contexts). Never the workloads a profile is judged on.
PROFILE_WORKLOADS = (
    ("alpaca", 80, 2.5, 1.0, 12_345),
    ("sharegpt", 60, 3.0, 0.3, 12_346),
)


def _engine(parameters: Mapping[str, str], kv_cache_bytes: int) -> LLMEngine:
    params = {
        **parameters,
        "scheduler_policy": "fcfs",
        "kv_cache_bytes": str(kv_cache_bytes),
        "kv_cache_host_memory_bytes": str(kv_cache_bytes // 2),
    }
    return LLMEngine(serving_config_from_parameters(params).engine)


def measure_steps(
    engine: LLMEngine, seed: int = 0, repeats: int = 2
) -> list[tuple[BatchShape, float]]:
    """``(shape, seconds)`` of every non-empty ``step()`` over the profiling scenarios."""
    plans: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    vocab = engine.args.vocab_size
    samples: list[tuple[BatchShape, float]] = []
    counter = iter(range(10**9))

    def add(prompt_tokens: int, output_tokens: int) -> None:
        ids = [1, *rng.integers(3, vocab, prompt_tokens - 1).tolist()]
        engine.add_request(
            f"p{next(counter)}",
            ids,
            SamplingParams(max_tokens=output_tokens, min_length=output_tokens, temperature=0.0),
        )

    def run(arrivals: Callable[[], None] | None = None) -> None:
        while engine.has_unfinished_requests():
            if arrivals is not None:
                arrivals()
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if not plans[-1].is_empty:
                samples.append((batch_shape(plans[-1]), elapsed))

    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
    for _ in range(repeats):
        for n in PREFILL_LENGTHS:
            add(n, 1)
            run()
        for prompt in DECODE_PROMPTS:
            for batch in DECODE_BATCHES:
                if batch * (prompt + 16) <= capacity:
                    for _ in range(batch):
                        add(prompt, 16)
                    run()

        def mixed() -> None:
            if rng.random() < 0.3 and engine.num_unfinished_requests() < 24:
                add(int(rng.integers(4, 256)), int(rng.integers(2, 64)))

        add(64, 32)
        steps = 0

        def mixed_for_a_while() -> None:
            nonlocal steps
            steps += 1
            if steps < 300:
                mixed()

        run(arrivals=mixed_for_a_while)
    del engine.scheduler.schedule
    return samples[5:]  # the first steps warm up allocators and caches


def measure_swaps(engine: LLMEngine, repeats: int = 3) -> list[tuple[int, float]]:
    """``(bytes, seconds)`` of swap-outs and swap-ins of a dummy request's blocks."""
    bm, swapper = engine.block_manager, engine.swapper
    block_bytes = swapper.block_bytes
    samples = []
    for num_blocks in SWAP_BLOCKS:
        for _ in range(repeats):
            allocated = bm.allocate("__swap__", num_blocks * bm.block_size)
            if not allocated:
                raise RuntimeError(f"swap profile: no room for {num_blocks} device blocks")
            for direction in ("out", "in"):
                pairs = (
                    bm.swap_out("__swap__", reuse_now=True)
                    if direction == "out"
                    else bm.swap_in("__swap__")
                )
                if pairs is None:
                    raise RuntimeError(
                        f"swap profile: no room to swap {num_blocks} blocks {direction}")
                swap = (BlockSwap("__swap__", tuple(pairs), blocking=True),)
                plan = SchedulerOutput(
                    0,
                    (),
                    swap_out=swap if direction == "out" else (),
                    swap_in=swap if direction == "in" else (),
                )
                start = time.perf_counter()
                swapper.execute(plan)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)  # the copies, not their issue
                samples.append((num_blocks * block_bytes, time.perf_counter() - start))
            bm.free("__swap__")
            bm.commit_pending()
    return samples


def profile_engine(
    parameters: Mapping[str, str], torch_threads: int = 1, kv_cache_bytes: int = 256 * 2**20
) -> tuple[IterationCostModel, dict]:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    engine = _engine(parameters, kv_cache_bytes)
    load_before = os.getloadavg()[0]
    steps = measure_steps(engine)
    swaps = measure_swaps(engine)
    # apt's hybrid cache: what keeping a block of context as hidden states costs a step.
    recompute_s = (measure_hidden_recompute_cost(engine.executor, engine.block_manager,
                                                 max_context_len=engine.max_model_len)
                   if engine.block_manager.supports_hidden else None)
    coefficients = fit_iteration_coefficients(steps)
    swap_fixed_s, swap_bytes_per_s = fit_swap(swaps)
    model = IterationCostModel(
        **coefficients,
        swap_fixed_s=swap_fixed_s,
        swap_bytes_per_s=swap_bytes_per_s,
        swap_overlaps_compute=engine.device.type == "cuda",
        kv_bytes_per_token=engine.kv_bytes_per_token,
        max_model_len=engine.args.max_position_embeddings,
        hidden_recompute_s_per_block=recompute_s,
    )
    ratios = np.array([t / model.iteration_time_s(s) for s, t in steps])
    model = model.with_coefficients(
        noise_quantiles=tuple(float(q) for q in np.quantile(ratios, np.linspace(0, 1, 41)))
    )
    quality = fit_quality(ratios)
    facts = {
        "num_step_samples": len(steps),
        "num_swap_samples": len(swaps),
        "measured_over_model": quality["measured_over_model"],
        "step_fit_relative_error": quality["relative_error"],
        "torch_threads": torch.get_num_threads(),
        "device": str(engine.device),
        "load_average_1m": [load_before, os.getloadavg()[0]],
    }
    logger.info("engine fit: %s; %s", coefficients, facts["step_fit_relative_error"])
    return model, facts


def profile_serving(
    model: IterationCostModel,
    grpc_url: str,
    prompts: Any,
    parameters: Mapping[str, str],
    iteration_logs: Sequence[Path],
    block_bytes: int,
) -> tuple[IterationCostModel, dict[str, Any]]:
    """Measure what serving adds, against a running ``fcfs`` server whose engine
    instances write their iterations to ``iteration_logs`` (one per instance; module
    docstring).

    1. Lone requests: client TTFT - modelled prefill = the request latency.
    2. The profiling workloads (``PROFILE_WORKLOADS``: their own seeds, never a workload
       the model is judged on) through the server, their rates times the number of
       instances; the iteration coefficients, the spread and its autocorrelation are
       fitted to the instances' iterations. With several instances on one machine the
       fit is one instance's iteration while the others run beside it.
    """
    from .loadgen import run_open_loop
    from .workload import synthetic

    def run(w: Workload) -> list[Any]:
        texts = prompts.prompts([r.input_tokens for r in w.requests], seed=len(w))
        timelines, _ = run_open_loop(grpc_url, w, texts, progress=False)
        return timelines

    def burst(n_in: int, n_out: int) -> Any:
        return run(Workload("calibration", (RequestSpec(0, 0.0, n_in, n_out),)))[0]

    for _ in range(3):
        burst(16, 8)  # warm-up
    skip = [len(list(read_iteration_log(p))) if p.exists() else 0 for p in iteration_logs]
    lone_ttfts = [(n, burst(n, 2).ttft_s) for n in LONE_PROMPTS for _ in range(3)]
    max_context = serving_config_from_parameters(parameters).engine.max_model_len or (
        model.max_model_len)
    workloads = []
    for kind, num_requests, rate, length_scale, seed in PROFILE_WORKLOADS:
        workloads.append(synthetic(kind, num_requests * len(iteration_logs),
                                   rate * len(iteration_logs), seed=seed,
                                   length_scale=length_scale, max_context_tokens=max_context))
        run(workloads[-1])
    per_instance = [read_log_when_idle(p)[n:] for p, n in zip(iteration_logs, skip, strict=True)]
    fitted, facts = fit_serving(model, per_instance, block_bytes, lone_ttfts)
    facts |= {
        "log_skip": skip,
        "profiling_workloads": [w.describe() for w in workloads],
        "in_process_over_served": {
            f"prefill_{n}": model.prefill_time_s(n) / fitted.prefill_time_s(n)
            for n in (16, 256)
        },
        "load_average_1m": os.getloadavg()[0],
    }
    logger.info("serving profile: %s", facts)
    return fitted, facts


def save_profile(model: IterationCostModel, path: Path, source: dict[str, Any]) -> Path:
    final = dataclasses.replace(model, source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    final.save(path)
    return path
