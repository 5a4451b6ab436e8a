"""skip_join_mlfq on the real engine: preempted, offloaded, recomputed, still exact."""

from __future__ import annotations

import pytest
from engine_helpers import block_bytes, random_prompts, run_staggered

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.engine.llm_engine import LLMEngine

BLOCK_SIZE = 8


def make_mlfq_engine(model_dir, num_blocks: int, num_host_blocks: int) -> LLMEngine:
    block = block_bytes(model_dir, BLOCK_SIZE)
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), device="cpu",
        scheduler=SchedulerConfig(policy="skip_join_mlfq", max_batch_size=3,
                                  max_num_batched_tokens=64,
                                  options={"base_quantum_s": 0.005,
                                           "kv_reserve_fraction": 0.15,
                                           # No promotion: the slow CPU steps would promote
                                           # every waiting job, and promoted jobs keep
                                           # their level.
                                           "starvation_threshold_s": 600.0}),
        cache=CacheConfig(kv_cache_bytes=num_blocks * block, block_size=BLOCK_SIZE,
                          host_kv_cache_bytes=num_host_blocks * block),
    ))


@pytest.mark.parametrize(("num_host_blocks", "expect"), [(40, "swaps"), (0, "recompute")])
def test_preempted_offloaded_requests_match_transformers(default_model_dir, reference_factory,
                                                         num_host_blocks, expect):
    engine = make_mlfq_engine(default_model_dir, num_blocks=20,
                              num_host_blocks=num_host_blocks)
    prompts = random_prompts(1, [30, 22, 45, 12, 37, 28, 9, 50])
    num_tokens = 24
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=2)
    scheduler = engine.scheduler
    assert scheduler.num_preemptions_total > 0 and scheduler.num_demotions > 0
    if expect == "swaps":
        assert engine.scheduler.num_swap_outs > 0
        assert engine.scheduler.num_swap_ins > 0
    else:
        assert scheduler.num_recomputations_total > 0
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


def test_a_simulator_profile_serves_as_the_engines_cost_model(default_model_dir, tmp_path):
    """``prefill_profile_path`` may name a ``bench profile`` cost model: the server's
    policies then weigh exactly the costs the simulator's do, nothing measured at startup."""
    from preemptserve.sim.cost_model import IterationCostModel

    model = IterationCostModel(fixed_s=0.01, per_prefill_token_s=1e-4, per_sampled_token_s=1e-3,
                               kv_bytes_per_token=1, hidden_recompute_s_per_block=0.004)
    path = tmp_path / "cost-model.json"
    model.save(path)
    for policy in ("skip_join_mlfq", "apt"):
        engine = LLMEngine(EngineConfig(
            model_dir=str(default_model_dir), device="cpu", prefill_profile_path=str(path),
            scheduler=SchedulerConfig(policy=policy),
            cache=CacheConfig(kv_cache_bytes=64 * 2**20),
        ))
        assert engine.cost_model == model
        assert engine.cost_model.prefill_time_s(100) == pytest.approx(0.01 + 0.01 + 0.001)
    assert engine.scheduler.recompute_s_per_block == 0.004
