"""IncrementalDetokenizer with the project's default byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preemptserve.engine.tokenizer import IncrementalDetokenizer, TextTokenizer
from preemptserve.model.default_model import ensure_default_model

REPLACEMENT = "\ufffd"
NON_ASCII_TEXT = "héllo wörld ✓ 日本"


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(ensure_default_model())


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: TextTokenizer) -> list[int]:
    return tokenizer.encode("Question: say something.")


def output_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Ids of ``text`` as a model would emit them: no BOS."""
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    return ids[1:] if ids and ids[0] == tokenizer.token_to_id("<s>") else ids


def stream(
    tokenizer: TextTokenizer,
    prompt_ids: list[int],
    ids: list[int],
    stop: tuple[str, ...] = (),
) -> tuple[list[str], bool]:
    """Feed ids one by one as the engine does; return the deltas and whether a stop hit."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop)
    deltas: list[str] = []
    for index, token_id in enumerate(ids):
        detok.append(token_id)
        stopped = detok.find_stop()
        finished = stopped or index == len(ids) - 1
        deltas.append(detok.take_delta(finished))
        if stopped:
            return deltas, True
    return deltas, False


# -- streaming without stop strings ------------------------------------------------------


def test_non_ascii_text_streams_back_exactly(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, NON_ASCII_TEXT)
    # The text's multi-byte characters really are split across tokens.
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    deltas, stopped = stream(tokenizer, prompt_ids, ids)
    assert not stopped
    assert "".join(deltas) == NON_ASCII_TEXT == tokenizer.decode(ids)
    assert not any(REPLACEMENT in d for d in deltas), "a partial character was released"


def test_each_delta_is_released_as_soon_as_it_is_whole(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, NON_ASCII_TEXT)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ())
    sent = ""
    for k, token_id in enumerate(ids, start=1):
        detok.append(token_id)
        sent += detok.take_delta(finished=False)
        decoded = tokenizer.decode(ids[:k])
        # Without stop strings nothing is held back but an unfinished character.
        assert sent == decoded.rstrip(REPLACEMENT)


def test_leading_space_after_the_prompt_is_kept(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, " and then some")
    deltas, _ = stream(tokenizer, prompt_ids, ids)
    assert "".join(deltas) == " and then some"


def test_empty_prompt_context(tokenizer: TextTokenizer) -> None:
    ids = output_ids(tokenizer, NON_ASCII_TEXT)
    deltas, _ = stream(tokenizer, [], ids)
    assert "".join(deltas) == NON_ASCII_TEXT


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 40))
def test_random_ids_concatenate_to_decode(
    tokenizer: TextTokenizer, prompt_ids: list[int], seed: int, length: int
) -> None:
    rng = random.Random(seed)
    # Mix arbitrary ids (stray continuation bytes, special tokens) with the pieces of a
    # non-ASCII text so whole multi-byte characters also occur.
    pieces = output_ids(tokenizer, NON_ASCII_TEXT)
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.5:
            ids.append(rng.randrange(tokenizer.vocab_size))
        else:
            start = rng.randrange(len(pieces))
            ids.extend(pieces[start : start + rng.randint(1, 6)])
    deltas, _ = stream(tokenizer, prompt_ids, ids)
    streamed = "".join(deltas)
    decoded = tokenizer.decode(ids)
    if not decoded.endswith(REPLACEMENT):
        assert streamed == decoded
    else:
        # Trailing bytes that never form a character are not sent; all before them is.
        last_sent = max((k for k, d in enumerate(deltas) if d), default=-1)
        unsent = tokenizer.decode(ids[last_sent + 1 :])
        assert unsent.endswith(REPLACEMENT)
        assert decoded == streamed + unsent


# -- stop strings ------------------------------------------------------------------------


def test_text_is_cut_before_the_stop_string(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, "The answer is 42. STOP and more text")
    deltas, stopped = stream(tokenizer, prompt_ids, ids, stop=("STOP",))
    assert stopped
    assert "".join(deltas) == "The answer is 42. "
    assert len(deltas) < len(ids), "tokens after the stop string were consumed"
    assert not any("S" in d for d in deltas)


def test_stop_string_split_across_tokens_is_never_emitted(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    text = "abc 日本語 xyz"
    ids = output_ids(tokenizer, text)
    deltas, stopped = stream(tokenizer, prompt_ids, ids, stop=("本語",))
    assert stopped
    assert "".join(deltas) == "abc 日"
    assert not any("本" in d for d in deltas)


def test_held_back_text_is_released_when_finished(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    text = "hello wor"
    ids = output_ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("world",))
    sent = ""
    for token_id in ids:
        detok.append(token_id)
        assert not detok.find_stop()
        sent += detok.take_delta(finished=False)
        assert len(sent) <= max(0, len(detok.text) - len("world") + 1)
    # "wor" could still become "world": the last 4 characters are held back...
    assert sent == text[: len(text) - 4]
    # ...until the request finishes for another reason (max_tokens, end_id).
    assert detok.take_delta(finished=True) == text[len(text) - 4 :]
    assert detok.take_delta(finished=True) == ""


def test_hold_back_uses_the_longest_stop_string(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, "abcdefgh")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("x", "yyyyyy"))
    sent = ""
    for token_id in ids:
        detok.append(token_id)
        detok.find_stop()
        sent += detok.take_delta(finished=False)
    assert sent == "abc"  # 8 characters, 5 held back for "yyyyyy"


def test_earliest_stop_string_wins(tokenizer: TextTokenizer, prompt_ids: list[int]) -> None:
    ids = output_ids(tokenizer, "one two three")
    deltas, stopped = stream(tokenizer, prompt_ids, ids, stop=("three", "two"))
    assert stopped
    assert "".join(deltas) == "one "


def test_stop_string_in_the_prompt_is_ignored(tokenizer: TextTokenizer) -> None:
    prompt = tokenizer.encode("say STOP")
    ids = output_ids(tokenizer, " fine")
    deltas, stopped = stream(tokenizer, prompt, ids, stop=("STOP",))
    assert not stopped
    assert "".join(deltas) == " fine"


def _expected_cut(tokenizer: TextTokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    """Reference: the first prefix of tokens whose text contains a stop string."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k]).rstrip(REPLACEMENT)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            return text[: min(hits)]
    return tokenizer.decode(ids)


ALPHABET = "ab ✓日é\n"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=30),
    stop=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_property(
    tokenizer: TextTokenizer, prompt_ids: list[int], text: str, stop: list[str]
) -> None:
    ids = output_ids(tokenizer, text)
    stops = tuple(stop)
    expected = _expected_cut(tokenizer, ids, stops)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stops)
    sent = ""
    for index, token_id in enumerate(ids):
        detok.append(token_id)
        stopped = detok.find_stop()
        finished = stopped or index == len(ids) - 1
        sent += detok.take_delta(finished)
        # Whatever was sent stays a prefix of the final answer: no stop string (nor a
        # piece of one that later completes) ever leaves.
        assert expected.startswith(sent)
        assert not any(s in sent for s in stops)
        if finished:
            break
    assert sent == expected


def test_stops_before_min_length_are_ignored_and_nothing_sent_is_taken_back(
    tokenizer: TextTokenizer, prompt_ids: list[int]
) -> None:
    ids = output_ids(tokenizer, "one stop two stop three")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("stop",))
    sent = ""
    min_length = 3  # the first " stop" arrives before three tokens exist
    for index, token_id in enumerate(ids):
        detok.append(token_id)
        stopped = detok.find_stop(enabled=index + 1 >= min_length)
        sent += detok.take_delta(stopped)
        assert detok.text.startswith(sent)
        if stopped:
            break
    assert stopped
    assert sent == detok.text == "one stop two "


def test_echo_leads_the_text_and_is_never_searched_for_stops(tokenizer, prompt_ids) -> None:
    # The echoed prompt contains the stop string; only generated text may stop.
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("say",), echo="Please say: ")
    deltas = []
    for token_id in output_ids(tokenizer, " hello there, say it"):
        detok.append(token_id)
        if detok.find_stop():
            deltas.append(detok.take_delta(finished=True))
            break
        deltas.append(detok.take_delta(finished=False))
    assert deltas[0].startswith("Please say: ")
    assert "".join(deltas) == "Please say:  hello there, "


def test_final_only_releases_everything_at_the_end(tokenizer, prompt_ids) -> None:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, (), echo="Q: ", final_only=True)
    ids = output_ids(tokenizer, NON_ASCII_TEXT)
    for token_id in ids[:-1]:
        detok.append(token_id)
        assert detok.take_delta(finished=False) == ""
    detok.append(ids[-1])
    assert detok.take_delta(finished=True) == "Q: " + NON_ASCII_TEXT


def test_exported_state_continues_identically(tokenizer, prompt_ids) -> None:
    ids = output_ids(tokenizer, NON_ASCII_TEXT + " and more")
    whole = IncrementalDetokenizer(tokenizer, prompt_ids, ("more",))
    first = IncrementalDetokenizer(tokenizer, prompt_ids, ("more",))
    expected, got = [], []
    for i, token_id in enumerate(ids):
        if i == len(ids) // 2:  # moved to another engine halfway
            first = IncrementalDetokenizer.restore(tokenizer, first.export_state())
        for detok, out in ((whole, expected), (first, got)):
            detok.append(token_id)
            stopped = detok.find_stop()
            out.append(detok.take_delta(finished=stopped))
    assert got == expected
