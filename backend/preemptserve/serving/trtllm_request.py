"""Requests of the ``tensorrt_llm`` model: token ids in, as TensorRT-LLM's backend takes them.

Numpy only, no Triton. Every input of the official ``tensorrt_llm/config.pbtxt``
(tensorrtllm_backend commit c2e65b88) is listed in ``TENSORRT_LLM_INPUTS``: either
implemented here or rejected with the reason, by name. A request may hold a batch of
prompts (the batch dimension, ``max_batch_size > 0``), each asking for
``num_return_sequences`` sequences; each batch item becomes one ``TokenItem``.

Per-item scalars arrive as ``[B]`` (the config reshapes ``[1]`` to ``[]``) or ``[B, 1]``
(a BLS caller, or inputs declared without a reshape); both are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.request import NORMAL_PRIORITY, SamplingParams
from .protocol import InvalidRequest, request_scheduling_parameters

# Inputs that are not implemented, with why; a request carrying one (non-empty) fails.
_ENCODER = "encoder-decoder and multimodal models are not supported (decoder-only checkpoints)"
_SPECULATIVE = "speculative decoding (draft tokens) is not supported"
_PROMPT_TUNING = "prompt tuning (prompt embedding tables) is not supported"
_LORA = "LoRA adapters are not supported"
_GUIDED = "guided decoding is not supported"
_RETENTION = ("KV cache retention priorities are not supported (the scheduling policy "
              "decides what stays cached)")
_LOOKAHEAD = "lookahead decoding is not supported"
REJECTED_INPUTS: dict[str, str] = {
    "encoder_input_features": _ENCODER,
    "encoder_output_lengths": _ENCODER,
    "cross_attention_mask": _ENCODER,
    "skip_cross_attn_blocks": _ENCODER,
    "mrope_rotary_cos_sin": _ENCODER,
    "mrope_position_deltas": _ENCODER,
    "draft_input_ids": _SPECULATIVE,
    "draft_logits": _SPECULATIVE,
    "draft_acceptance_threshold": _SPECULATIVE,
    "prompt_embedding_table": _PROMPT_TUNING,
    "prompt_table_extra_ids": _PROMPT_TUNING,
    "prompt_vocab_size": _PROMPT_TUNING,
    "lora_task_id": _LORA,
    "lora_weights": _LORA,
    "lora_config": _LORA,
    "context_phase_params": "disaggregated (context / generation) serving is not supported",
    "retention_token_range_starts": _RETENTION,
    "retention_token_range_ends": _RETENTION,
    "retention_token_range_priorities": _RETENTION,
    "retention_token_range_durations_ms": _RETENTION,
    "retention_decode_priority": _RETENTION,
    "retention_decode_duration_ms": _RETENTION,
    "guided_decoding_guide_type": _GUIDED,
    "guided_decoding_guide": _GUIDED,
    "lookahead_window_size": _LOOKAHEAD,
    "lookahead_ngram_size": _LOOKAHEAD,
    "lookahead_verification_set_size": _LOOKAHEAD,
}
# Beam-search settings: accepted at the value that means nothing without beams (as
# TensorRT-LLM does with beam_width 1), rejected otherwise: beam search is not implemented.
_BEAM_ONLY = {"len_penalty": 1.0, "beam_search_diversity_rate": 0.0}
IMPLEMENTED_INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "num_return_sequences", "end_id",
    "pad_id", "stop_words_list", "bad_words_list", "embedding_bias", "beam_width",
    "temperature", "runtime_top_k", "runtime_top_p", "runtime_top_p_min",
    "runtime_top_p_decay", "runtime_top_p_reset_ids", "len_penalty", "early_stopping",
    "repetition_penalty", "min_tokens", "beam_search_diversity_rate", "presence_penalty",
    "frequency_penalty", "seed", "return_log_probs", "return_context_logits",
    "return_generation_logits", "return_perf_metrics", "exclude_input_in_output", "stop",
    "streaming", "decoder_input_ids", "decoder_input_lengths",
)
TENSORRT_LLM_INPUTS = IMPLEMENTED_INPUTS + tuple(REJECTED_INPUTS)
# Request parameters (not tensors) the token and text models read. ``Streaming`` is what
# the official inflight_batcher_llm_client sends next to the ``streaming`` input.
STREAMING_PARAMETER = "Streaming"
# What the ensemble and BLS models call the inputs they pass on under another name.
ENSEMBLE_NAMES = {"runtime_top_k": "top_k", "runtime_top_p": "top_p",
                  "len_penalty": "length_penalty", "streaming": "stream",
                  "prompt_table_extra_ids": "prompt_table_extra_id"}


def input_label(name: str) -> str:
    """``'name'``, with the ensemble's name for it when that differs."""
    other = ENSEMBLE_NAMES.get(name)
    return f"'{name}'" + (f" (ensemble input '{other}')" if other else "")


@dataclass(frozen=True)
class TokenItem:
    """One prompt of the batch: its ids, how to sample it, how to answer."""

    batch_index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    num_return_sequences: int = 1
    streaming: bool = False
    exclude_input_in_output: bool = False
    return_perf_metrics: bool = False
    pad_id: int | None = None


@dataclass(frozen=True)
class TokenRequest:
    """A parsed request: its items, or a stop signal (``stop``: end the request with the
    same request id; nothing else of it is read)."""

    items: tuple[TokenItem, ...]
    stop: bool = False
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    priority: str = NORMAL_PRIORITY


def batch_size(inputs: Mapping[str, np.ndarray | None], name: str) -> int:
    array = inputs.get(name)
    if array is None:
        raise InvalidRequest(f"missing required input '{name}'")
    if array.ndim == 0:
        raise InvalidRequest(f"input '{name}' needs a batch dimension, got a scalar")
    return int(array.shape[0])


def item_value(inputs: Mapping[str, np.ndarray | None], name: str, index: int, size: int,
               kinds: str, what: str):
    """Item ``index``'s value of a per-item scalar input (``[B]`` or ``[B, 1]``), or None."""
    array = inputs.get(name)
    if array is None:
        return None
    if array.dtype.kind not in kinds:
        raise InvalidRequest(f"input {input_label(name)} must be {what}, got {array.dtype}")
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    if flat.shape[1] != 1 or flat.shape[0] not in (size, 1):
        raise InvalidRequest(f"input {input_label(name)} must hold one value per batch item "
                             f"({size}), got shape {array.shape}")
    return flat[index if flat.shape[0] == size else 0, 0].item()


def word_lists(array: np.ndarray | None, name: str, index: int,
               size: int) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's word-list format ``[B, 2, L]``: row 0 the ids of all words one after
    another, row 1 where each word ends (cumulative), padded with -1."""
    if array is None or array.size == 0:
        return ()
    if array.dtype.kind not in "iu":
        raise InvalidRequest(f"input '{name}' must be INT32 token ids, got {array.dtype}")
    if array.ndim == 2 and size == 1:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != 2 or array.shape[0] not in (size, 1):
        raise InvalidRequest(f"input '{name}' must be shaped [batch, 2, length], got "
                             f"{array.shape}")
    ids, ends = array[index if array.shape[0] == size else 0]
    words, start = [], 0
    for end in ends.tolist():
        if end < 0:
            break
        if not start < end <= len(ids):
            raise InvalidRequest(f"input '{name}': offsets must grow within the ids, got "
                                 f"{ends.tolist()}")
        words.append(tuple(int(t) for t in ids[start:end]))
        start = end
    return tuple(words)


def _embedding_bias(array: np.ndarray | None, index: int,
                    size: int) -> tuple[tuple[int, float], ...]:
    if array is None or array.size == 0:
        return ()
    if array.dtype.kind != "f":
        raise InvalidRequest(f"input 'embedding_bias' must be FP32, got {array.dtype}")
    if array.ndim == 1 and size == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] not in (size, 1):
        raise InvalidRequest(f"input 'embedding_bias' must be shaped [batch, vocab], got "
                             f"{array.shape}")
    row = array[index if array.shape[0] == size else 0]
    if not np.isfinite(row).all():
        raise InvalidRequest("input 'embedding_bias' must be finite")
    return tuple((int(i), float(row[i])) for i in np.flatnonzero(row))


def _check_rejected(inputs: Mapping[str, np.ndarray | None], size: int) -> None:
    for name, reason in REJECTED_INPUTS.items():
        array = inputs.get(name)
        if array is not None and array.size:
            raise InvalidRequest(f"input {input_label(name)} is not supported: {reason}")
    for index in range(size):
        beam_width = item_value(inputs, "beam_width", index, size, "iu", "INT32")
        if beam_width is not None and beam_width != 1:
            raise InvalidRequest(f"beam_width={beam_width}: beam search is not implemented "
                                 "(beam_width must be 1; num_return_sequences gives several "
                                 "sampled sequences)")
        for name, neutral in _BEAM_ONLY.items():
            value = item_value(inputs, name, index, size, "f", "FP32")
            if value is not None and value != neutral:
                raise InvalidRequest(f"input {input_label(name)}={value}: it applies only to "
                                     f"beam search, which is not implemented (beam_width 1)")
        if item_value(inputs, "early_stopping", index, size, "b", "BOOL") is not None:
            raise InvalidRequest("input 'early_stopping' applies only to beam search, which "
                                 "is not implemented (beam_width 1)")
        decay = item_value(inputs, "runtime_top_p_decay", index, size, "f", "FP32")
        reset = item_value(inputs, "runtime_top_p_reset_ids", index, size, "iu", "INT32")
        if (decay is not None and decay != 1.0) or (reset is not None and reset != -1):
            raise InvalidRequest("inputs 'runtime_top_p_decay' / 'runtime_top_p_reset_ids': "
                                 "top-p decay is not implemented (decay must be 1.0)")
    # The official preprocessing always sends one pad token per item here (its "no decoder
    # input"); an actual decoder prompt is for encoder-decoder models.
    decoder_ids = inputs.get("decoder_input_ids")
    if decoder_ids is not None and decoder_ids.size > decoder_ids.shape[0]:
        raise InvalidRequest(f"input 'decoder_input_ids' is not supported: {_ENCODER}")


def parse_token_request(
    inputs: Mapping[str, np.ndarray | None], *, default_exclude_input: bool,
    parameters: Mapping[str, object] | None = None, decoupled: bool = True,
) -> TokenRequest:
    """Validate one request of the ``tensorrt_llm`` model. Raises ``InvalidRequest``."""
    parameters = dict(parameters or {})
    stream_parameter = parameters.pop(STREAMING_PARAMETER, None)
    scheduling = request_scheduling_parameters(parameters)
    stop = inputs.get("stop")
    if stop is not None and stop.size and bool(stop.reshape(-1)[0]):
        return TokenRequest(items=(), stop=True)
    size = batch_size(inputs, "input_ids")
    _check_rejected(inputs, size)
    ids = inputs["input_ids"]
    assert ids is not None
    if ids.dtype.kind not in "iu":
        raise InvalidRequest(f"input 'input_ids' must be INT32 token ids, got {ids.dtype}")
    ids = ids.reshape(size, -1)
    items = []
    for index in range(size):
        items.append(_parse_item(inputs, index, size, ids[index], default_exclude_input,
                                 stream_parameter, decoupled))
    return TokenRequest(items=tuple(items), **scheduling)


def _parse_item(inputs: Mapping[str, np.ndarray | None], index: int, size: int,
                ids: np.ndarray, default_exclude_input: bool, stream_parameter: object,
                decoupled: bool) -> TokenItem:
    def value(name: str, kinds: str, what: str, default=None):  # type: ignore[no-untyped-def]
        got = item_value(inputs, name, index, size, kinds, what)
        return default if got is None else got

    length = value("input_lengths", "iu", "INT32")
    if length is None:
        raise InvalidRequest("missing required input 'input_lengths'")
    if not 0 < length <= len(ids):
        raise InvalidRequest(f"input_lengths[{index}]={length} must be in [1, {len(ids)}] "
                             f"(the length of input_ids)")
    output_len = value("request_output_len", "iu", "INT32")
    if output_len is None:
        raise InvalidRequest("missing required input 'request_output_len'")
    if output_len <= 0:
        raise InvalidRequest(f"request_output_len must be positive, got {output_len}")
    streaming = bool(value("streaming", "b", "BOOL", False))
    if stream_parameter is not None:
        if not isinstance(stream_parameter, bool):
            raise InvalidRequest(f"request parameter '{STREAMING_PARAMETER}' must be a "
                                 f"boolean, got {stream_parameter!r}")
        if inputs.get("streaming") is None:
            streaming = stream_parameter
        elif stream_parameter != streaming:
            raise InvalidRequest(f"request parameter '{STREAMING_PARAMETER}' "
                                 f"({stream_parameter}) contradicts input 'streaming' "
                                 f"({streaming})")
    if streaming and not decoupled:
        raise InvalidRequest("streaming needs the model in decoupled mode "
                             "(model_transaction_policy { decoupled: true })")
    num_sequences = int(value("num_return_sequences", "iu", "INT32", 1))
    if num_sequences < 1:
        raise InvalidRequest(f"num_return_sequences must be >= 1, got {num_sequences}")
    if num_sequences > 1 and not decoupled:
        raise InvalidRequest("num_return_sequences > 1 needs the model in decoupled mode "
                             "(one response per sequence, with sequence_index)")
    seed = value("seed", "iu", "UINT64")
    end_id = value("end_id", "iu", "INT32")
    try:
        sampling = SamplingParams(
            max_tokens=int(output_len),
            temperature=float(value("temperature", "f", "FP32", 1.0)),
            top_k=int(value("runtime_top_k", "iu", "INT32", 0)),
            top_p=float(value("runtime_top_p", "f", "FP32", 0.0)),
            seed=None if seed is None else int(seed),
            min_length=int(value("min_tokens", "iu", "INT32", 0)),
            end_id=None if end_id is None else int(end_id),
            repetition_penalty=float(value("repetition_penalty", "f", "FP32", 1.0)),
            presence_penalty=float(value("presence_penalty", "f", "FP32", 0.0)),
            frequency_penalty=float(value("frequency_penalty", "f", "FP32", 0.0)),
            logit_bias=_embedding_bias(inputs.get("embedding_bias"), index, size),
            bad_words=word_lists(inputs.get("bad_words_list"), "bad_words_list", index, size),
            stop_token_ids=word_lists(inputs.get("stop_words_list"), "stop_words_list", index,
                                      size),
            return_log_probs=bool(value("return_log_probs", "b", "BOOL", False)),
            return_context_logits=bool(value("return_context_logits", "b", "BOOL", False)),
            return_generation_logits=bool(value("return_generation_logits", "b", "BOOL",
                                                False)),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    pad_id = value("pad_id", "iu", "INT32")
    return TokenItem(
        batch_index=index,
        prompt_ids=[int(t) for t in ids[:length]],
        sampling=sampling,
        num_return_sequences=num_sequences,
        streaming=streaming,
        exclude_input_in_output=bool(value("exclude_input_in_output", "b", "BOOL",
                                           default_exclude_input)),
        return_perf_metrics=bool(value("return_perf_metrics", "b", "BOOL", False)),
        pad_id=None if pad_id is None else int(pad_id),
    )


def sequence_seed(seed: int | None, sequence_index: int) -> int | None:
    """The seed of sequence ``sequence_index`` of a request seeded with ``seed``: distinct
    per sequence (else all would be the same), reproducible."""
    if seed is None:
        return None
    return (seed + sequence_index * 0x9E3779B97F4A7C15) % 2**64

