"""Fixtures for end-to-end tests against a real ``tritonserver`` process on loopback.

``triton_server`` starts one server for the whole session on free ports, serving the
repository's ``model_repository/`` (or ``$PREEMPTSERVE_MODEL_REPOSITORY``), and stops it,
stubs included, when the session ends, whatever the tests did. Its log is kept under
pytest's temporary directory; a server that fails to start reports the log's tail.

Every test in this directory is marked ``e2e`` (deselect with ``-m "not e2e"``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from preemptserve.triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer, TritonServerError

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "client"))

from stream_client import StreamResult, TokenStream, stream_generate  # noqa: E402

MODEL_NAME = "llm"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The served repository: ``$PREEMPTSERVE_MODEL_REPOSITORY`` or ``model_repository/``."""
    return Path(os.environ.get("PREEMPTSERVE_MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY))


@pytest.fixture(scope="session")
def triton_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A ready server on free loopback ports, stopped at the end of the session."""
    log_file = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    ready_timeout_s = float(os.environ.get("PREEMPTSERVE_READY_TIMEOUT_S", "300"))
    server = TritonServer(model_repository, log_file=log_file, ready_timeout_s=ready_timeout_s)
    try:
        with server:
            yield server
    except TritonServerError as e:
        pytest.fail(f"tritonserver for {model_repository} did not start: {e}", pytrace=False)


@pytest.fixture
def grpc_client(triton_server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    """A fresh gRPC client of the session's server, closed after the test."""
    client = grpcclient.InferenceServerClient(url=triton_server.grpc_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def stream(triton_server: TritonServer) -> Callable[..., TokenStream]:
    """``stream(prompt, max_tokens, **sampling)``: a ``TokenStream`` from the ``llm`` model."""

    def open_stream(prompt: str, max_tokens: int, **sampling: Any) -> TokenStream:
        return stream_generate(triton_server.grpc_url, MODEL_NAME, prompt, max_tokens, **sampling)

    return open_stream


@pytest.fixture
def generate(stream: Callable[..., TokenStream]) -> Callable[..., StreamResult]:
    """``generate(prompt, max_tokens, **sampling)``: run one request to its end."""

    def run(prompt: str, max_tokens: int, **sampling: Any) -> StreamResult:
        token_stream = stream(prompt, max_tokens, **sampling)
        for _ in token_stream:
            pass
        return token_stream.result

    return run
