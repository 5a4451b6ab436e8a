"""End to end through a real tritonserver: gRPC streaming, HTTP, concurrency, errors."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from stream_client import StreamError

MODEL = "llm"


def post_json(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ")]


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    """``{label_text: value}`` for every sample of a Prometheus metric family."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        values[match.group(1)] = float(match.group(2))
    return values


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def blocks_used(triton_server) -> float:
    samples = metric_values(triton_server.metrics_url, "preemptserve_kv_blocks")
    return next(v for k, v in samples.items() if 'state="used"' in k)


def test_grpc_stream_sends_one_response_per_token(generate):
    result = generate("The value of", 12, min_length=12, exclude_input_in_output=True)
    assert result.num_tokens == 12
    assert result.text.strip()
    assert result.ttft_s is not None and result.ttft_s <= result.total_s


def test_non_streaming_gives_one_response_with_the_whole_text(generate):
    streamed = generate("The value of", 10, min_length=10, exclude_input_in_output=True)
    whole = generate("The value of", 10, min_length=10, exclude_input_in_output=True,
                     stream=False)
    assert whole.num_tokens == 1
    assert whole.text == streamed.text


def test_input_is_included_unless_excluded(generate):
    prompt = "Return the list"
    included = generate(prompt, 6, stream=False, exclude_input_in_output=False)
    excluded = generate(prompt, 6, stream=False, exclude_input_in_output=True)
    assert included.text == prompt + excluded.text


def test_http_generate_and_generate_stream_agree_with_grpc(triton_server, generate):
    body = {"text_input": "A file object", "max_tokens": 8, "min_length": 8,
            "exclude_input_in_output": True}
    expected = generate("A file object", 8, min_length=8, exclude_input_in_output=True).text
    status, text = post_json(f"{triton_server.http_url}/v2/models/{MODEL}/generate", body)
    assert status == 200, text
    assert json.loads(text)["text_output"] == expected
    status, text = post_json(f"{triton_server.http_url}/v2/models/{MODEL}/generate_stream",
                             {**body, "stream": True})
    assert status == 200, text
    events = sse_events(text)
    assert len(events) == 8
    assert "".join(e["text_output"] for e in events) == expected


def test_concurrent_requests_equal_their_outputs_alone(generate):
    prompts = [f"{'The value of x ' * (1 + i % 7)}item {i}" for i in range(32)]
    lengths = [8 + (i * 5) % 24 for i in range(32)]
    alone = [generate(p, n, exclude_input_in_output=True).text
             for p, n in zip(prompts, lengths, strict=True)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(
            lambda args: generate(args[0], args[1], exclude_input_in_output=True).text,
            zip(prompts, lengths, strict=True),
        ))
    assert together == alone


def test_seeded_sampling_is_reproducible(generate):
    kwargs = dict(temperature=0.8, top_k=50, top_p=0.95, random_seed=7,
                  exclude_input_in_output=True)
    first = generate("Open the file", 16, **kwargs).text
    assert generate("Open the file", 16, **kwargs).text == first


def test_stop_words_end_the_text(generate):
    full = generate("Return the", 24, exclude_input_in_output=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate("Return the", 24, stop_words=[stop], exclude_input_in_output=True).text
    assert cut == full[: full.find(stop)]


def test_cancellation_frees_blocks_and_server_keeps_serving(triton_server, stream, generate):
    token_stream = stream("A long story", 1500, min_length=1500)
    for index, _ in enumerate(token_stream):
        if index == 3:
            break  # leaving the iteration cancels the request
    token_stream.close()
    wait_until(lambda: blocks_used(triton_server) == 0, what="KV blocks to be freed")
    assert generate("Still alive", 4, min_length=4).num_tokens == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 4}, "text_input"),
        ({"text_input": "hi"}, "max_tokens"),
        ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be positive"),
        ({"text_input": "hi", "max_tokens": 100000}, "maximum context"),
        ({"text_input": "word " * 3000, "max_tokens": 4}, "maximum context"),
        ({"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"text_input": "hi", "max_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"text_input": "hi", "max_tokens": 4, "min_tokens": 3}, "min_tokens"),
        ({"text_input": "hi", "max_tokens": 4, "end_id": 99999}, "end_id"),
        ({"text_input": "hi", "max_tokens": "many"}, ""),
    ],
)
def test_bad_input_gets_an_error_and_the_server_keeps_serving(triton_server, generate, body,
                                                              message):
    status, text = post_json(f"{triton_server.http_url}/v2/models/{MODEL}/generate", body)
    assert status >= 400, text
    assert message in json.loads(text)["error"]
    assert generate("Still alive", 3, min_length=3).num_tokens == 3
    with urllib.request.urlopen(f"{triton_server.http_url}/v2/health/ready") as response:
        assert response.status == 200


def test_bad_input_over_grpc_stream_is_an_error_for_that_request_only(stream):
    with pytest.raises(StreamError, match="max_tokens must be positive"):
        for _ in stream("hi", 0):
            pass


def test_wrong_input_type_over_grpc_is_rejected(grpc_client):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [1], "FP32")
    max_tokens.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    errors = []
    grpc_client.start_stream(callback=lambda result, error: errors.append(error))
    grpc_client.async_stream_infer(MODEL, [text, max_tokens], enable_empty_final_response=True)
    wait_until(lambda: errors, what="an error response")
    grpc_client.stop_stream()
    assert errors[0] is not None and "max_tokens" in str(errors[0])


def test_metrics_endpoint_shows_custom_metrics(triton_server, generate):
    before = metric_values(triton_server.metrics_url, "preemptserve_generated_tokens_total")
    generate("Count these", 5, min_length=5)

    def counted() -> bool:
        after = metric_values(triton_server.metrics_url, "preemptserve_generated_tokens_total")
        return sum(after.values()) >= sum(before.values()) + 5

    wait_until(counted, what="the token counter to grow")
    for name in ("preemptserve_requests", "preemptserve_kv_blocks",
                 "preemptserve_preemptions_total"):
        assert metric_values(triton_server.metrics_url, name), name
    total = metric_values(triton_server.metrics_url, "preemptserve_kv_blocks")
    assert any('state="total"' in k and v > 0 for k, v in total.items())


def test_http_client_library_infer_is_rejected_cleanly_for_decoupled(triton_server):
    # Plain (non-streaming) HTTP infer cannot serve a decoupled model: Triton says so.
    client = httpclient.InferenceServerClient(triton_server.http_url.removeprefix("http://"))
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    max_tokens = httpclient.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([2], dtype=np.int32))
    with pytest.raises(Exception, match="decoupled"):
        client.infer(MODEL, [text, max_tokens])
    assert client.is_server_ready()
