"""``model_repository_trtllm/`` (decoupled, as shipped) through tritonserver with
tensorrtllm_backend's own client scripts, unchanged (``tests/tensorrtllm_backend/``).

``end_to_end_grpc_client.py`` checks its outputs itself (``--check-outputs``) against the
texts given, which come from the same checkpoint run here, in this process
(``Reference``); ``inflight_batcher_llm_client.py`` checks token ids (``--check-output``).
One server serves the whole module.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import subprocess
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_serving import metric_values, post_json, sse_events, wait_until
from tritonclient.utils import InferenceServerException, np_to_triton_dtype
from trtllm_helpers import (
    BENCHMARK,
    DATASET,
    E2E_CLIENT,
    ROOT,
    TOKEN_CLIENT,
    Reference,
    as_json,
    run_script,
    write_trtllm_repository,
)

from preemptserve.core.request import SamplingParams
from preemptserve.model.default_model import ensure_default_model
from preemptserve.triton_server import TritonServer

PROMPT = "The value of"
PROMPTS = ["The value of", "Return a list of the"]
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = write_trtllm_repository(tmp_path_factory.mktemp("trtllm"))
    with TritonServer(repo, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    return Reference()


def greedy_text(reference: Reference, prompt: str, num_tokens: int = NUM_TOKENS,
                **sampling) -> str:
    tokens, _ = reference.run(prompt, num_tokens, **sampling)
    return reference.text(tokens)


def e2e_client(server, *args: str) -> str:
    return run_script(E2E_CLIENT, ["-u", server.grpc_url, "-o", str(NUM_TOKENS), *args])


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
def test_end_to_end_client(server, reference, model, streaming):
    """The prompt leads a whole output; a streamed one is only new text."""
    expected = greedy_text(reference, PROMPT)
    args = ["-p", PROMPT, "--model-name", model, "--check-outputs",
            "--expected-outputs", as_json([expected])]
    e2e_client(server, *args, *(["-S"] if streaming else []))


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_batch_inputs(server, reference, model):
    expected = [greedy_text(reference, p) for p in PROMPTS]
    for streaming in ([], ["-S"]):
        e2e_client(server, "-p", as_json(PROMPTS), "--batch-inputs", "--model-name", model,
                   "--check-outputs", "--expected-outputs", as_json(expected), *streaming)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_two_sequences(server, reference, model):
    """-n 2: two sequences per prompt, told apart by sequence_index (greedy: the same)."""
    expected = greedy_text(reference, PROMPT)
    for streaming in ([], ["-S"]):
        e2e_client(server, "-p", PROMPT, "-n", "2", "--model-name", model,
                   "--check-outputs", "--expected-outputs", as_json([expected]), *streaming)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_penalty_exclude_input_and_stop_words(server, reference, model):
    expected = greedy_text(reference, PROMPT, repetition_penalty=1.5)
    e2e_client(server, "-p", PROMPT, "--model-name", model, "--repetition-penalty", "1.5",
               "--exclude-input-in-output", "--check-outputs",
               "--expected-outputs", as_json([expected]))
    # A stop word: the text of a generated token that is a token alone too (its ids are
    # what tensorrt_llm stops on), past the first two.
    prompt = PROMPTS[1]
    tokens, _ = reference.run(prompt, NUM_TOKENS)
    words = [reference.text([t]) for t in tokens]
    first = next(i for i, (t, w) in enumerate(zip(tokens, words, strict=True))
                 if i >= 2 and tokens.index(t) == i
                 and reference.codec.tokenizer.encode(w, add_special_tokens=False) == [t])
    word = words[first]
    expected = reference.text(tokens[: first + 1])
    assert expected.endswith(word) and len(expected) < len(reference.text(tokens))
    for streaming in ([], ["-S"]):
        e2e_client(server, "-p", prompt, "--model-name", model, "--stop-words", word,
                   "--exclude-input-in-output", "--check-outputs",
                   "--expected-outputs", as_json([expected]), *streaming)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_log_probs(server, reference, model):
    """--return-log-probs: the client prints them; they are the checkpoint's."""
    _, log_probs = reference.run(PROMPT, NUM_TOKENS)
    out = e2e_client(server, "-p", PROMPT, "--model-name", model, "--return-log-probs")
    assert f"output_log_probs.shape: (1, 1, {NUM_TOKENS})" in out
    outputs = grpc_generate(server, model, PROMPT, return_log_probs=True)
    assert len(outputs) == 1
    got = outputs[0]["output_log_probs"].reshape(-1)
    np.testing.assert_allclose(got, log_probs, atol=1e-4)
    assert outputs[0]["cum_log_probs"].reshape(-1)[0] == pytest.approx(sum(log_probs), abs=1e-3)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_logits_and_perf_metrics(server, reference, model):
    prompt_len = len(reference.prompt_ids(PROMPT))
    out = e2e_client(server, "-p", PROMPT, "--model-name", model, "--return-context-logits",
                     "--return-generation-logits", "--return-perf-metrics")
    vocab = reference.engine.args.vocab_size
    assert f"context_logits.shape: (1, {prompt_len}, {vocab})" in out
    assert f"generation_logits.shape: (1, 1, {NUM_TOKENS}, {vocab})" in out
    assert "kv_cache_alloc_total_blocks: 1" in out and "total_draft_tokens: 0" in out


def test_token_logits_are_the_checkpoints(server, reference):
    """context_logits and generation_logits of tensorrt_llm equal the reference engine's
    (itself checked against transformers); the greedy tokens are their argmax."""
    prompt_ids = reference.prompt_ids(PROMPT)
    engine = reference.engine
    engine.add_request("logits", prompt_ids, SamplingParams(
        max_tokens=4, min_length=4, return_context_logits=True, return_generation_logits=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    responses = stream_infer(server, "tensorrt_llm", {
        "input_ids": np.array([prompt_ids], np.int32),
        "input_lengths": np.array([[len(prompt_ids)]], np.int32),
        "request_output_len": np.array([[4]], np.int32),
        "min_tokens": np.array([[4]], np.int32),
        "exclude_input_in_output": np.array([[True]]),
        "return_context_logits": np.array([[True]]),
        "return_generation_logits": np.array([[True]])})
    (response,) = responses
    np.testing.assert_allclose(response["context_logits"][0],
                               outputs[0].context_logits.numpy(), atol=1e-4)
    generation = response["generation_logits"][0, 0]
    np.testing.assert_allclose(generation, np.stack([o.generation_logits[0].numpy()
                                                     for o in outputs]), atol=1e-4)
    assert response["output_ids"][0, 0].tolist() == generation.argmax(-1).tolist()


def test_token_client_streaming_and_stop_request(server, reference, tmp_path):
    """inflight_batcher_llm_client.py against tensorrt_llm: token ids in and out, checked
    by the client; then its early stop (a "stop" request with the same request id)."""
    prompt_ids = reference.prompt_ids(PROMPT)
    tokens, _ = reference.run(prompt_ids, 10, end_id=-1)
    inputs, outputs = tmp_path / "in.csv", tmp_path / "out.csv"
    inputs.write_text(",".join(map(str, prompt_ids)) + "\n")
    outputs.write_text(",".join(map(str, prompt_ids + tokens)) + "\n")
    common = ["-u", server.grpc_url, "--input-tokens-csv", str(inputs)]
    out = run_script(TOKEN_CLIENT, [*common, "--output-tokens-csv", str(outputs),
                                    "--request-output-len", "10", "-S", "-c",
                                    "--return-log-probs"])
    assert "PASS!" in out
    out = run_script(TOKEN_CLIENT, [*common, "--request-output-len", "300", "-S",
                                    "--stop-after-ms", "300", "--request-id", "stop-me"])
    assert "Got cancellation response from server" in out


def test_token_benchmark_script(server, tmp_path):
    """benchmark_core_model.py: token ids to tensorrt_llm over a gRPC stream, all at once."""
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(DATASET))
    out = run_script(BENCHMARK, ["-i", "grpc", "--url", server.grpc_url, "--decoupled",
                                 "--num-requests", str(len(DATASET)), "--max-input-len", "64",
                                 "dataset", "--dataset", str(dataset),
                                 "--tokenizer-dir", str(ensure_default_model())])
    assert "Total Latency" in out and "Total request latencies" in out


@pytest.mark.parametrize("model", ["tensorrt_llm", "ensemble"])
def test_perf_analyzer_streaming(server, reference, model, tmp_path):
    """perf_analyzer --streaming (client/run_perf_analyzer.sh) against the token model and
    the ensemble: every request streams its 16 tokens."""
    prompt = "The capital of France is"
    ids = reference.prompt_ids(prompt)
    if model == "tensorrt_llm":
        row = {"input_ids": {"content": ids, "shape": [len(ids)]},
               "input_lengths": [len(ids)], "request_output_len": [16], "min_tokens": [16],
               "streaming": [True]}
    else:
        row = {"text_input": [prompt], "max_tokens": [16], "min_tokens": [16],
               "stream": [True]}
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps({"data": [row]}))
    report = tmp_path / "perf.csv"
    env = {**os.environ, "PERF_URL": server.grpc_url, "PERF_MODEL": model,
           "PERF_INPUT_DATA": str(data), "PERF_MEASUREMENT_MS": "3000"}
    process = subprocess.run(
        [str(ROOT / "client" / "run_perf_analyzer.sh"), "--concurrency-range", "2",
         "-f", str(report), "--max-trials", "3", "--stability-percentage", "999"],
        env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    (result,) = list(csv.DictReader(report.open()))
    assert float(result["Inferences/Second"]) > 0
    # Chunks may hold two tokens (a character across tokens): at least 8 per request.
    assert float(result["Response Throughput"]) >= 8 * float(result["Inferences/Second"])


def test_readme_generate_examples(server, reference):
    """The generate-endpoint examples of tensorrtllm_backend's README, verbatim (the
    empty bad_words and stop_words mean none)."""
    body = '{"text_input": "What is machine learning?", "max_tokens": 20, ' \
           '"bad_words": "", "stop_words": ""}'
    expected = "What is machine learning?" + greedy_text(
        reference, "What is machine learning?", 20)
    for model in ("ensemble", "tensorrt_llm_bls"):
        request = urllib.request.Request(
            f"{server.http_url}/v2/models/{model}/generate", data=body.encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["model_name"] == model
        assert answer["text_output"] == expected


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_generate_stream_sends_only_new_text(server, reference, model):
    status, body = post_json(f"{server.http_url}/v2/models/{model}/generate_stream",
                             {"text_input": PROMPT, "max_tokens": NUM_TOKENS, "stream": True})
    assert status == 200, body
    chunks = [event["text_output"] for event in sse_events(body) if "text_output" in event]
    assert "".join(chunks) == greedy_text(reference, PROMPT)
    # No chunk but the last ends inside a character.
    assert not any(chunk.endswith("\ufffd") for chunk in chunks[:-1])


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_unknown_generate_key_is_an_error(server, model):
    status, body = post_json(f"{server.http_url}/v2/models/{model}/generate",
                             {"text_input": PROMPT, "max_tokens": 4, "top_kk": 5})
    assert status == 400 and "top_kk" in body
    # The names of the last release are inputs here.
    status, body = post_json(f"{server.http_url}/v2/models/{model}/generate",
                             {"text_input": PROMPT, "max_tokens": 4, "seed": 3,
                              "min_tokens": 4})
    assert status == 200, body


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("name, value, reason", [
    ("beam_width", np.array([[2]], np.int32), "beam search"),
    ("lora_task_id", np.array([[7]], np.uint64), "LoRA"),
    ("guided_decoding_guide_type", np.array([["json"]], object), "guided decoding"),
    ("prompt_vocab_size", np.array([[4]], np.int32), "prompt tuning"),
])
def test_unsupported_inputs_fail_by_name(server, model, name, value, reason):
    with pytest.raises(InferenceServerException, match=f"{name}.*{reason}"):
        grpc_generate(server, model, PROMPT, extra={name: value})


def test_sequences_of_one_prompt_share_its_blocks(server, reference):
    """num_return_sequences 4 on tensorrt_llm: one response per sequence (sequence_index),
    each seeded differently and reproducibly; sequences 1-3 took the prompt's full blocks
    from sequence 0 (kv_cache_reused_blocks, and the shared-blocks counter)."""
    prompt_ids = reference.prompt_ids("Return a list of the values in the file. " * 4)
    num_shared = (len(prompt_ids) - 1) // 16  # kv_block_size 16
    assert num_shared >= 2
    inputs = {"input_ids": np.array([prompt_ids], np.int32),
              "input_lengths": np.array([[len(prompt_ids)]], np.int32),
              "request_output_len": np.array([[6]], np.int32),
              "num_return_sequences": np.array([[4]], np.int32),
              "runtime_top_k": np.array([[50]], np.int32),
              "seed": np.array([[7]], np.uint64),
              "return_perf_metrics": np.array([[True]])}

    def shared_total() -> float:
        return sum(metric_values(server.metrics_url, "preemptserve_kv_blocks_shared_total")
                   .values())

    before = shared_total()
    responses = stream_infer(server, "tensorrt_llm", inputs)
    assert sorted(int(r["sequence_index"][0, 0]) for r in responses) == [0, 1, 2, 3]
    by_index = {int(r["sequence_index"][0, 0]): r for r in responses}
    reused = [int(by_index[i]["kv_cache_reused_blocks"][0, 0]) for i in range(4)]
    assert reused == [0, num_shared, num_shared, num_shared]
    for response in responses:
        assert response["output_ids"].shape[:2] == (1, 1)
        assert response["output_ids"][0, 0, : len(prompt_ids)].tolist() == prompt_ids
        total = int(response["kv_cache_alloc_total_blocks"][0, 0])
        assert total == -(-(len(prompt_ids) + 5) // 16)
        assert int(response["kv_cache_alloc_new_blocks"][0, 0]) + reused[
            int(response["sequence_index"][0, 0])] == total
        times = [int(response[name][0, 0]) for name in (
            "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns",
            "last_token_time_ns")]
        assert times == sorted(times) and times[0] > 1.6e18  # ns since the epoch
    outputs = [tuple(by_index[i]["output_ids"][0, 0].tolist()) for i in range(4)]
    assert len(set(outputs)) > 1
    again = {int(r["sequence_index"][0, 0]): tuple(r["output_ids"][0, 0].tolist())
             for r in stream_infer(server, "tensorrt_llm", inputs)}
    assert [again[i] for i in range(4)] == outputs
    wait_until(lambda: shared_total() - before == 2 * 3 * num_shared, what="metrics")


def test_metrics_are_served(server):
    assert metric_values(server.metrics_url, "preemptserve_kv_blocks")


def stream_infer(server, model: str, inputs: dict[str, np.ndarray]) -> list[dict]:
    """One request on a gRPC stream: the outputs of every response that has some."""
    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, tensors)
        client.stop_stream()
    finally:
        client.close()
    outputs = []
    while not results.empty():
        result, error = results.get()
        if error is not None:
            raise error
        response = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
        if response:
            outputs.append(response)
    return outputs


def grpc_generate(server, model: str, prompt: str, extra: dict | None = None,
                  **flags) -> list[dict[str, np.ndarray]]:
    """A text request on a gRPC stream: every response's outputs (raises the first error)."""
    inputs = {"text_input": np.array([[prompt]], dtype=object),
              "max_tokens": np.array([[NUM_TOKENS]], np.int32),
              **{name: np.array([[value]]) for name, value in flags.items()},
              **(extra or {})}
    return stream_infer(server, model, inputs)
