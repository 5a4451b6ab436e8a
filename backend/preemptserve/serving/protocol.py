"""Triton request tensors -> a validated generation request (numpy only, no Triton).

Input names and types follow Triton's TensorRT-LLM ``ensemble`` model, so clients and
tools written for it (genai-perf, the ``generate`` endpoint examples) work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.request import NORMAL_PRIORITY, PRIORITIES, SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    sampling: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    # Per-request latency objectives (request parameters); None: the model's defaults.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # "high" or "normal" (request parameter ``request_priority``).
    priority: str = NORMAL_PRIORITY


# Request parameters (not tensors) this model reads: name -> GenerateRequest field.
SLO_PARAMETERS = {"ttft_slo_ms": "ttft_slo_s", "tbt_slo_ms": "tbt_slo_s"}
# The request's priority, "high" or "normal". Not ``priority``: Triton reserves that name
# for its own integer priority (dynamic batcher queues), rejects a string there and never
# hands it to the model.
PRIORITY_PARAMETER = "request_priority"


# Request parameters Triton reserves or uses itself: a model may see some of them and must
# not mistake them for a client's (on the generate endpoint, for a misspelt input).
TRITON_PARAMETERS = frozenset({
    "priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
    "binary_data_output", "triton_enable_empty_final_response"})
# What ``request_scheduling_parameters`` reads.
SCHEDULING_PARAMETERS = frozenset({*SLO_PARAMETERS, PRIORITY_PARAMETER})


class InvalidRequest(ValueError):
    """The request's inputs are unusable; the message is safe to return to the client."""


def check_parameters(parameters: Mapping[str, object], allowed: frozenset[str]) -> None:
    """Fail on a request parameter nobody reads: on the generate endpoint every JSON key
    that is not an input of the model arrives as a parameter, where it would go unnoticed
    (a misspelt input, or one of another release's names)."""
    unknown = sorted(set(parameters) - allowed - TRITON_PARAMETERS)
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise InvalidRequest(
            f"unknown request parameter(s) {names}: not an input of this model (on the "
            f"generate endpoint a key that is not an input arrives as a parameter); the "
            f"parameters read are {', '.join(sorted(allowed))}")


def request_scheduling_parameters(parameters: Mapping[str, object],
                                  also_allowed: frozenset[str] = frozenset()) -> dict:
    """The scheduling parameters of a request (``GenerateRequest`` field -> value);
    ``InvalidRequest`` for a bad value or a parameter not read (``check_parameters``)."""
    check_parameters(parameters, SCHEDULING_PARAMETERS | also_allowed)
    return {**{field: _slo_seconds(parameters, name) for name, field in SLO_PARAMETERS.items()},
            "priority": _priority(parameters)}


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str, kinds: str, what: str):
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one value, got shape {array.shape}")
    if array.dtype.kind not in kinds:
        raise InvalidRequest(f"input '{name}' must be {what}, got {array.dtype}")
    return array.reshape(-1)[0].item()


def text_value(value: object, name: str) -> str:
    """One element of a BYTES input as text; ``InvalidRequest`` naming the input if it is
    not UTF-8 or not a string."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"input '{name}' is not valid UTF-8") from exc
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"input '{name}' must be a string (BYTES), got {type(value).__name__}")


def _slo_seconds(parameters: Mapping[str, object], name: str) -> float | None:
    value = parameters.get(name)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        milliseconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"request parameter '{name}' must be a number of milliseconds, got {value!r}"
        ) from None
    if not (math.isfinite(milliseconds) and milliseconds > 0):
        raise InvalidRequest(f"request parameter '{name}' must be positive, got {value!r}")
    return milliseconds / 1000.0


def _priority(parameters: Mapping[str, object]) -> str:
    value = parameters.get(PRIORITY_PARAMETER)
    if value is None:
        return NORMAL_PRIORITY
    if not isinstance(value, str) or value.strip().lower() not in PRIORITIES:
        raise InvalidRequest(f"request parameter '{PRIORITY_PARAMETER}' must be \"high\" or "
                             f"\"normal\", got {value!r}")
    return value.strip().lower()


def parse_generate_request(
    inputs: Mapping[str, np.ndarray | None], *, default_exclude_input: bool,
    parameters: Mapping[str, object] | None = None,
) -> GenerateRequest:
    """Validate the tensors and parameters of one request.

    ``parameters`` are the request's Triton parameters (``ttft_slo_ms``, ``tbt_slo_ms``,
    ``request_priority``; any other fails, Triton's own aside). Raises ``InvalidRequest``
    with a clear message.
    """
    parameters = parameters or {}
    scheduling = request_scheduling_parameters(parameters)
    text = inputs.get("text_input")
    if text is None:
        raise InvalidRequest("missing required input 'text_input'")
    if text.size != 1:
        raise InvalidRequest(f"input 'text_input' must hold one string, got shape {text.shape}")
    prompt = text_value(text.reshape(-1)[0], "text_input")

    max_tokens = _scalar(inputs, "max_tokens", "iu", "an integer (INT32)")
    if max_tokens is None:
        raise InvalidRequest("missing required input 'max_tokens'")
    if max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be positive, got {max_tokens}")

    stop_words: tuple[str, ...] = ()
    stop = inputs.get("stop_words")
    if stop is not None:
        if stop.dtype.kind not in "OSU":
            raise InvalidRequest(f"input 'stop_words' must be strings (BYTES), got {stop.dtype}")
        # An empty word is no word (TensorRT-LLM's convention: "stop_words": "" is none).
        stop_words = tuple(w for w in (text_value(v, "stop_words") for v in stop.reshape(-1)) if w)

    def opt(name: str, kinds: str, what: str, default):  # type: ignore[no-untyped-def]
        value = _scalar(inputs, name, kinds, what)
        return default if value is None else value

    try:
        seed = _scalar(inputs, "random_seed", "iu", "an integer (UINT64)")
        end_id = _scalar(inputs, "end_id", "iu", "an integer (INT32)")
        sampling = SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(opt("temperature", "f", "a float (FP32)", 1.0)),
            top_k=int(opt("top_k", "iu", "an integer (INT32)", 0)),
            top_p=float(opt("top_p", "f", "a float (FP32)", 0.0)),
            seed=None if seed is None else int(seed),
            min_length=int(opt("min_length", "iu", "an integer (INT32)", 0)),
            end_id=None if end_id is None else int(end_id),
            stop=stop_words,
        )
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    return GenerateRequest(
        prompt=prompt,
        sampling=sampling,
        stream=bool(opt("stream", "b", "a boolean (BOOL)", False)),
        exclude_input_in_output=bool(
            opt("exclude_input_in_output", "b", "a boolean (BOOL)", default_exclude_input)
        ),
        **scheduling,
    )


INPUT_NAMES = (
    "text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "random_seed",
    "min_length", "end_id", "stop_words", "exclude_input_in_output",
)
