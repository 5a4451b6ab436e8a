"""Open-loop load generator on Triton's asyncio gRPC streaming client.

Requests leave at their scheduled times whatever the responses do: one async generator
feeds a single bidirectional stream, sleeping until each request's time; responses are
read concurrently and stamped on arrival (``time.perf_counter``). Every request streams
one response per token (``stream=true``) and is forced to its drawn output length
(``max_tokens = min_length``); the count of streamed tokens is checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.request import NORMAL_PRIORITY
from .metrics import RequestTimeline
from .workload import Workload

logger = logging.getLogger(__name__)


class LoadError(RuntimeError):
    pass


@dataclass
class _Track:
    scheduled_s: float
    send_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None


def make_inputs(prompt: str, output_tokens: int) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, datatype: str, value: Any, dtype: Any) -> Any:
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=dtype))
        return t

    return [
        tensor("text_input", "BYTES", prompt.encode("utf-8"), np.object_),
        tensor("max_tokens", "INT32", output_tokens, np.int32),
        tensor("min_length", "INT32", output_tokens, np.int32),
        tensor("stream", "BOOL", True, np.bool_),
        tensor("exclude_input_in_output", "BOOL", True, np.bool_),
    ]


def run_open_loop(
    url: str,
    workload: Workload,
    prompts: Sequence[str],
    *,
    model_name: str = "llm",
    timeout_s: float = 600.0,
    label: str = "",
    progress: bool = True,
    request_parameters: Mapping[str, Any] | None = None,
) -> tuple[list[RequestTimeline], dict[str, Any]]:
    """Send ``workload`` open loop; timelines (seconds from the start) and run facts.

    A request's arrival in its timeline is its actual send time. Raises ``LoadError`` on
    an error response, a wrong token count, or requests unfinished ``timeout_s`` after
    the last scheduled arrival. ``request_parameters`` are Triton request parameters sent
    with every request (e.g. ``{"ttft_slo_ms": 2000, "tbt_slo_ms": 500}``).
    """
    parameters = {"triton_enable_empty_final_response": True, **(request_parameters or {})}
    return asyncio.run(
        _run(url, workload, prompts, model_name, timeout_s, label, progress, parameters)
    )


async def _run(
    url: str,
    workload: Workload,
    prompts: Sequence[str],
    model_name: str,
    timeout_s: float,
    label: str,
    progress: bool,
    parameters: dict[str, Any],
) -> tuple[list[RequestTimeline], dict[str, Any]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tqdm import tqdm

    specs = workload.requests
    inputs = [make_inputs(p, s.output_tokens) for p, s in zip(prompts, specs, strict=True)]
    outputs = [grpcclient.InferRequestedOutput("text_output")]
    tracks = {str(s.index): _Track(s.arrival_time_s) for s in specs}
    all_done = asyncio.Event()
    client = aioclient.InferenceServerClient(url=url)
    start = time.perf_counter() + 0.2

    async def requests() -> Any:
        for spec, request_inputs in zip(specs, inputs, strict=True):
            delay = start + spec.arrival_time_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tracks[str(spec.index)].send_s = time.perf_counter()
            yield {
                "model_name": model_name,
                "inputs": request_inputs,
                "request_id": str(spec.index),
                "outputs": outputs,
                # A high-priority workload entry asks for it (Triton reserves "priority").
                "parameters": (parameters if spec.priority == NORMAL_PRIORITY
                               else {**parameters, "request_priority": spec.priority}),
            }
        await all_done.wait()  # keep the stream open until every response is in

    bar = tqdm(
        total=len(specs), desc=label or "requests", unit="req", disable=not progress, leave=False
    )
    remaining = len(specs)

    async def consume() -> None:
        nonlocal remaining
        stream = client.stream_infer(requests())
        async for result, error in stream:
            now = time.perf_counter()
            if error is not None:
                raise LoadError(f"the server answered with an error: {error}")
            response = result.get_response()
            track = tracks[response.id]
            if response.outputs:
                track.token_times_s.append(now)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                track.finish_s = now
                remaining -= 1
                bar.update(1)
                if remaining == 0:
                    all_done.set()
                    break

    try:
        await asyncio.wait_for(consume(), timeout=0.2 + workload.duration_s + timeout_s)
    except asyncio.TimeoutError:
        unfinished = sorted(k for k, t in tracks.items() if t.finish_s is None)
        raise LoadError(
            f"{len(unfinished)} of {len(specs)} requests unfinished "
            f"{timeout_s:.0f} s after the last arrival (e.g. {unfinished[:5]})"
        ) from None
    finally:
        all_done.set()
        bar.close()
        await client.close()
    timelines = []
    lags = []
    for spec in specs:
        t = tracks[str(spec.index)]
        assert t.send_s is not None and t.finish_s is not None
        if len(t.token_times_s) != spec.output_tokens:
            raise LoadError(
                f"request {spec.index}: {len(t.token_times_s)} tokens streamed, "
                f"{spec.output_tokens} expected"
            )
        lags.append(t.send_s - start - t.scheduled_s)
        timelines.append(
            RequestTimeline(
                str(spec.index),
                t.send_s - start,
                spec.input_tokens,
                [x - start for x in t.token_times_s],
                t.finish_s - start,
            )
        )
    return timelines, {"max_send_lag_s": max(lags), "mean_send_lag_s": float(np.mean(lags))}
