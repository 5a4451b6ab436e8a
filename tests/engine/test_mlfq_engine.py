"""skip_join_mlfq on the real engine: preempted, offloaded, recomputed, still exact."""

from __future__ import annotations

import random

import pytest
import torch

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.request import SamplingParams
from preemptserve.engine.kv_cache import bytes_per_block
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.model.args import LlamaArgs

BLOCK_SIZE = 8


def make_mlfq_engine(model_dir, num_blocks: int, num_host_blocks: int) -> LLMEngine:
    block_bytes = bytes_per_block(LlamaArgs.from_model_dir(model_dir), BLOCK_SIZE,
                                  torch.float32)
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), device="cpu",
        scheduler=SchedulerConfig(policy="skip_join_mlfq", max_batch_size=3,
                                  max_num_batched_tokens=64, mlfq_base_quantum_s=0.005,
                                  kv_reserve_fraction=0.15),
        cache=CacheConfig(kv_cache_bytes=num_blocks * block_bytes, block_size=BLOCK_SIZE,
                          host_kv_cache_bytes=num_host_blocks * block_bytes),
    ))


@pytest.mark.parametrize(("num_host_blocks", "expect"), [(40, "swaps"), (6, "recompute")])
def test_preempted_offloaded_requests_match_transformers(default_model_dir, reference_factory,
                                                         num_host_blocks, expect):
    engine = make_mlfq_engine(default_model_dir, num_blocks=20,
                              num_host_blocks=num_host_blocks)
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 4096) for _ in range(n - 1)]
               for n in (30, 22, 45, 12, 37, 28, 9, 50)]
    num_tokens = 24
    sampling = SamplingParams(max_tokens=num_tokens, min_length=num_tokens)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, sampling)
        for out in engine.step():
            outputs[out.request_id].extend(out.token_ids)
        engine.block_manager.check_invariants()
        step += 1
        assert step < 5000, "the engine did not finish"
    scheduler = engine.scheduler
    assert scheduler.num_preemptions_total > 0 and scheduler.num_demotions > 0
    if expect == "swaps":
        assert engine.swapper.stats.num_swap_outs > 0
        assert engine.swapper.stats.num_swap_ins > 0
    else:
        assert scheduler.num_recomputations_total > 0
    bm = engine.block_manager
    assert bm.num_free_blocks + bm.num_pending_blocks == bm.num_blocks
    assert bm.num_used_host_blocks == 0
    reference = reference_factory(default_model_dir)
    for index, prompt in enumerate(prompts):
        assert outputs[str(index)] == reference.greedy(prompt, num_tokens), f"prompt {index}"


def test_prefill_profile_is_measured_saved_and_loaded(default_model_dir, tmp_path):
    engine = make_mlfq_engine(default_model_dir, num_blocks=64, num_host_blocks=0)
    profile = engine.cost_model
    assert isinstance(profile, PrefillProfile)
    lengths = [n for n, _ in profile.points]
    assert len(lengths) >= 2 and lengths == sorted(lengths) and lengths[-1] <= 64
    assert all(t > 0 for _, t in profile.points)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = LLMEngine(EngineConfig(
        model_dir=str(default_model_dir), device="cpu", prefill_profile_path=str(path),
        scheduler=SchedulerConfig(policy="skip_join_mlfq"),
        cache=CacheConfig(kv_cache_bytes=64 * 2**20),
    ))
    assert loaded.cost_model == profile
