"""Hidden-cache mode (Apt-Serve) on the real engine: exact, mixed with KV, half the blocks."""

from __future__ import annotations

import logging
import math

import pytest
from engine_helpers import block_bytes, make_engine, random_prompts, run_staggered

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import CacheMode, SamplingParams
from preemptserve.engine.kv_cache import hidden_tokens_per_block
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.engine.profiling import measure_hidden_recompute_cost
from preemptserve.model.args import LlamaArgs

H, K = CacheMode.HIDDEN, CacheMode.KV


def check_against_reference(outputs, prompts, num_tokens, reference) -> None:
    for index, prompt in enumerate(prompts):
        assert outputs[str(index)] == reference.greedy(prompt, num_tokens), f"prompt {index}"


def record_calls(monkeypatch, obj, name: str, record) -> None:
    """Wrap ``obj.name`` so every call then runs ``record(result, *args)``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record(result, *args)
        return result

    monkeypatch.setattr(obj, name, wrapper)


# Each prompt runs once in each mode across the two cases; the long ones (40, 95, 61
# tokens) are chunked by the 40-token budget in both modes.
@pytest.mark.parametrize("modes", [(K, H, K, H, H, K, H, K), (H, K, H, K, K, H, K, H)])
def test_mixed_modes_in_one_batch_match_transformers(modes, default_model_dir,
                                                     reference_factory):
    prompts = random_prompts(0, [7, 40, 3, 95, 18, 61, 1, 33])
    num_tokens = 12
    engine = make_engine(default_model_dir, num_blocks=128, block_size=4, max_num_tokens=40)
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=2, cache_modes=modes)
    check_against_reference(outputs, prompts, num_tokens, reference_factory(default_model_dir))
    stats = engine.get_stats()
    assert stats.num_preemptions_total == 0
    # Every token of a hidden request but its last sampled one went through the model.
    assert stats.num_hidden_tokens_total == sum(
        len(p) + num_tokens - 1 for p, m in zip(prompts, modes, strict=True) if m is H)
    assert stats.num_mixed_mode_steps_total > 0
    assert stats.num_blocks_used == 0


def test_hidden_requests_preempted_by_recompute_stay_exact(default_model_dir,
                                                           reference_factory, monkeypatch):
    prompts = random_prompts(1, [30, 22, 45, 12, 37, 28])
    num_tokens = 24
    modes = (H, H, K, H, K, H)
    # 9 blocks of 8 tokens (a hidden block holds 16) cannot hold six ~60-token requests.
    engine = make_engine(default_model_dir, num_blocks=9, block_size=8, max_num_tokens=96)
    requests = []
    record_calls(monkeypatch, engine.scheduler, "add_request",
                 lambda _, request: requests.append(request))
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=1, cache_modes=modes)
    assert any(r.hidden and r.num_preemptions for r in requests)  # fcfs: all recomputed
    assert all(r.hidden == (m is H) for r, m in zip(requests, modes, strict=True))
    check_against_reference(outputs, prompts, num_tokens, reference_factory(default_model_dir))


def test_hidden_requests_swapped_to_host_and_back_stay_exact(default_model_dir,
                                                             reference_factory, monkeypatch):
    block = block_bytes(default_model_dir, 8)
    engine = LLMEngine(EngineConfig(
        model_dir=str(default_model_dir), device="cpu",
        scheduler=SchedulerConfig(policy="skip_join_mlfq", max_batch_size=3,
                                  max_num_batched_tokens=64,
                                  options={"base_quantum_s": 0.005,
                                           "kv_reserve_fraction": 0.15}),
        cache=CacheConfig(kv_cache_bytes=12 * block, block_size=8,
                          host_kv_cache_bytes=40 * block),
    ))
    prompts = random_prompts(1, [30, 22, 45, 12, 37, 28, 9, 50])
    modes = (H, K, H, H, K, H, H, K)
    num_tokens = 24
    bm = engine.block_manager
    swapped: dict[str, list[str]] = {"out": [], "in": []}

    def record_swap(name: str, pairs, request_id: str, *_) -> None:
        if pairs is not None and bm.is_hidden(request_id):
            swapped[name].append(request_id)

    for name in swapped:
        record_calls(monkeypatch, bm, f"swap_{name}",
                     lambda pairs, *args, name=name: record_swap(name, pairs, *args))
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=2, cache_modes=modes)
    assert swapped["out"] and swapped["in"], "no hidden-mode request went to host and back"
    check_against_reference(outputs, prompts, num_tokens, reference_factory(default_model_dir))


def test_a_hidden_request_takes_half_the_blocks(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=32, block_size=8, max_num_tokens=128)
    prompt = random_prompts(2, [41])[0]
    engine.add_request("kv", prompt, SamplingParams(max_tokens=4))
    engine.add_request("hidden", prompt, SamplingParams(max_tokens=4), cache_mode=H)
    engine.step()  # both prefills, one token sampled each
    bm = engine.block_manager
    assert bm.num_device_blocks_of("kv") == 6  # ceil(41 / 8)
    assert bm.num_device_blocks_of("hidden") == 3  # ceil(41 / 16)
    assert bm.is_hidden("hidden") and not bm.is_hidden("kv")
    while engine.has_unfinished_requests():
        engine.step()
    bm.check_invariants()
    assert bm.num_used_blocks == 0


def test_bytes_per_token_of_both_modes_are_reported(default_model_dir):
    stats = make_engine(default_model_dir, num_blocks=8).get_stats()
    args = LlamaArgs.from_model_dir(default_model_dir)  # MHA: 8 layers, hidden 512, fp32
    assert stats.kv_bytes_per_token == 2 * args.num_layers * args.hidden_size * 4 == 32768
    assert stats.hidden_bytes_per_token == args.num_layers * args.hidden_size * 4 == 16384
    assert stats.hidden_mode_available


def test_gqa_model_refuses_hidden_mode_with_a_logged_reason(gqa_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="preemptserve.engine.llm_engine"):
        engine = make_engine(gqa_model_dir, num_blocks=16)
    assert "hidden mode unavailable: grouped-query attention" in caplog.text
    stats = engine.get_stats()
    # 3 layers; K+V: 2 heads of 32 each, 128 values; hidden state: 256 values.
    assert (stats.kv_bytes_per_token, stats.hidden_bytes_per_token) == (1536, 3072)
    assert not stats.hidden_mode_available and not engine.block_manager.supports_hidden
    with pytest.raises(ValueError, match="hidden cache mode is unavailable.*grouped-query"):
        engine.add_request("h", [1, 5, 9], SamplingParams(max_tokens=2), cache_mode=H)
    assert not engine.has_unfinished_requests()
    engine.add_request("kv", [1, 5, 9], SamplingParams(max_tokens=2))  # KV mode still works
    with pytest.raises(ValueError, match="no hidden-cache mode"):
        measure_hidden_recompute_cost(engine.runner, engine.block_manager, 64)


def test_hidden_mode_availability_by_shape_and_tensor_parallelism():
    mha = LlamaArgs(vocab_size=64, hidden_size=512, intermediate_size=64, num_layers=2,
                    num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=64)
    assert hidden_tokens_per_block(mha, 16) == (32, "")
    count, reason = hidden_tokens_per_block(mha, 16, tp_size=2)
    assert count == 0 and "tensor parallelism (TP=2)" in reason
    # Wide heads: K+V (2 * 768 values) outweigh the hidden state, but the blocks' rows
    # (768 values) do not match it, so this layout cannot hold it.
    wide = LlamaArgs(vocab_size=64, hidden_size=512, intermediate_size=64, num_layers=2,
                     num_heads=8, num_kv_heads=8, head_dim=96, max_position_embeddings=64)
    count, reason = hidden_tokens_per_block(wide, 16)
    assert count == 0 and "num_kv_heads * head_dim (768) == hidden_size (512)" in reason


def test_recompute_cost_is_measured_and_blocks_return(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=128, block_size=8)
    cost_s = measure_hidden_recompute_cost(engine.runner, engine.block_manager,
                                           max_context_len=engine.max_model_len,
                                           context_lens=(64, 128, 256), batch_size=2,
                                           repeats=5)
    assert cost_s > 0 and math.isfinite(cost_s)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0
