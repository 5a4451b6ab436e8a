#!/usr/bin/env python3
"""Stream text from the ``llm`` model over Triton's gRPC streaming API.

Library use::

    stream = stream_generate("127.0.0.1:8001", "llm", "The capital of France is", 32)
    for delta in stream:
        print(delta, end="", flush=True)
    print(stream.result.ttft_s, stream.result.tokens_per_s)

Command line::

    python client/stream_client.py --url 127.0.0.1:8001 --prompt "Hello" --max-tokens 64

The model is decoupled: with ``stream=True`` it sends one response per generated token
(its text delta) and closes the request with an empty response flagged final. The client
asks for that empty final response (``enable_empty_final_response=True``) and recognises
it by the ``triton_final_response`` response parameter.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL = "llm"
OUTPUT_NAME = "text_output"

# Optional inputs of the model: name -> (Triton datatype, numpy dtype).
_SCALAR_INPUTS: dict[str, tuple[str, Any]] = {
    "stream": ("BOOL", np.bool_),
    "temperature": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "top_p": ("FP32", np.float32),
    "random_seed": ("UINT64", np.uint64),
    "min_length": ("INT32", np.int32),
    "end_id": ("INT32", np.int32),
    "exclude_input_in_output": ("BOOL", np.bool_),
}
SAMPLING_INPUTS = frozenset(_SCALAR_INPUTS) | {"stop_words"}


class StreamError(RuntimeError):
    """The server rejected the request or the stream broke off."""


@dataclass
class StreamResult:
    """What one generation produced and how fast.

    ``num_tokens`` counts the responses that carried text: one per token when streaming,
    a single one when the request was sent with ``stream=False``.
    """

    text: str = ""
    num_tokens: int = 0
    ttft_s: float | None = None  # request sent -> first text response
    total_s: float = 0.0  # request sent -> final response
    token_times_s: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        """End-to-end rate: tokens over the whole request time, prefill included."""
        return self.num_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Rate after the first token: (tokens - 1) over first-to-last token time."""
        if self.num_tokens < 2:
            return 0.0
        span_s = self.token_times_s[-1] - self.token_times_s[0]
        return (self.num_tokens - 1) / span_s if span_s > 0 else 0.0


def build_inputs(prompt: str, max_tokens: int, **sampling: Any) -> list[grpcclient.InferInput]:
    """Input tensors for one request; ``sampling`` keys are the model's optional inputs.

    ``None`` values are left out, so the model's defaults apply (greedy decoding).
    """
    unknown = set(sampling) - SAMPLING_INPUTS
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)}; known: {sorted(SAMPLING_INPUTS)}")
    inputs = [
        _tensor("text_input", "BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_)),
        _tensor("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
    ]
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop_words":
            words = [value] if isinstance(value, str) else list(value)
            if not words:
                continue
            data = np.array([w.encode("utf-8") for w in words], dtype=np.object_)
            inputs.append(_tensor(name, "BYTES", data))
        else:
            datatype, dtype = _SCALAR_INPUTS[name]
            inputs.append(_tensor(name, datatype, np.array([value], dtype=dtype)))
    return inputs


def _tensor(name: str, datatype: str, data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


class TokenStream:
    """Iterator over the text deltas of one streamed request.

    ``result`` is complete once the iteration has ended. Leaving the iteration early
    (``break``, an exception) or calling ``close()`` cancels the request on the server.
    """

    def __init__(
        self,
        url: str,
        model: str,
        inputs: list[grpcclient.InferInput],
        timeout_s: float = 120.0,
        request_id: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self.result = StreamResult()
        self._parameters = parameters
        self.request_id = request_id or uuid.uuid4().hex
        self._url = url
        self._model = model
        self._inputs = inputs
        self._timeout_s = timeout_s
        self._iterator: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def __next__(self) -> str:
        return next(iter(self))

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]

    def _run(self) -> Iterator[str]:
        responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        client = grpcclient.InferenceServerClient(url=self._url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            start = time.perf_counter()
            client.async_stream_infer(
                model_name=self._model,
                inputs=self._inputs,
                outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                request_id=self.request_id,
                enable_empty_final_response=True,
                parameters=self._parameters,
            )
            while not finished:
                try:
                    result, error = responses.get(timeout=self._timeout_s)
                except queue.Empty:
                    raise StreamError(
                        f"no response from {self._model!r} at {self._url} "
                        f"for {self._timeout_s:.0f} s"
                    ) from None
                if error is not None:
                    finished = True  # an error ends the request; nothing to cancel
                    raise StreamError(f"{self._model!r} at {self._url}: {error}") from error
                now = time.perf_counter() - start
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                finished = bool(final is not None and final.bool_param)
                delta = _decode(result.as_numpy(OUTPUT_NAME))
                if delta is not None:
                    self._record(delta, now)
                    yield delta
                if finished:
                    self.result.total_s = now
        except InferenceServerException as e:
            # A broken stream reports its cause through the callback; the exception raised
            # here only says that the stream is no longer usable.
            cause = _queued_error(responses) or e
            raise StreamError(f"cannot stream from {self._url}: {cause}") from e
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    def _record(self, delta: str, now_s: float) -> None:
        result = self.result
        if result.ttft_s is None:
            result.ttft_s = now_s
        result.text += delta
        result.num_tokens += 1
        result.token_times_s.append(now_s)


def _queued_error(
    responses: queue.Queue[tuple[Any, InferenceServerException | None]],
) -> InferenceServerException | None:
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            _, error = responses.get(timeout=0.1)
        except queue.Empty:
            continue
        if error is not None:
            return error
    return None


def _decode(output: np.ndarray | None) -> str | None:
    """The text of a ``text_output`` tensor, or ``None`` for a response without one."""
    if output is None:
        return None
    return "".join(
        item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
        for item in output.reshape(-1)
    )


def stream_generate(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    timeout_s: float = 120.0,
    parameters: dict[str, Any] | None = None,
    **sampling: Any,
) -> TokenStream:
    """Stream a completion of ``prompt``; iterate the returned object for text deltas.

    ``sampling`` holds the model's optional inputs (``temperature``, ``top_k``, ``top_p``,
    ``random_seed``, ``min_length``, ``end_id``, ``stop_words``,
    ``exclude_input_in_output``, ``stream``); ``stream`` defaults to True. ``parameters``
    are request parameters (``ttft_slo_ms``, ``tbt_slo_ms``). ``timeout_s`` bounds the
    wait for each response. Raises ``StreamError`` on server errors.
    """
    sampling.setdefault("stream", True)
    return TokenStream(url, model, build_inputs(prompt, max_tokens, **sampling), timeout_s,
                       parameters=parameters)


def generate(url: str, model: str, prompt: str, max_tokens: int, **sampling: Any) -> StreamResult:
    """Run one request to completion and return its result."""
    stream = stream_generate(url, model, prompt, max_tokens, **sampling)
    for _ in stream:
        pass
    return stream.result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="gRPC host:port (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, dest="random_seed")
    parser.add_argument("--min-length", type=int)
    parser.add_argument("--end-id", type=int)
    parser.add_argument(
        "--stop", action="append", dest="stop_words", help="stop word; may be repeated"
    )
    parser.add_argument(
        "--exclude-input",
        action="store_const",
        const=True,
        dest="exclude_input_in_output",
        help="ask the model to leave the prompt out of the output",
    )
    parser.add_argument(
        "--no-stream", action="store_false", dest="stream", help="one response with all text"
    )
    parser.add_argument("--ttft-slo-ms", type=float,
                        help="this request's time-to-first-token objective (apt policy)")
    parser.add_argument("--tbt-slo-ms", type=float,
                        help="this request's time-between-tokens objective (apt policy)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per response")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    sampling = {
        name: getattr(args, name)
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "random_seed",
            "min_length",
            "end_id",
            "stop_words",
            "exclude_input_in_output",
            "stream",
        )
    }
    parameters = {name: value for name, value in (("ttft_slo_ms", args.ttft_slo_ms),
                                                  ("tbt_slo_ms", args.tbt_slo_ms))
                  if value is not None}
    stream = stream_generate(
        args.url, args.model, args.prompt, args.max_tokens, timeout_s=args.timeout,
        parameters=parameters or None, **sampling
    )
    try:
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
    except StreamError as e:
        if stream.result.num_tokens:
            sys.stdout.write("\n")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stream.close()
        print("\ninterrupted", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    result = stream.result
    ttft = f"{result.ttft_s * 1000:.1f} ms" if result.ttft_s is not None else "n/a"
    print(
        f"[{result.num_tokens} tokens in {result.total_s:.3f} s | TTFT {ttft} | "
        f"{result.tokens_per_s:.1f} tokens/s end-to-end, "
        f"{result.decode_tokens_per_s:.1f} tokens/s after the first]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
