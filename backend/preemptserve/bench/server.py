"""A real ``tritonserver`` per policy: repository copy with parameters, metrics, CPU time."""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..config import parameter_names
from ..pbtxt import read_parameters, set_parameters
from ..processes import cpu_seconds, descendants
from ..triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer

logger = logging.getLogger(__name__)

MODEL_NAME = "llm"


def served_parameters(repository: Path = DEFAULT_MODEL_REPOSITORY) -> dict[str, str]:
    """The ``config.pbtxt`` parameters of the ``llm`` model."""
    return read_parameters(repository / MODEL_NAME / "config.pbtxt")


def write_repository(
    root: Path, parameters: Mapping[str, str], source: Path = DEFAULT_MODEL_REPOSITORY
) -> Path:
    """A copy of ``source`` under ``root`` with ``parameters`` set (replaced or added).

    Raises ``ValueError`` on a name the model does not know (the server would refuse to
    load it; this says so before one starts).
    """
    unknown = sorted(set(parameters) - set(parameter_names()))
    if unknown:
        raise ValueError(f"unknown model parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(parameter_names())}")
    repo = root / "model_repository"
    shutil.copytree(source, repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / MODEL_NAME / "config.pbtxt"
    config.write_text(set_parameters(config.read_text(), parameters, source=str(config)))
    return repo


@contextmanager
def policy_server(
    parameters: Mapping[str, str], workdir: Path, label: str, torch_threads: int = 1
) -> Iterator[TritonServer]:
    """A ready server on free loopback ports with ``parameters``; stopped on exit.

    ``torch_threads`` (OMP_NUM_THREADS of the server; 0: torch's default): one leaves a
    core to the client on a 2-core machine.
    """
    root = workdir / label
    root.mkdir(parents=True, exist_ok=True)
    repo = write_repository(root, parameters)
    previous = os.environ.get("OMP_NUM_THREADS")
    if torch_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)  # inherited by the server
    try:
        log_path = root / "tritonserver.log"
        logger.info("%s: starting tritonserver (log %s)", label, log_path)
        server = TritonServer(repo, log_file=log_path, ready_timeout_s=600)
        with server:
            try:
                yield server
            except BaseException:
                logger.error("%s: server log tail:\n%s", label, server.log_tail())
                raise
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """Every ``preemptserve_*`` sample on the metrics page: ``name{labels}`` -> value."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("preemptserve_"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {
        k: v - before.get(k, 0.0) for k, v in after.items() if k.split("{", 1)[0].endswith("_total")
    }


def wait_idle(metrics_url: str, timeout_s: float) -> bool:
    """Until the model reports no waiting, running or preempted request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        samples = scrape_metrics(metrics_url)
        if not sum(v for k, v in samples.items() if k.startswith("preemptserve_requests")):
            return True
    return False


def process_tree_cpu_s(root_pid: int) -> float:
    """User + system CPU seconds of ``root_pid`` and its descendants, all threads."""
    return cpu_seconds({root_pid} | descendants(root_pid))
