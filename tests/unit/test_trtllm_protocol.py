"""The drop-in models' request parsing, responses and text handling, without Triton."""

from __future__ import annotations

import numpy as np
import pytest

from preemptserve.engine.outputs import RequestOutput
from preemptserve.engine.tokenizer import IncrementalDetokenizer
from preemptserve.model.default_model import ensure_default_model
from preemptserve.serving.protocol import InvalidRequest
from preemptserve.serving.trtllm_request import (
    REJECTED_INPUTS,
    TokenItem,
    parse_token_request,
    sequence_seed,
    word_lists,
)
from preemptserve.serving.trtllm_response import ResponseGroup, combine
from preemptserve.serving.trtllm_text import SequenceText, TextCodec


def token_inputs(ids=((1, 5, 9),), **extra):
    """A tensorrt_llm request as Triton hands it over: per-item scalars reshaped to [B]."""
    ids = [list(row) for row in ids]
    width = max(len(row) for row in ids)
    input_ids = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
    inputs = {"input_ids": input_ids,
              "input_lengths": np.array([len(row) for row in ids], np.int32),
              "request_output_len": np.full(len(ids), 4, np.int32)}
    inputs.update(extra)
    return inputs


def parse(inputs, **kwargs):
    return parse_token_request(inputs, default_exclude_input=False, **kwargs)


@pytest.fixture(scope="module")
def codec():
    return TextCodec(ensure_default_model())


def test_items_take_their_own_values_from_b_or_b1_shapes():
    request = parse(token_inputs(
        ids=((1, 5, 9), (1, 7)),
        temperature=np.array([[0.5], [0.9]], np.float32),  # [B, 1]
        runtime_top_k=np.array([3, 4], np.int32),  # [B]
        seed=np.array([11, 12], np.uint64),
        repetition_penalty=np.array([1.2, 1.0], np.float32),
        min_tokens=np.array([2, 0], np.int32),
        end_id=np.array([-1, 2], np.int32),
        streaming=np.array([True, True]),
        num_return_sequences=np.array([1, 3], np.int32),
        return_log_probs=np.array([True, False]),
        beam_width=np.array([1, 1], np.int32),
        len_penalty=np.array([1.0, 1.0], np.float32),
    ))
    first, second = request.items
    assert first.prompt_ids == [1, 5, 9] and second.prompt_ids == [1, 7]
    assert (first.sampling.temperature, second.sampling.temperature) == (0.5, pytest.approx(0.9))
    assert (first.sampling.top_k, second.sampling.top_k) == (3, 4)
    assert (first.sampling.seed, second.sampling.seed) == (11, 12)
    assert first.sampling.repetition_penalty == pytest.approx(1.2)
    assert first.sampling.min_length == 2 and first.sampling.end_id == -1
    assert first.streaming and second.num_return_sequences == 3
    assert first.sampling.return_log_probs and not second.sampling.return_log_probs
    assert (first.batch_index, second.batch_index) == (0, 1)


@pytest.mark.parametrize("name", sorted(REJECTED_INPUTS))
def test_inputs_not_implemented_fail_by_name(name):
    with pytest.raises(InvalidRequest, match=f"input '{name}'.*not supported"):
        parse(token_inputs(**{name: np.ones((1, 1), np.int32)}))


@pytest.mark.parametrize("extra, message", [
    ({"beam_width": np.array([2], np.int32)}, "beam_width=2: beam search"),
    ({"len_penalty": np.array([0.5], np.float32)}, "len_penalty.*beam search"),
    ({"beam_search_diversity_rate": np.array([0.1], np.float32)}, "diversity.*beam"),
    ({"early_stopping": np.array([True])}, "early_stopping.*beam search"),
    ({"runtime_top_p_decay": np.array([0.9], np.float32)}, "top-p decay"),
    ({"decoder_input_ids": np.array([[3, 4]], np.int32)}, "decoder_input_ids.*encoder"),
    ({"input_lengths": np.array([9], np.int32)}, r"input_lengths\[0\]=9"),
    ({"request_output_len": np.array([0], np.int32)}, "request_output_len must be positive"),
    ({"repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty"),
    ({"temperature": np.array([1.0, 2.0], np.float32)}, "one value per batch item"),
])
def test_bad_requests_say_why(extra, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(token_inputs(**extra))


def test_neutral_beam_settings_and_the_no_decoder_input_placeholder_are_accepted():
    request = parse(token_inputs(beam_width=np.array([1], np.int32),
                                 len_penalty=np.array([1.0], np.float32),
                                 beam_search_diversity_rate=np.array([0.0], np.float32),
                                 runtime_top_p_decay=np.array([1.0], np.float32),
                                 decoder_input_ids=np.array([[2]], np.int32)))
    assert len(request.items) == 1
    assert parse(token_inputs(decoder_input_ids=np.zeros((1, 0), np.int32))).items


def test_modes_streaming_and_parameters():
    with pytest.raises(InvalidRequest, match="decoupled"):
        parse(token_inputs(streaming=np.array([True])), decoupled=False)
    with pytest.raises(InvalidRequest, match="num_return_sequences > 1 needs"):
        parse(token_inputs(num_return_sequences=np.array([2], np.int32)), decoupled=False)
    # The official client sends the Streaming parameter next to the input.
    assert parse(token_inputs(), parameters={"Streaming": True}).items[0].streaming
    with pytest.raises(InvalidRequest, match="contradicts"):
        parse(token_inputs(streaming=np.array([False])), parameters={"Streaming": True})
    with pytest.raises(InvalidRequest, match="unknown request parameter.*'top_kk'"):
        parse(token_inputs(), parameters={"top_kk": 3})
    slo = parse(token_inputs(), parameters={"ttft_slo_ms": 100, "request_priority": "high"})
    assert slo.ttft_slo_s == pytest.approx(0.1) and slo.priority == "high"


def test_stop_signal_reads_nothing_else():
    stop = parse({"input_ids": np.zeros((1, 1), np.int32),
                  "input_lengths": np.zeros(1, np.int32),
                  "request_output_len": np.zeros(1, np.int32), "stop": np.array([True])})
    assert stop.stop and not stop.items


def test_word_lists_round_trip_the_official_format(codec):
    words = np.array([["foo", "", "bar baz"], ["x", "", ""]], dtype=object)
    encoded = codec.word_lists(words, 2, "STOP_WORDS_DICT")
    assert encoded.shape[:2] == (2, 2) and encoded.dtype == np.int32
    tokenizer = codec.tokenizer
    first = word_lists(encoded, "stop_words_list", 0, 2)
    assert first == (tuple(tokenizer.encode("foo", False)),
                     tuple(tokenizer.encode("bar baz", False)))
    assert word_lists(encoded, "stop_words_list", 1, 2) == (tuple(tokenizer.encode("x", False)),)
    # "" alone means no word at all (the README's generate example).
    empty = codec.word_lists(np.array([[""]], dtype=object), 1, "BAD_WORDS_DICT")
    assert word_lists(empty, "bad_words_list", 0, 1) == ()
    assert codec.word_lists(None, 3, "BAD_WORDS_DICT").shape == (3, 2, 0)


def test_embedding_bias_and_special_ids(codec):
    bias = codec.embedding_bias(np.array([["foo"]], dtype=object),
                                np.array([[2.5]], np.float32), 1)
    ids = codec.tokenizer.encode("foo", False)
    assert bias.shape == (1, codec.tokenizer.vocab_size)
    assert set(np.flatnonzero(bias[0])) == set(ids) and bias[0, ids[0]] == 2.5
    request = parse(token_inputs(embedding_bias=bias))
    assert dict(request.items[0].sampling.logit_bias) == {i: 2.5 for i in ids}
    assert codec.end_id == 2 and codec.pad_id == 2  # </s>; no pad token: the end id


def test_encode_and_decode_batches(codec):
    ids, lengths = codec.encode_queries(np.array([[b"The value of"], [b"x"]], dtype=object))
    assert lengths.tolist() == [[len(codec.tokenizer.encode("The value of"))],
                                [len(codec.tokenizer.encode("x"))]]
    assert ids[1, lengths[1, 0]:].tolist() == [codec.pad_id] * (ids.shape[1] - lengths[1, 0])
    texts = codec.decode(ids[:, None, :], lengths)
    assert texts.tolist() == [b"The value of", b"x"]


def sequence_outputs(codec, text: str) -> list[RequestOutput]:
    """The engine's outputs for an output of ``text``, one token per step, with the text
    deltas its detokenizer releases (nothing while a character is incomplete)."""
    ids = codec.tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(codec.tokenizer, [1], ())
    outputs = []
    for index, token_id in enumerate(ids):
        detokenizer.append(token_id)
        last = index == len(ids) - 1
        outputs.append(RequestOutput("r", detokenizer.take_delta(last), [token_id],
                                     finished=last, finish_reason="length" if last else None))
    return outputs


def test_streamed_chunks_never_split_a_character(codec):
    text = "naïve 日本語 ok ünïcödé"
    outputs = sequence_outputs(codec, text)
    assert any(not o.text for o in outputs[:-1])  # some tokens end inside a character
    sent = []
    group = ResponseGroup(lambda arrays, error, final: sent.append((arrays, error, final)),
                          decoupled=True, cancel_all=lambda ids: None)
    item = TokenItem(0, [1, 5], _sampling(), streaming=True)
    responder = group.add(item, 0)
    for output in outputs:
        responder(output, None)
    chunks = [codec.decode(a["output_ids"], a["sequence_length"])[0].decode() for a, _, _ in sent]
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert [final for _, _, final in sent] == [False] * (len(sent) - 1) + [True]
    assert sum(a["sequence_length"][0, 0] for a, _, _ in sent) == len(outputs)


def test_whole_outputs_lead_with_the_prompt_unless_excluded(codec):
    for exclude in (False, True):
        sent: list = []
        group = ResponseGroup(lambda a, e, f, sent=sent: sent.append((a, e, f)),
                              decoupled=True, cancel_all=lambda ids: None)
        responder = group.add(TokenItem(0, [1, 5], _sampling(),
                                        exclude_input_in_output=exclude), 0)
        for output in sequence_outputs(codec, "abc def"):
            responder(output, None)
        (arrays, error, final), = sent
        generated = codec.tokenizer.encode("abc def", add_special_tokens=False)
        assert arrays["output_ids"][0, 0].tolist() == ([] if exclude else [1, 5]) + generated
        assert final and error is None


def test_groups_end_once_and_errors_cancel_the_rest():
    sent, cancelled = [], []
    group = ResponseGroup(lambda a, e, f: sent.append((a, e, f)), decoupled=True,
                          cancel_all=cancelled.extend)
    item = TokenItem(0, [1], _sampling())
    first, second = group.add(item, 0), group.add(item, 1)
    first.request_id, second.request_id = "a", "b"
    first(RequestOutput("a", "x", [7], finished=True, finish_reason="length"), None)
    assert sent[-1][2] is False and sent[-1][0]["sequence_index"].tolist() == [[0]]
    second(RequestOutput("b", "y", [8], finished=True, finish_reason="length"), None)
    assert sent[-1][2] is True and sent[-1][0]["sequence_index"].tolist() == [[1]]
    sent.clear()
    group = ResponseGroup(lambda a, e, f: sent.append((a, e, f)), decoupled=True,
                          cancel_all=cancelled.extend)
    first, second = group.add(item, 0), group.add(item, 1)
    first.request_id, second.request_id = "c", "d"
    first(RequestOutput("c", "", [], finished=True, finish_reason="error"), "boom")
    second(RequestOutput("d", "y", [8], finished=True, finish_reason="length"), None)
    assert sent == [(None, "boom", True)] and cancelled == ["d"]


def test_not_decoupled_batches_come_back_together_padded():
    a = {"output_ids": np.array([[[1, 2, 3]]], np.int32), "sequence_length": np.array([[3]])}
    b = {"output_ids": np.array([[[4]]], np.int32), "sequence_length": np.array([[1]])}
    items = [TokenItem(0, [1], _sampling(), pad_id=9), TokenItem(1, [1], _sampling(), pad_id=8)]
    combined = combine([a, b], items)
    assert combined["output_ids"].tolist() == [[[1, 2, 3]], [[4, 8, 8]]]
    assert combined["sequence_length"].tolist() == [[3], [1]]


def test_bls_text_keeps_stop_words_and_sends_deltas():
    text = SequenceText(["cd"], generation_start=0)
    assert [text.update(t) for t in ("a", "ab", "abc", "abcde")] == ["a", "b", "c", "d"]
    assert text.stopped and text.update("abcdef") == ""
    whole = SequenceText(["lo"], generation_start=5)  # the prompt "hello" is not searched
    assert whole.update("hello world, lo and behold") == "hello world, lo"
    accumulate = SequenceText([], accumulate=True)
    assert [accumulate.update(t) for t in ("a", "ab")] == ["a", "ab"]


def test_sequence_seeds_differ_and_repeat():
    assert sequence_seed(None, 3) is None
    seeds = {sequence_seed(5, i) for i in range(4)}
    assert len(seeds) == 4 and sequence_seed(5, 0) == 5 and all(0 <= s < 2**64 for s in seeds)


def _sampling():
    from preemptserve.core.request import SamplingParams

    return SamplingParams(max_tokens=8)
