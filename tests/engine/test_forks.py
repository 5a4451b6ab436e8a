"""Several sequences of one prompt share its prefill and KV blocks (``fork_of``), and each
gets exactly what it gets alone."""

from __future__ import annotations

import pytest
from engine_helpers import block_bytes, make_engine, random_prompts

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine

BLOCK = 4
PROMPT = random_prompts(5, [23])[0]  # 22 tokens computed by the first: 5 shared blocks
SAMPLED = [SamplingParams(max_tokens=10, min_length=10, temperature=0.8, top_k=30,
                          seed=100 + i) for i in range(4)]


def drain(engine, check=True) -> tuple[dict[str, list[int]], dict]:
    tokens: dict[str, list[int]] = {}
    last = {}
    max_used = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            last[out.request_id] = out
        max_used = max(max_used, engine.block_manager.num_used_blocks)
        if check:
            engine.block_manager.check_invariants()
    last["max_used"] = max_used
    return tokens, last


def add_group(engine, prompt, params, prefix="s", **kwargs):
    for i, sampling in enumerate(params):
        engine.add_request(f"{prefix}{i}", prompt, sampling,
                           fork_of=None if i == 0 else f"{prefix}0", **kwargs)


@pytest.fixture(scope="module")
def alone(default_model_dir):
    """Each sequence's tokens when it runs alone, no sharing."""
    engine = make_engine(default_model_dir, num_blocks=64, block_size=BLOCK)
    out = {}
    for i, sampling in enumerate(SAMPLED):
        engine.add_request(f"s{i}", PROMPT, sampling)
        out[f"s{i}"] = drain(engine)[0][f"s{i}"]
    return out


def test_sequences_share_the_prompt_and_match_running_alone(default_model_dir, alone):
    engine = make_engine(default_model_dir, num_blocks=64, block_size=BLOCK)
    add_group(engine, PROMPT, SAMPLED, return_perf_metrics=True)
    tokens, last = drain(engine)
    assert tokens == alone
    assert len(set(map(tuple, tokens.values()))) > 1  # seeded differently: they differ
    shared = (len(PROMPT) - 1) // BLOCK
    assert engine.get_stats().num_shared_blocks_total == 3 * shared
    assert last["s0"].metrics.num_blocks_reused == 0
    for i in (1, 2, 3):
        metrics = last[f"s{i}"].metrics
        assert metrics.num_blocks_reused == shared
        assert metrics.num_blocks_total == -(-(len(PROMPT) + 9) // BLOCK)
        assert metrics.num_blocks_new == metrics.num_blocks_total - shared
    # Four sequences on their own would hold 4 x 8 blocks at their longest.
    assert last["max_used"] == 8 + 3 * (8 - shared)
    assert engine.block_manager.num_free_blocks == 64


def test_greedy_sequences_are_the_same(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64, block_size=BLOCK)
    greedy = [SamplingParams(max_tokens=6, min_length=6)] * 3
    add_group(engine, PROMPT, greedy)
    tokens, _ = drain(engine)
    assert tokens["s0"] == tokens["s1"] == tokens["s2"]


def test_cancelled_sequences_before_and_after_the_fork(default_model_dir, alone):
    engine = make_engine(default_model_dir, num_blocks=64, block_size=BLOCK)
    add_group(engine, PROMPT, SAMPLED)
    # A waiting sequence cancelled: it never starts.
    assert engine.abort_request("s3").finish_reason == "abort"
    # The first sequence cancelled before its prefill: the others start on their own.
    assert engine.abort_request("s0").finish_reason == "abort"
    tokens, _ = drain(engine)
    assert tokens == {"s1": alone["s1"], "s2": alone["s2"]}
    assert engine.get_stats().num_shared_blocks_total == 0


def test_no_free_block_for_the_copy_starts_the_sequence_alone(default_model_dir, alone):
    # 9 blocks: another request holds one, the first sequence's prompt takes 6; two
    # sequences fork (a copied block each), the third finds no block and starts alone.
    engine = make_engine(default_model_dir, num_blocks=9, block_size=BLOCK, max_num_tokens=64)
    engine.add_request("hog", [1, 2, 3], SamplingParams(max_tokens=20, min_length=20))
    add_group(engine, PROMPT, SAMPLED)
    tokens, _ = drain(engine)
    assert {k: v for k, v in tokens.items() if k != "hog"} == alone
    assert engine.get_stats().num_shared_blocks_total == 2 * ((len(PROMPT) - 1) // BLOCK)
    assert engine.block_manager.num_free_blocks == 9


@pytest.mark.parametrize("policy", ["fcfs", "skip_join_mlfq", "apt"])
def test_every_policy_runs_forked_sequences_under_preemption(default_model_dir, alone,
                                                             tmp_path, policy):
    """A pool too small for all: preemption (by recomputation, or swaps) of sequences
    holding shared blocks, and their outputs still match."""
    profile = tmp_path / "profile.json"
    PrefillProfile(((4, 0.001), (64, 0.01)), hidden_recompute_s_per_block=1e-4).save(profile)
    block = block_bytes(default_model_dir, BLOCK)
    engine = LLMEngine(EngineConfig(
        model_dir=str(default_model_dir), device="cpu", prefill_profile_path=str(profile),
        scheduler=SchedulerConfig(policy=policy, max_batch_size=4, max_num_batched_tokens=32),
        cache=CacheConfig(kv_cache_bytes=18 * block, block_size=BLOCK,
                          host_kv_cache_bytes=16 * block)))
    add_group(engine, PROMPT, SAMPLED)
    other = random_prompts(9, [30])[0]
    engine.add_request("other", other, SamplingParams(max_tokens=12, min_length=12))
    tokens, _ = drain(engine)
    assert {k: v for k, v in tokens.items() if k != "other"} == alone
    assert len(tokens["other"]) == 12
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
