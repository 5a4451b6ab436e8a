"""Greedy tokens of the batched, paged, preempting engine equal transformers' one by one."""

from __future__ import annotations

import pytest
from engine_helpers import make_engine, random_prompts, run_staggered

from preemptserve.core.request import SamplingParams


@pytest.mark.parametrize("model", ["default", "gqa"])
def test_batched_paged_greedy_matches_transformers(model, default_model_dir, gqa_model_dir,
                                                   reference_factory):
    model_dir = default_model_dir if model == "default" else gqa_model_dir
    prompts = random_prompts(0, [7, 40, 3, 95, 18, 61, 1, 33])
    num_tokens = 12
    # 4-token blocks and a 40-token budget: chunked prefills and many block boundaries.
    engine = make_engine(model_dir, num_blocks=128, block_size=4, max_num_tokens=40)
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=2)
    reference = reference_factory(model_dir)
    for index, prompt in enumerate(prompts):
        assert outputs[str(index)] == reference.greedy(prompt, num_tokens), f"prompt {index}"


def test_preempted_requests_recompute_to_identical_tokens(default_model_dir, reference_factory):
    prompts = random_prompts(1, [30, 22, 45, 12, 37, 28])
    num_tokens = 24
    # 14 blocks of 8 tokens cannot hold six requests of ~60 tokens: preemption is forced.
    engine = make_engine(default_model_dir, num_blocks=14, block_size=8, max_num_tokens=96)
    outputs = run_staggered(engine, prompts, num_tokens, arrive_every=1)
    assert engine.scheduler.num_recomputations_total > 0
    reference = reference_factory(default_model_dir)
    for index, prompt in enumerate(prompts):
        assert outputs[str(index)] == reference.greedy(prompt, num_tokens), f"prompt {index}"


def test_seeded_sampling_is_reproducible_and_batch_independent(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64)
    sampling = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    alone = engine.generate(["The value of x"], sampling)[0]
    crowd = engine.generate(["Other text"] * 3 + ["The value of x"], sampling)[3]
    assert alone == crowd
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=99)
    assert engine.generate(["The value of x"], other_seed)[0] != alone


def test_min_length_forces_length_and_end_id_stops(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64)
    prompt = engine.tokenizer.encode("Return a list")
    free_run = run_staggered(engine, [prompt], 6, arrive_every=1)["0"]
    # Declare the 3rd greedy token the end id: generation stops right there...
    end_id = free_run[2]
    engine.add_request("stop", prompt, SamplingParams(max_tokens=6, end_id=end_id))
    got: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.extend(out.token_ids)
            last = out
    assert got == free_run[:3] and last.finish_reason == "stop"
    # ...unless min_length forbids it, which forces exactly max_tokens tokens.
    engine.add_request("min", prompt, SamplingParams(max_tokens=6, min_length=6, end_id=end_id))
    got = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.extend(out.token_ids)
            last = out
    assert len(got) == 6 and end_id not in got and last.finish_reason == "length"


def test_stop_words_cut_the_text(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64)
    sampling = SamplingParams(max_tokens=24)
    full = engine.generate(["Return the"], sampling)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = engine.generate(["Return the"], SamplingParams(max_tokens=24, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)]


def test_bad_requests_raise_value_error(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64)
    with pytest.raises(ValueError, match="exceeds the maximum context"):
        engine.add_request("long", [1] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.add_request("vocab", [1, 10**6], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="end_id"):
        engine.add_request("end", [1, 5], SamplingParams(max_tokens=4, end_id=-3))
    assert not engine.has_unfinished_requests()


def test_abort_returns_blocks(default_model_dir):
    engine = make_engine(default_model_dir, num_blocks=64)
    engine.add_request("a", [1] * 20, SamplingParams(max_tokens=50))
    engine.add_request("b", [1] * 20, SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    engine.abort_request("b")
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()
