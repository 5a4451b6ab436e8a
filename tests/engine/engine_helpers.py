"""Shared by the engine tests: small engines and a staggered-arrival driver."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import CacheMode, SamplingParams
from preemptserve.engine.kv_cache import bytes_per_block
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.model.args import LlamaArgs


def block_bytes(model_dir, block_size: int) -> int:
    return bytes_per_block(LlamaArgs.from_model_dir(model_dir), block_size, torch.float32)


def make_engine(model_dir, *, num_blocks: int, block_size: int = 16, max_num_tokens: int = 64,
                max_batch_size: int = 8) -> LLMEngine:
    """An fp32 CPU engine whose pool holds exactly ``num_blocks`` blocks."""
    kv_bytes = num_blocks * block_bytes(model_dir, block_size)
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), device="cpu",
        scheduler=SchedulerConfig(max_batch_size=max_batch_size,
                                  max_num_batched_tokens=max_num_tokens),
        cache=CacheConfig(kv_cache_bytes=kv_bytes, block_size=block_size),
    ))


def run_staggered(engine: LLMEngine, prompts: list[list[int]], num_tokens: int,
                  arrive_every: int,
                  cache_modes: Sequence[CacheMode] | None = None) -> dict[str, list[int]]:
    """Add one prompt every ``arrive_every`` steps; check block invariants every step.

    ``cache_modes``: the starting cache mode of each prompt (default: all KV).
    """
    sampling = SamplingParams(max_tokens=num_tokens, min_length=num_tokens)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % arrive_every == 0:
            index, prompt = pending.pop(0)
            mode = CacheMode.KV if cache_modes is None else cache_modes[index]
            engine.add_request(str(index), prompt, sampling, cache_mode=mode)
        for out in engine.step():
            outputs[out.request_id].extend(out.token_ids)
        engine.block_manager.check_invariants()
        step += 1
        assert step < 10_000, "engine did not finish"
    bm = engine.block_manager
    assert bm.num_free_blocks + bm.num_pending_blocks == bm.num_blocks
    assert bm.num_used_host_blocks == 0
    return outputs


def random_prompts(seed: int, lengths: list[int], vocab: int = 4096) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in lengths]


def swapping_simulation(policy: str, seed: int):  # -> preemptserve.sim.simulator.Simulator
    """A small simulated run that preempts, swaps and finishes requests (plans to check
    without a model: 60 ShareGPT-like requests in 8 MiB of device KV, 32 MiB on the host)."""
    from preemptserve.bench.workload import synthetic
    from preemptserve.sim.cost_model import IterationCostModel
    from preemptserve.sim.simulator import SimConfig, Simulator

    cost = IterationCostModel(
        fixed_s=0.005, per_prefill_token_s=2e-4, per_decode_token_s=1e-3,
        per_decode_context_token_s=1e-6, per_prefill_attention_s=1e-8,
        per_sampled_token_s=1e-4, swap_fixed_s=1e-4, swap_bytes_per_s=5e9,
        kv_bytes_per_token=32768, max_model_len=2048, hidden_recompute_s_per_block=1e-5,
    )
    params = {"scheduler_policy": policy, "kv_cache_bytes": str(8 * 2**20),
              "kv_cache_host_memory_bytes": str(32 * 2**20), "max_batch_size": "16",
              "max_num_tokens": "256"}
    workload = synthetic("sharegpt", 60, rate_rps=20.0, seed=seed, length_scale=0.3,
                         max_context_tokens=256)
    return Simulator(SimConfig.from_parameters(params, cost), cost, workload)
