"""TensorRT-LLM's sampling features in the engine, checked against references.

Log probs and logits against transformers' ``LlamaForCausalLM`` on the same checkpoint;
repetition penalty, temperature, top-k and banned words through transformers' own logits
processors; presence and frequency penalties through a small reference written from
their definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import make_engine, random_prompts

from preemptserve.core.request import SamplingParams
from preemptserve.engine.sampler import process_logits

PROMPT = [1, 523, 97, 1804, 3001, 77, 250, 12, 999, 3000, 41]


def run(engine, prompt, sampling, request_id="r", **kwargs):
    """Run one request alone; returns (tokens, outputs)."""
    engine.add_request(request_id, prompt, sampling, **kwargs)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
        engine.block_manager.check_invariants()
    return [t for out in outputs for t in out.token_ids], outputs


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return make_engine(default_model_dir, num_blocks=64, block_size=4, max_num_tokens=8)


@pytest.fixture(scope="module")
def hf(reference_factory, default_model_dir):
    return reference_factory(default_model_dir).model


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits at every position of ``token_ids``: [len, vocab]."""
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()


def presence_frequency_reference(logits, seen_ids, presence, frequency):
    """From the definitions: subtract ``presence`` once for every token seen and
    ``frequency`` once per occurrence."""
    out = logits.clone()
    for token in set(seen_ids):
        out[token] -= presence + frequency * seen_ids.count(token)
    return out


def test_greedy_log_probs_and_logits_match_transformers(engine, hf):
    sampling = SamplingParams(max_tokens=10, min_length=10, return_log_probs=True,
                              return_context_logits=True, return_generation_logits=True)
    tokens, outputs = run(engine, PROMPT, sampling)
    reference = hf_logits(hf, PROMPT + tokens)
    log_probs = torch.log_softmax(reference, dim=-1)
    n = len(PROMPT)
    # The prompt's logits come once, with the first output; chunked prefill (8-token
    # budget) filled them in two pieces.
    assert outputs[0].context_logits.shape == (n, reference.shape[1])
    assert all(out.context_logits is None for out in outputs[1:])
    torch.testing.assert_close(outputs[0].context_logits, reference[:n], atol=1e-4, rtol=1e-4)
    for i, out in enumerate(outputs):
        assert out.token_ids == [tokens[i]]
        assert out.token_ids[0] == int(reference[n - 1 + i].argmax())
        assert out.log_probs[0] == pytest.approx(float(log_probs[n - 1 + i, tokens[i]]),
                                                 abs=1e-4)
        torch.testing.assert_close(out.generation_logits[0], reference[n - 1 + i],
                                   atol=1e-4, rtol=1e-4)


def test_sampled_log_probs_are_those_of_the_tempered_distribution(engine, hf):
    from transformers import TemperatureLogitsWarper

    sampling = SamplingParams(max_tokens=12, min_length=12, temperature=0.7, top_k=50,
                              seed=7, return_log_probs=True)
    tokens, outputs = run(engine, PROMPT, sampling)
    reference = hf_logits(hf, PROMPT + tokens)
    warp = TemperatureLogitsWarper(0.7)
    n = len(PROMPT)
    for i, out in enumerate(outputs):
        row = warp(None, reference[n - 1 + i][None])[0]
        expected = float(torch.log_softmax(row, dim=-1)[tokens[i]])
        assert out.log_probs[0] == pytest.approx(expected, abs=1e-4)
        # The drawn token is among the top 50 of the tempered distribution.
        assert tokens[i] in torch.topk(row, 50).indices.tolist()
    # Same seed, same tokens (the seed makes sampling reproducible).
    again, _ = run(engine, PROMPT, sampling, request_id="again")
    assert again == tokens


def test_penalties_match_the_reference_decoding(engine, hf):
    """Greedy decoding under repetition, presence and frequency penalties equals a
    reference loop over transformers' forward: transformers' RepetitionPenaltyLogitsProcessor
    and the definition of the other two, over prompt + output (TensorRT-LLM's count)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    # A repetitive prompt, so that the penalties have something to count.
    prompt = [1] + [523, 97, 523, 97, 12] * 4
    sampling = SamplingParams(max_tokens=16, min_length=16, repetition_penalty=1.3,
                              presence_penalty=0.4, frequency_penalty=0.25,
                              return_log_probs=True)
    tokens, outputs = run(engine, prompt, sampling)
    plain, _ = run(engine, prompt, SamplingParams(max_tokens=16, min_length=16), "plain")
    assert tokens != plain  # the penalties change this output
    repetition = RepetitionPenaltyLogitsProcessor(1.3)
    sequence = list(prompt)
    for i in range(16):
        logits = hf_logits(hf, sequence)[-1]
        logits = repetition(torch.tensor([sequence]), logits[None])[0]
        logits = presence_frequency_reference(logits, sequence, 0.4, 0.25)
        token = int(logits.argmax())
        assert tokens[i] == token, f"token {i}"
        assert outputs[i].log_probs[0] == pytest.approx(
            float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
        sequence.append(token)


def test_process_logits_matches_transformers_processors():
    from transformers import NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=generator) * 3
    prompt, output = [1, 5, 9, 5, 30], [9, 41, 7]
    bad_words = ((7, 12), (41,), (3, 9, 13), (2, 2))
    params = SamplingParams(repetition_penalty=0.8, bad_words=bad_words)
    got = logits.clone()
    process_logits(got, params, (prompt, output))
    ids = torch.tensor([prompt + output])
    expected = RepetitionPenaltyLogitsProcessor(0.8)(ids, logits.clone()[None])
    expected = NoBadWordsLogitsProcessor([list(w) for w in bad_words], eos_token_id=999)(
        ids, expected)[0]
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.isinf(got[[12, 41]]).all() and not torch.isinf(got[[13, 2]]).any()
    finite = ~torch.isinf(got)
    torch.testing.assert_close(got[finite], expected[finite])


def test_presence_and_frequency_penalties_count_prompt_and_output():
    logits = torch.zeros(16)
    process_logits(logits, SamplingParams(presence_penalty=1.0, frequency_penalty=0.5),
                   ([3, 3, 4], [4, 5, 3]))
    assert logits[3].item() == pytest.approx(-(1.0 + 0.5 * 3))
    assert logits[4].item() == pytest.approx(-(1.0 + 0.5 * 2))
    assert logits[5].item() == pytest.approx(-(1.0 + 0.5))
    assert logits[6].item() == 0.0


def test_bad_words_and_logit_bias_steer_greedy_decoding(engine):
    free, _ = run(engine, PROMPT, SamplingParams(max_tokens=6, min_length=6), "free")
    # Banning the first token changes it; a bias on a token forces it.
    banned, _ = run(engine, PROMPT, SamplingParams(max_tokens=6, min_length=6,
                                                   bad_words=((free[0],),)), "banned")
    assert banned[0] != free[0]
    assert free[0] not in banned
    forced, _ = run(engine, PROMPT, SamplingParams(max_tokens=3, min_length=3,
                                                   logit_bias=((1234, 1e4),)), "forced")
    assert forced == [1234, 1234, 1234]
    # A two-token banned sequence: its last token is banned only right after its first.
    pair = (free[1], free[2])
    after, _ = run(engine, PROMPT, SamplingParams(max_tokens=6, min_length=6,
                                                  bad_words=(pair,)), "pair")
    assert after[:2] == free[:2] and after[2] != free[2]


def test_stop_token_sequences_end_the_output_and_stay_in_it(engine):
    free, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, min_length=8), "free2")
    stop = (free[3], free[4])
    tokens, outputs = run(engine, PROMPT, SamplingParams(max_tokens=8, stop_token_ids=(stop,)),
                          "stop")
    end = next(i for i in range(1, 8) if tuple(free[i - 1 : i + 1]) == stop)
    assert tokens == free[: end + 1]
    assert outputs[-1].finish_reason == "stop"
    # min_length keeps it from stopping there.
    tokens, outputs = run(engine, PROMPT, SamplingParams(
        max_tokens=8, min_length=8, stop_token_ids=(stop,)), "min")
    assert tokens == free and outputs[-1].finish_reason == "length"


def test_perf_metrics_count_blocks_and_order_times(engine):
    tokens, outputs = run(engine, PROMPT, SamplingParams(max_tokens=6, min_length=6),
                          "perf", return_perf_metrics=True)
    metrics = outputs[-1].metrics
    assert metrics.num_blocks_total == math.ceil((len(PROMPT) + 6 - 1) / 4)
    assert metrics.num_blocks_reused == 0 and metrics.num_blocks_new == metrics.num_blocks_total
    assert (metrics.arrival_time_s <= metrics.first_scheduled_time_s
            <= metrics.first_token_time_s <= metrics.last_token_time_s)
    # Nothing is attached to a request that asked for nothing.
    _, plain = run(engine, PROMPT, SamplingParams(max_tokens=2), "plain2")
    assert all(o.log_probs is None and o.metrics is None for o in plain)


def test_batched_requests_keep_their_own_processing(engine):
    """Penalised, biased and plain requests in one batch each get what they get alone."""
    prompts = random_prompts(3, [9, 14, 6])
    params = [SamplingParams(max_tokens=8, min_length=8, repetition_penalty=1.5),
              SamplingParams(max_tokens=8, min_length=8, logit_bias=((77, 5.0),)),
              SamplingParams(max_tokens=8, min_length=8)]
    alone = [run(engine, p, s, f"alone{i}")[0]
             for i, (p, s) in enumerate(zip(prompts, params, strict=True))]
    for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"b{i}", p, s)
    together = {f"b{i}": [] for i in range(3)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            together[out.request_id].extend(out.token_ids)
    assert [together[f"b{i}"] for i in range(3)] == alone
