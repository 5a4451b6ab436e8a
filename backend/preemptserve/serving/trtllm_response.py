"""Responses of the ``tensorrt_llm`` model: engine outputs -> TensorRT-LLM's output tensors.

Numpy and torch only, no Triton: the model hands each ``ResponseGroup`` a ``send``
function (arrays, error, final) and registers one ``SequenceResponder`` per sequence as
the engine loop's callback. Callbacks all run on the loop's one sender thread, so a group
needs no lock.

TensorRT-LLM's conventions, per response of one sequence (decoupled mode):

* ``output_ids`` [1, 1, n] and ``sequence_length`` [1, 1]: when streaming only the new
  tokens; otherwise, at the end, all of them, after the prompt unless
  ``exclude_input_in_output``. A streamed token that ends inside a multi-byte
  character waits for the token that completes it, so every chunk decodes to whole
  characters on its own (the ``postprocessing`` model decodes chunks one by one).
* ``batch_index`` / ``sequence_index`` [1, 1]: which prompt of the batch, which of its
  ``num_return_sequences``.
* ``cum_log_probs`` [1, 1] and ``output_log_probs`` [1, 1, k] (the new tokens' when
  streaming) with ``return_log_probs``; ``context_logits`` [1, prompt, vocab] once;
  ``generation_logits`` [1, 1, k, vocab]; the perf outputs with ``return_perf_metrics``.

The request's last response carries the FINAL flag. Without decoupled mode (one response
per request) the items of a batch come back together, ``[B, 1, ...]``, padded with
``pad_id``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..engine.outputs import RequestMetrics, RequestOutput
from .trtllm_request import TokenItem

# (arrays, error message, final): arrays None and error None with final: the FINAL flag
# alone.
SendFn = Callable[[dict[str, np.ndarray] | None, str | None, bool], None]

# time.monotonic() + this = nanoseconds since the Unix epoch (TensorRT-LLM's clock).
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def _epoch_ns(monotonic_s: float | None) -> int:
    return 0 if monotonic_s is None else int(monotonic_s * 1e9) + _EPOCH_OFFSET_NS


def _scalar(value: float | int, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def perf_arrays(metrics: RequestMetrics | None) -> dict[str, np.ndarray]:
    """The per-request perf outputs (speculative decoding ones: 0, none is done)."""
    if metrics is None:
        return {}
    return {
        "kv_cache_alloc_new_blocks": _scalar(metrics.num_blocks_new, np.int32),
        "kv_cache_reused_blocks": _scalar(metrics.num_blocks_reused, np.int32),
        "kv_cache_alloc_total_blocks": _scalar(metrics.num_blocks_total, np.int32),
        "arrival_time_ns": _scalar(_epoch_ns(metrics.arrival_time_s), np.int64),
        "first_scheduled_time_ns": _scalar(_epoch_ns(metrics.first_scheduled_time_s),
                                           np.int64),
        "first_token_time_ns": _scalar(_epoch_ns(metrics.first_token_time_s), np.int64),
        "last_token_time_ns": _scalar(_epoch_ns(metrics.last_token_time_s), np.int64),
        "acceptance_rate": _scalar(0.0, np.float32),
        "total_accepted_draft_tokens": _scalar(0, np.int32),
        "total_draft_tokens": _scalar(0, np.int32),
    }


@dataclass
class _Chunk:
    """Tokens (and what came with them) not sent yet."""

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    generation_logits: list = field(default_factory=list)  # [V] torch rows
    context_logits: object = None  # [P, V] torch tensor

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.token_ids)
        if output.log_probs is not None:
            self.log_probs.extend(output.log_probs)
        if output.generation_logits is not None:
            self.generation_logits.extend(output.generation_logits)
        if output.context_logits is not None:
            self.context_logits = output.context_logits


class SequenceResponder:
    """One sequence of one request: its engine outputs -> response arrays."""

    def __init__(self, group: ResponseGroup, item: TokenItem, sequence_index: int) -> None:
        self.group = group
        self.item = item
        self.sequence_index = sequence_index
        self.request_id: str = ""  # the engine's id, set by the model once submitted
        self._pending = _Chunk()
        self._num_output_tokens = 0
        self._cum_log_prob = 0.0
        self._metrics: RequestMetrics | None = None
        self.finished = False

    def __call__(self, output: RequestOutput, error: str | None) -> None:
        """The engine loop's callback (sender thread)."""
        if self.finished:
            return
        if error is not None:
            self.finished = True
            self.group.fail(error)
            return
        self._pending.add(output)
        if output.metrics is not None:
            self._metrics = output.metrics
        if output.finished:
            self.finished = True
            self.group.sequence_done(self, output.finish_reason == "abort")
        elif self.item.streaming and output.text:
            # Text came out: every pending token is part of whole characters now.
            self.group.send_stream(self.arrays(), final=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The pending chunk as one response's arrays (and clear it)."""
        chunk, self._pending = self._pending, _Chunk()
        item = self.item
        self._num_output_tokens += len(chunk.token_ids)
        self._cum_log_prob += sum(chunk.log_probs)
        if item.streaming:
            token_ids = chunk.token_ids
            log_probs = chunk.log_probs
            generation = chunk.generation_logits
        else:  # everything, once, at the end
            prefix = [] if item.exclude_input_in_output else item.prompt_ids
            token_ids = prefix + chunk.token_ids
            log_probs, generation = chunk.log_probs, chunk.generation_logits
        arrays = {
            "output_ids": np.array([[token_ids]], dtype=np.int32).reshape(1, 1, -1),
            "sequence_length": _scalar(len(token_ids), np.int32),
            "batch_index": _scalar(item.batch_index, np.int32),
            "sequence_index": _scalar(self.sequence_index, np.int32),
        }
        sampling = item.sampling
        if sampling.return_log_probs:
            arrays["cum_log_probs"] = _scalar(self._cum_log_prob, np.float32)
            arrays["output_log_probs"] = np.array(log_probs, dtype=np.float32).reshape(1, 1, -1)
        if sampling.return_context_logits and chunk.context_logits is not None:
            arrays["context_logits"] = chunk.context_logits.numpy()[None]  # type: ignore[attr-defined]
        if sampling.return_generation_logits and generation:
            import torch

            arrays["generation_logits"] = torch.stack(generation).numpy()[None, None]
        if item.return_perf_metrics:
            arrays.update(perf_arrays(self._metrics))
        return arrays

    @property
    def has_pending(self) -> bool:
        return bool(self._pending.token_ids or self._pending.context_logits is not None)


class ResponseGroup:
    """All sequences of one Triton request: sends their responses, the last one FINAL.

    ``cancel_all(request_ids)`` ends the sequences still running (a failure of one ends
    the request). Decoupled: one response per streamed chunk or per finished sequence.
    Not decoupled: one response when all are done, the items side by side.
    """

    def __init__(self, send: SendFn, decoupled: bool,
                 cancel_all: Callable[[list[str]], None]) -> None:
        self._send = send
        self.decoupled = decoupled
        self._cancel_all = cancel_all
        self.sequences: list[SequenceResponder] = []
        self._num_open = 0
        self.closed = False
        self._results: dict[int, dict[str, np.ndarray]] = {}

    def add(self, item: TokenItem, sequence_index: int) -> SequenceResponder:
        responder = SequenceResponder(self, item, sequence_index)
        self.sequences.append(responder)
        self._num_open += 1
        return responder

    def send_stream(self, arrays: dict[str, np.ndarray], final: bool) -> None:
        if not self.closed:
            self._send(arrays, None, final)

    def sequence_done(self, sequence: SequenceResponder, aborted: bool) -> None:
        if self.closed:
            return
        self._num_open -= 1
        last = self._num_open == 0
        if not self.decoupled:
            self._results[sequence.item.batch_index] = sequence.arrays()
            if last:
                self.closed = True
                self._send(combine([self._results[i] for i in sorted(self._results)],
                                   [s.item for s in self.sequences]), None, True)
            return
        # Streaming: what is still held back, unless cancelled. Not streaming: the whole
        # output, also when stopped early (TensorRT-LLM's stop answers with what exists).
        if not sequence.item.streaming or (sequence.has_pending and not aborted):
            self._send(sequence.arrays(), None, last)
        elif last:
            self._send(None, None, True)
        if last:
            self.closed = True

    def fail(self, message: str) -> None:
        """A sequence failed: the request ends with the error; the others are cancelled."""
        if self.closed:
            return
        self.closed = True
        self._send(None, message, True)
        running = [s.request_id for s in self.sequences if not s.finished and s.request_id]
        if running:
            self._cancel_all(running)


def combine(results: list[dict[str, np.ndarray]],
            items: list[TokenItem]) -> dict[str, np.ndarray]:
    """Per-item arrays ([1, ...] each) stacked into one response, ragged dims padded:
    ``output_ids`` with the item's ``pad_id`` (its end id, else 0), others with 0."""
    if len(results) == 1:
        return results[0]
    pads = {item.batch_index: item.pad_id if item.pad_id is not None else
            (item.sampling.end_id if item.sampling.end_id is not None else 0)
            for item in items}
    combined = {}
    for name in results[0]:
        arrays = [r[name] for r in results]
        shape = [max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim)]
        padded = []
        for index, array in enumerate(arrays):
            pad_value = pads.get(index, 0) if name == "output_ids" else 0
            widths = [(0, shape[d] - array.shape[d]) for d in range(array.ndim)]
            widths[0] = (0, 0)
            padded.append(np.pad(array, widths, constant_values=pad_value))
        combined[name] = np.concatenate(padded, axis=0)
    return combined
