"""Triton request tensors -> GenerateRequest, with the arrays Triton actually hands over."""

from __future__ import annotations

import numpy as np
import pytest

from preemptserve.core.request import SamplingParams
from preemptserve.serving.protocol import (
    INPUT_NAMES,
    GenerateRequest,
    InvalidRequest,
    parse_generate_request,
)

# -- factories: one array per input, shaped and typed as in config.pbtxt -----------------


def text(value: str | bytes) -> np.ndarray:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return np.array([raw], dtype=np.object_)


def int32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


def uint64(value: int) -> np.ndarray:
    return np.array([value], dtype=np.uint64)


def fp32(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


def boolean(value: bool) -> np.ndarray:
    return np.array([value], dtype=bool)


def words(*values: str | bytes) -> np.ndarray:
    return np.array(
        [v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=np.object_
    )


def make_inputs(**overrides: np.ndarray | None) -> dict[str, np.ndarray | None]:
    inputs: dict[str, np.ndarray | None] = {
        "text_input": text("Hello"),
        "max_tokens": int32(8),
    }
    inputs.update(overrides)
    return inputs


def parse(inputs: dict[str, np.ndarray | None], default_exclude: bool = True) -> GenerateRequest:
    return parse_generate_request(inputs, default_exclude_input=default_exclude)


def parse_error(**overrides: np.ndarray | None) -> str:
    inputs = make_inputs(**overrides)
    with pytest.raises(InvalidRequest) as info:
        parse(inputs)
    return str(info.value)


# -- valid requests ----------------------------------------------------------------------


def test_defaults_are_greedy_and_not_streaming() -> None:
    request = parse(make_inputs())
    assert request.prompt == "Hello"
    assert request.stream is False
    assert request.exclude_input_in_output is True
    assert request.sampling == SamplingParams(max_tokens=8)
    assert request.sampling.greedy
    assert request.sampling.stop == ()
    assert request.sampling.seed is None and request.sampling.end_id is None


@pytest.mark.parametrize("default_exclude", [True, False])
def test_exclude_input_defaults_to_the_model_setting(default_exclude: bool) -> None:
    assert parse(make_inputs(), default_exclude).exclude_input_in_output is default_exclude


def test_absent_optional_inputs_given_as_none() -> None:
    inputs = make_inputs(**{name: None for name in INPUT_NAMES[2:]})
    assert parse(inputs) == parse(make_inputs())


def test_all_fields() -> None:
    request = parse(
        make_inputs(
            text_input=text("héllo ✓"),
            max_tokens=int32(32),
            stream=boolean(True),
            temperature=fp32(0.7),
            top_k=int32(40),
            top_p=fp32(0.9),
            random_seed=uint64(2**64 - 1),
            min_length=int32(3),
            end_id=int32(2),
            stop_words=words("\n\n", "END"),
            exclude_input_in_output=boolean(False),
        )
    )
    assert request.prompt == "héllo ✓"
    assert request.stream is True
    assert request.exclude_input_in_output is False
    sampling = request.sampling
    assert sampling.max_tokens == 32
    assert sampling.temperature == pytest.approx(0.7)
    assert sampling.top_k == 40
    assert sampling.top_p == pytest.approx(0.9)
    assert sampling.seed == 2**64 - 1
    assert sampling.min_length == 3
    assert sampling.end_id == 2
    assert sampling.stop == ("\n\n", "END")
    assert not sampling.greedy
    assert all(isinstance(v, int) for v in (sampling.max_tokens, sampling.top_k, sampling.seed))


def test_two_dimensional_scalars_as_http_clients_send_them() -> None:
    request = parse(
        make_inputs(
            text_input=np.array([[b"Hi"]], dtype=np.object_),
            max_tokens=np.array([[4]], dtype=np.int32),
            stop_words=np.array([[b"a", b"b"]], dtype=np.object_),
        )
    )
    assert (request.prompt, request.sampling.max_tokens) == ("Hi", 4)
    assert request.sampling.stop == ("a", "b")


def test_str_elements_are_accepted() -> None:
    request = parse(make_inputs(text_input=np.array(["plain str"], dtype=np.object_)))
    assert request.prompt == "plain str"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_integer_widths_accepted_for_max_tokens(dtype: type) -> None:
    assert parse(make_inputs(max_tokens=np.array([5], dtype=dtype))).sampling.max_tokens == 5


@pytest.mark.parametrize(
    "overrides",
    [
        {"temperature": fp32(0.0), "top_k": int32(50), "top_p": fp32(0.9)},
        {"temperature": fp32(1.0), "top_k": int32(1)},
        {"temperature": fp32(1.0)},
    ],
)
def test_greedy_conventions(overrides: dict[str, np.ndarray]) -> None:
    assert parse(make_inputs(**overrides)).sampling.greedy


def test_empty_prompt_is_a_valid_string() -> None:
    # Whether an empty prompt can run is the engine's call, not the protocol's.
    assert parse(make_inputs(text_input=text(""))).prompt == ""


# -- invalid requests --------------------------------------------------------------------


def test_missing_text_input() -> None:
    inputs = make_inputs()
    del inputs["text_input"]
    with pytest.raises(InvalidRequest, match="missing required input 'text_input'"):
        parse(inputs)


def test_missing_max_tokens() -> None:
    inputs = make_inputs()
    del inputs["max_tokens"]
    with pytest.raises(InvalidRequest, match="missing required input 'max_tokens'"):
        parse(inputs)


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_must_be_positive(value: int) -> None:
    assert "max_tokens must be positive" in parse_error(max_tokens=int32(value))


@pytest.mark.parametrize(
    "name, array, expected",
    [
        ("max_tokens", fp32(8.0), "'max_tokens' must be an integer"),
        ("max_tokens", text("8"), "'max_tokens' must be an integer"),
        ("top_k", fp32(4.0), "'top_k' must be an integer"),
        ("temperature", int32(1), "'temperature' must be a float"),
        ("top_p", int32(1), "'top_p' must be a float"),
        ("random_seed", fp32(1.0), "'random_seed' must be an integer"),
        ("stream", int32(1), "'stream' must be a boolean"),
        ("exclude_input_in_output", text("yes"), "'exclude_input_in_output' must be a boolean"),
        ("stop_words", int32(3), "'stop_words' must be strings"),
        ("text_input", int32(3), "'text_input' must be a string"),
    ],
)
def test_wrong_dtype(name: str, array: np.ndarray, expected: str) -> None:
    message = parse_error(**{name: array})
    assert expected in message
    if name != "text_input":
        assert str(array.dtype) in message


@pytest.mark.parametrize(
    "name, array",
    [
        ("text_input", np.array([b"a", b"b"], dtype=np.object_)),
        ("max_tokens", np.array([4, 5], dtype=np.int32)),
        ("temperature", np.array([0.5, 0.6], dtype=np.float32)),
        ("stream", np.array([True, False], dtype=bool)),
        ("random_seed", np.array([], dtype=np.uint64)),
    ],
)
def test_shape_with_other_than_one_value(name: str, array: np.ndarray) -> None:
    message = parse_error(**{name: array})
    assert f"'{name}'" in message
    assert str(array.shape) in message


def test_invalid_utf8_prompt() -> None:
    assert "'text_input' is not valid UTF-8" in parse_error(text_input=text(b"\xff\xfeab"))


def test_invalid_utf8_stop_word() -> None:
    message = parse_error(stop_words=words("ok", b"\xc3"))
    assert "'stop_words' is not valid UTF-8" in message


def test_empty_stop_words_are_none() -> None:
    """TensorRT-LLM's convention (its README's generate example sends "stop_words": "")."""
    inputs = make_inputs(stop_words=words("END", ""))
    assert parse_generate_request(inputs, default_exclude_input=False).sampling.stop == ("END",)
    inputs = make_inputs(stop_words=words(""))
    assert parse_generate_request(inputs, default_exclude_input=False).sampling.stop == ()


@pytest.mark.parametrize("value", [1.5, 1.0001])
def test_top_p_above_one(value: float) -> None:
    assert "top_p must be in [0, 1]" in parse_error(top_p=fp32(value))


def test_negative_top_p() -> None:
    assert "top_p must be in [0, 1]" in parse_error(top_p=fp32(-0.1))


def test_negative_temperature() -> None:
    assert "temperature must be >= 0" in parse_error(temperature=fp32(-0.5))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_temperature(value: float) -> None:
    # Sampling with it would fail the whole batch's step, not just this request.
    assert "temperature must be >= 0 and finite" in parse_error(
        temperature=fp32(value), top_k=int32(50)
    )


def test_nan_top_p() -> None:
    assert "top_p must be in [0, 1]" in parse_error(top_p=fp32(float("nan")))


def test_negative_random_seed() -> None:
    message = parse_error(random_seed=np.array([-1], dtype=np.int64))
    assert "random_seed must fit in uint64" in message


def test_negative_top_k() -> None:
    assert "top_k must be >= 0" in parse_error(top_k=int32(-1))


def test_negative_min_length() -> None:
    assert "min_length must be >= 0" in parse_error(min_length=int32(-2))


def test_invalid_request_is_a_value_error() -> None:
    assert issubclass(InvalidRequest, ValueError)


def test_slo_request_parameters_in_milliseconds() -> None:
    inputs = make_inputs()
    parsed = parse_generate_request(inputs, default_exclude_input=False,
                                    parameters={"ttft_slo_ms": 250, "tbt_slo_ms": "40"})
    assert parsed.ttft_slo_s == pytest.approx(0.25)
    assert parsed.tbt_slo_s == pytest.approx(0.04)
    assert parse_generate_request(inputs, default_exclude_input=False).ttft_slo_s is None
    # Parameters this model does not read are left alone (Triton may add its own).
    other = parse_generate_request(inputs, default_exclude_input=False,
                                   parameters={"priority": 3})
    assert other.ttft_slo_s is None and other.tbt_slo_s is None


@pytest.mark.parametrize("value", [0, -5, "soon", float("nan"), float("inf"), True, [1]])
def test_bad_slo_parameters(value: object) -> None:
    inputs = make_inputs()
    with pytest.raises(InvalidRequest, match="ttft_slo_ms"):
        parse_generate_request(inputs, default_exclude_input=False,
                               parameters={"ttft_slo_ms": value})


def test_unknown_request_parameters_fail() -> None:
    """On the generate endpoint a key that is not an input arrives as a parameter: one this
    model does not read (a misspelt input, another release's name) is an error, not
    silently dropped."""
    inputs = make_inputs()
    with pytest.raises(InvalidRequest, match="unknown request parameter.*'seed'.*'tempature'"):
        parse_generate_request(inputs, default_exclude_input=False,
                               parameters={"tempature": 0.5, "seed": 3})
