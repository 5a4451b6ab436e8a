"""``model_repository_trtllm/`` in Triton's default mode (``decoupled: false`` on
``tensorrt_llm`` and ``tensorrt_llm_bls``, as tensorrtllm_backend's README fills the
templates): plain, non-streaming infer calls, HTTP and gRPC, with the official scripts.

``end_to_end_test.py`` runs ``preprocessing`` -> ``tensorrt_llm`` -> ``postprocessing``
by hand and checks that ``ensemble`` and ``tensorrt_llm_bls`` answer the same, log probs
included, then sends the whole data set at once. One server serves the module.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from trtllm_helpers import DATASET, END_TO_END_TEST, TOKEN_CLIENT, Reference, run_script
from trtllm_helpers import write_trtllm_repository as write_repository

from preemptserve.triton_server import TritonServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = write_repository(tmp_path_factory.mktemp("trtllm-default"), decoupled=False)
    with TritonServer(repo, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    return Reference()


def test_official_end_to_end_test(server, tmp_path):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(DATASET))
    host = server.http_url.removeprefix("http://")
    out = run_script(END_TO_END_TEST, ["-i", "http", "-u", host, "--dataset", str(dataset),
                                       "--max-input-len", "64", "--test-bls",
                                       "--return-log-probs", "-c", "4"])
    assert "Functionality test succeed" in out
    assert "Total Latency" in out


def test_token_client_without_streaming_and_its_stop_request(server, reference, tmp_path):
    prompt_ids = reference.prompt_ids("The value of")
    tokens, _ = reference.run(prompt_ids, 10, end_id=-1)
    inputs, outputs = tmp_path / "in.csv", tmp_path / "out.csv"
    inputs.write_text(",".join(map(str, prompt_ids)) + "\n")
    outputs.write_text(",".join(map(str, prompt_ids + tokens)) + "\n")
    common = ["-u", server.grpc_url, "--input-tokens-csv", str(inputs)]
    out = run_script(TOKEN_CLIENT, [*common, "--output-tokens-csv", str(outputs),
                                    "--request-output-len", "10", "-c"])
    assert "PASS!" in out
    out = run_script(TOKEN_CLIENT, [*common, "--request-output-len", "300",
                                    "--stop-after-ms", "300", "--request-id", "stop-me"])
    assert "Got cancellation response from server" in out


def test_readme_generate_examples(server, reference):
    body = '{"text_input": "What is machine learning?", "max_tokens": 20, ' \
           '"bad_words": "", "stop_words": ""}'
    tokens, _ = reference.run("What is machine learning?", 20)
    expected = "What is machine learning?" + reference.text(tokens)
    for model in ("ensemble", "tensorrt_llm_bls"):
        request = urllib.request.Request(
            f"{server.http_url}/v2/models/{model}/generate", data=body.encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read())["text_output"] == expected
